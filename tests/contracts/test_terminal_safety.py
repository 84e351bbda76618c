"""Data strings never reach a terminal raw (cbtool/util/safe_text.py): corpus text, token strings and label
values holding ESC sequences, C1 controls and bidi overrides are shown as escapes by every command that prints
them, checked on a real pseudo-terminal; and `visible()` as a property over generated strings."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cbtool.formats.store import documents_to_arrays
from cbtool.formats.store_writer import write_store
from cbtool.model.sites import CodebookSpec, Site
from cbtool.tasks.base import Document
from cbtool.util.safe_text import visible

# what a terminal would obey: set the window title, colour the rest, a C1 CSI, a right-to-left override, a bell
PAYLOADS = ["\x1b]0;PWNED\x07", "\x1b[31mEVIL", "\x9b32mC1", "\u202eRTL", "\x07BEL", "\x1b]8;;http://x\x1b\\L"]
RAW = [p.encode() for p in PAYLOADS] + [b"\x1b]", b"\x1b[31m", "\x9b".encode(), "\u202e".encode(), b"\x07"]
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    """A store whose documents, token strings and a label file are full of terminal control sequences."""
    root = tmp_path_factory.mktemp("hostile")
    pieces = ["a", *PAYLOADS, "b"]
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    spans = np.stack([ends - [len(p) for p in pieces], ends], axis=1).astype(np.int64)
    tokens = np.arange(len(pieces), dtype=np.int64)
    docs = [Document(tokens, text, spans, None) for _ in range(3)]
    arrays = documents_to_arrays(docs)
    spec = CodebookSpec(0, "attn_heads", 2, 4, 16, 1)
    sites = [Site("0.attn.h0", spec, 0), Site("0.attn.h1", spec, 1)]
    for s in sites:
        arrays.codes[s.name] = (np.arange(len(arrays.tokens)) % 3)[:, None]
    store = root / "codes"
    write_store(store, sites, [arrays], token_strings=pieces)
    labels = root / "labels.txt"
    labels.write_text("\n".join(pieces[i % len(pieces)] for i in range(len(arrays.tokens))) + "\n")
    return {"store": store, "labels": labels}


def _on_a_terminal(*args: str) -> tuple[int, bytes]:
    """Run `cbtool ARGS` with stdout and stderr on a pseudo-terminal; everything the terminal received."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "cbtool", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    got = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        got += chunk
    os.close(master)
    return proc.wait(timeout=120), got


@pytest.mark.parametrize("args", [
    ("show-code", "{store}", "0.attn.h0:1", "--examples", "5"),
    ("find-codes", "{store}", "--regex", "EVIL"),
    ("find-codes", "{store}", "--labels", "{labels}", "--top", "0"),
    ("dead-codes", "{store}"),
    ("info", "{store}"),
    ("find-codes", "{store}", "--regex", "\x1b\\[31mEVIL"),  # a query built from data, echoed back
    ("show-code", "{store}", "0.attn.h0:\x1b]0;PWNED\x07"),  # an error line quoting the input
], ids=["show-code", "find-codes-regex", "find-codes-labels", "dead-codes", "info", "regex-echo", "error-line"])
def test_no_control_sequence_from_data_reaches_the_terminal(hostile, args):
    rc, got = _on_a_terminal(*(a.format(**{k: str(v) for k, v in hostile.items()}) for a in args))
    assert rc in (0, 1, 2), got.decode(errors="replace")
    assert b"Traceback" not in got
    for raw in RAW:
        assert raw not in got, (raw, got.decode(errors="replace"))
    if args[0] == "show-code" and rc == 0:
        assert b"\\x1b]0;PWNED\\x07" in got or b"\\x1b[31mEVIL" in got, got.decode(errors="replace")


_unsafe = st.characters(min_codepoint=0, max_codepoint=0x3000)


@settings(max_examples=400, deadline=None)
@given(st.text(_unsafe, max_size=40))
def test_visible_leaves_nothing_a_terminal_obeys(s):
    for layout in (False, True):
        v = visible(s, layout=layout)
        for c in v:
            assert c in BIDI or unicodedata.category(c) != "Cc" or (layout and c in "\n\t"), (s, v)
            assert c not in BIDI and not 0xD800 <= ord(c) <= 0xDFFF, (s, v)
        if all(unicodedata.category(c) != "Cc" and c not in BIDI and not 0xD800 <= ord(c) <= 0xDFFF for c in s):
            assert v == s  # ordinary text is shown as it is
    assert visible(s, layout=True).count("\n") == s.count("\n")
    assert "\n" not in visible(s)


def test_text_objects_built_directly_are_made_visible_too():
    """intervene assembles generated text as rich `Text` (its bold differences): no render_str on that path."""
    import io

    from rich.table import Table
    from rich.text import Text

    from cbtool.util.safe_text import SafeConsole

    buf = io.StringIO()
    console = SafeConsole(file=buf, force_terminal=True, width=120, color_system="truecolor")
    table = Table("sample")
    t = Text()
    for ch in "ok\x1b]0;PWNED\x07\x1b[31mEVIL\u202e":
        t.append(ch, style="bold" if ch == "E" else "")
    table.add_row(t)
    console.print(table)
    console.print(Text("\x9b31m plain \x1b[2J"))
    got = buf.getvalue().encode()
    for raw in RAW + [b"\x1b[2J"]:
        assert raw not in got, (raw, got)
    assert b"\\x1b]0;PWN" in got and b"\\u202e" in got and b"\\x9b31m" in got
    assert b"\x1b[1m" in got  # rich's own styles still reach the terminal
