"""Helpers for tests: invoke the real CLI in-process."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from cbtool.cli import app
from cbtool.formats.verified import RECORD
from cbtool.training.metrics_log import read_metrics


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root`, less the records of sha256 checks that passed (a cache a store reader keeps:
    cbtool/formats/verified.py), so "nothing was written" means nothing but that."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != RECORD}


def run_cli(*args: object):
    """Run `cbtool ARGS` through the real Typer app; returns the Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_same_training(full: Path, part: Path) -> None:
    """Two checkpoints hold bit-identical weights, codebooks, evaluation results and metrics logs (but for
    the wall-clock fields)."""
    for name in ("model.safetensors", "codebooks.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(part / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    ra = json.loads((full / "cbtool.json").read_text())["training"]["results"]
    rb = json.loads((part / "cbtool.json").read_text())["training"]["results"]
    assert ra["on"] == rb["on"] and ra["bypassed"] == rb["bypassed"]
    clock = ("seconds", "tokens_per_s")
    la, lb = ([{k: v for k, v in r.items() if k not in clock} for r in read_metrics(ck)] for ck in (full, part))
    assert la and la == lb, "the metrics log differs after resume"
