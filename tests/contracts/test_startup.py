"""Start-up promise (docs/cli.md "Start-up"): help, the version and the read-only commands on a store import
neither torch nor transformers. Each command runs in a fresh interpreter through the real CLI on the committed
fixtures/store, which then reports whether torch was imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STORE = str(ROOT / "fixtures" / "store")

# runs `cbtool ARGS`, then prints (to fd 3's stand-in: the last stdout line) which heavy modules were imported
PROBE = """
import json, sys
sys.argv = ["cbtool", *json.loads(sys.argv[1])]
from cbtool.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
sys.stdout.flush()
print("\\nHEAVY " + json.dumps({"rc": code, "torch": "torch" in sys.modules,
                                "transformers": "transformers" in sys.modules}))
"""

READ_ONLY = [
    ["--help"],
    ["--version"],
    *[[cmd, "--help"] for cmd in ("train", "eval", "info", "embed", "find-codes", "dead-codes", "show-code",
                                  "explain", "intervene", "report")],
    ["info", STORE],
    ["info", STORE, "--json"],
    ["find-codes", STORE, "--labels", "state", "--top", "3"],
    ["find-codes", STORE, "--labels", "state", "--jsonl"],
    ["dead-codes", STORE],
    ["show-code", STORE, "0.mlp:1"],
    ["explain", STORE, "--top", "3"],
]


def run_probe(args: list[str], env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "COLUMNS": "120", **(env or {})}, timeout=120)
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("HEAVY "), (proc.stdout[-400:], proc.stderr[-400:])
    return json.loads(line[len("HEAVY "):]) | {"stderr": proc.stderr}


@pytest.mark.parametrize("args", READ_ONLY, ids=lambda a: " ".join(Path(x).name if "/" in x else x for x in a))
def test_read_only_commands_do_not_import_torch(args):
    got = run_probe(args)
    assert got["rc"] == 0, got["stderr"]
    assert not got["torch"], f"cbtool {' '.join(args)} imported torch"
    assert not got["transformers"], f"cbtool {' '.join(args)} imported transformers"


def test_commands_that_need_torch_still_get_it(tmp_path):
    """The probe sees torch when a command really uses it (the test above is not vacuous)."""
    got = run_probe(["eval", str(ROOT / "fixtures" / "tokfsm"), "--samples", "8", "--json"])
    assert got["rc"] == 0, got["stderr"]
    assert got["torch"]


def test_help_defaults_match_the_modules_they_stand_for():
    """commands/embed.py and commands/intervene.py copy two defaults so that --help needs no torch."""
    from cbtool.commands import embed, intervene
    from cbtool.embedding import DEFAULT_SHARD_TOKENS
    from cbtool.steering.patching import DEFAULT_ROWS, ROW_HELP

    assert embed.DEFAULT_SHARD_TOKENS == DEFAULT_SHARD_TOKENS
    assert (intervene.DEFAULT_ROWS, intervene.ROW_HELP) == (DEFAULT_ROWS, ROW_HELP)
