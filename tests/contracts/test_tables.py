"""Tables at 80 and 120 columns through the real CLI: code ids and site names never cut (`1.m…`), explain's
ready-to-paste query whole on one line (other columns dropped with a line that says so, or the queries listed
below the table when one is too long for a column), intervene's row,
seed and prompt readable (no prompt one character per line)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbtool.explanations.explainer import shell_query

ROOT = Path(__file__).resolve().parents[2]
STORE = str(ROOT / "fixtures" / "store")
CKPT = str(ROOT / "fixtures" / "tokfsm")


def cbtool(columns: int, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "cbtool", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "COLUMNS": str(columns)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rows(*args: str) -> list[dict]:
    return [json.loads(line) for line in cbtool(200, *args, "--jsonl").splitlines() if line.strip()]


def cells(text: str) -> list[list[str]]:
    """Each table line's cells (between the box's vertical bars)."""
    return [[c.strip() for c in line.strip("│┃").split("│" if "│" in line else "┃")]
            for line in text.splitlines() if line.startswith(("│", "┃"))]


@pytest.mark.parametrize("columns", [80, 120])
def test_explain_keeps_each_query_whole(columns):
    text = cbtool(columns, "explain", STORE, "--top", "6")
    assert max(len(line) for line in text.splitlines() if line.startswith(("┏", "│"))) <= columns
    found = [c for line in cells(text) for c in line]
    for r in sorted(rows("explain", STORE), key=lambda r: (-r["fires"], r["code"]))[:6]:  # the table's order
        assert r["code"] in found
        if r["query"]:  # in its cell, or on its own line below the table when too long for a column
            q = shell_query(r["query"])
            assert q in found or f"  {r['code']}  " in text and any(
                line.split() == [r["code"], *q.split()] for line in text.splitlines()), f"{q} cut at {columns}"


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("args", [["find-codes", STORE, "--regex", "3", "--top", "8", "--examples", "3"],
                                  ["find-codes", STORE, "--labels", "state", "--top", "8"]])
def test_find_codes_never_cuts_a_code(columns, args):
    text = cbtool(columns, *args)
    found = {c for line in cells(text) for c in line}
    assert "…" not in "".join(line[2] if "--labels" in args else line[0] for line in cells(text) if len(line) > 2)
    codes = [r["code"] for r in rows(*args) if r.get("code")][:8]
    assert codes and all(code in found for code in codes)


@pytest.mark.parametrize("columns", [80, 120])
def test_dead_codes_never_cuts_a_site(columns):
    text = cbtool(columns, "dead-codes", STORE)
    found = {line[0] for line in cells(text)}
    assert {r["site"] for r in json.loads(cbtool(200, "dead-codes", STORE, "--json"))["sites"]} <= found


@pytest.mark.parametrize("columns", [80, 120])
def test_intervene_keeps_row_seed_and_prompt_readable(columns):
    text = cbtool(columns, "intervene", CKPT, "--code", "0.mlp:1", "--prompt", "45157023", "-n", "3",
                  "--regex", "^[27]")
    table = [line for line in cells(text) if len(line) == 6]
    assert max(len(line) for line in text.splitlines() if line.startswith("│")) <= columns
    assert any(line[:2] == ["row", "seed"] or "row" in line[0] for line in table)
    first = [line for line in table if line[0] == "1"]
    assert [line[1] for line in first] == ["0", "1", "2"]  # each sample's row and seed on its own line
    assert all(line[2] == "45 15 70 23" for line in first)  # the prompt on one line, states grouped
    assert all(line[3] == "force 0.mlp:1" for line in first)
