"""Shared fixtures: a tiny checkpoint trained once per session through the real CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli


@pytest.fixture(scope="session")
def tiny_checkpoint_master(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "checkpoint"
    res = run_cli("train", "--preset", "tiny", "--out", str(out), "--seed", "1", "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def tiny_checkpoint(tiny_checkpoint_master, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may modify."""
    dst = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint_master, dst)
    return dst
