"""Shared fixtures: a tiny checkpoint trained once per session through the real CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli


@pytest.fixture(scope="session")
def tiny_checkpoint_master(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "checkpoint"
    res = run_cli("train", "--preset", "tiny", "--out", str(out), "--seed", "1", "--device", "cpu",
                  "--keep-optimizer")  # test_bad_input damages its optimizer state
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def tiny_checkpoint(tiny_checkpoint_master, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may modify."""
    dst = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint_master, dst)
    return dst


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a loaded CI box the threads wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
