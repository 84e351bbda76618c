"""Data strings on a terminal: corpus text, token strings, label values, queries and regexes built from data.

Any of them may hold bytes a terminal obeys rather than shows: ESC sequences (colours, cursor moves, window
titles, OSC 8 links, clipboard writes), other C0 controls, DEL, C1 controls (U+0080-U+009F: U+009B is a CSI of
its own on some terminals) and the bidirectional overrides that reorder what is shown (U+202A-U+202E,
U+2066-U+2069, U+200E/U+200F, U+061C). `visible()` shows each of them as its escape (`\\x1b`, `\\x9b`,
`\\u202e`), so the line on screen is what the data holds; `SafeConsole` applies it to every string a command
prints through rich (tables, markup, plain lines), before layout, so widths stay right. docs/cli.md "Exit codes"."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.segment import Segment

from cbtool.util.limits import env_columns

# C0 but for \t and \n, DEL, C1, the bidi embeddings/overrides/isolates and marks, line/paragraph separators,
# lone surrogates (from surrogate-escaped bytes)
_OTHERS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_KEEP_LAYOUT = re.compile(f"[{_OTHERS}]")
_ONE_LINE = re.compile(f"[\t\n{_OTHERS}]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group(0))
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def visible(text: str, layout: bool = False) -> str:
    """`text` with every control, bidi and separator character shown as its escape. With `layout`, newlines
    and tabs stay as they are (for multi-line text whose lines the caller lays out); without it they are
    escaped too, so one data string is one line."""
    return (_KEEP_LAYOUT if layout else _ONE_LINE).sub(_escape, text)


def is_safe(text: str) -> bool:
    """True when `visible(text, layout=True)` would change nothing."""
    return _KEEP_LAYOUT.search(text) is None


class SafeConsole(Console):
    """A rich Console that never sends a control character from a printed string to the terminal: every
    string it renders (print arguments, table cells, markup) passes through `visible` first, keeping
    newlines and tabs, which rich lays out itself; `Text` objects built directly are made visible as they are
    written. Styles and cursor controls that rich adds are unaffected."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("width") is None and "COLUMNS" in os.environ and env_columns() is None:
            # rich would take COLUMNS=0 as a width of 0 columns (and print nothing): ignore a bad $COLUMNS
            kwargs["_environ"] = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
        super().__init__(*args, **kwargs)

    def render_str(self, text: str, **kwargs: Any):  # type: ignore[override]
        return super().render_str(visible(text, layout=True) if not is_safe(text) else text, **kwargs)

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        # the last gate, for renderables built without render_str (a `Text` assembled from generated text):
        # every segment of text made visible; control segments (rich's own cursor moves) and styles untouched
        return super()._render_buffer(
            seg if seg.control or is_safe(seg.text) else Segment(visible(seg.text, layout=True), seg.style, None)
            for seg in buffer)


def say(line: str) -> None:
    """Write one line to stderr, made `visible`; a closed or full stderr (`2>&-`, `2>/dev/full`) loses the line
    but never changes the exit code: the stream is swapped for /dev/null so that Python's flush at exit does not
    fail again (which would exit 120)."""
    try:
        if sys.stderr is None:
            raise ValueError("stderr is closed")
        sys.stderr.write(visible(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
