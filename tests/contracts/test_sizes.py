"""Sizes that cannot fit are refused before anything starts, with one line giving the estimate and the limit
(cbtool/util/budget.py); the sizes the presets and docs use still run."""

from __future__ import annotations

import pytest

from cbtool.util import budget
from tests.helpers import run_cli


def _one_line(res, *texts: str) -> None:
    lines = [ln for ln in res.output.splitlines() if ln.startswith("cbtool: error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "Traceback" not in res.output, res.output
    assert all(t in lines[0] for t in texts), lines


@pytest.mark.parametrize("option", ["--batch-size", "--kmeans-seqs"])
def test_train_sizes_beyond_memory_refused_before_it_starts(tmp_path, option):
    out = tmp_path / "ck"
    res = run_cli("train", "--preset", "tiny", "--out", out, option, "1000000000", "--device", "cpu")
    _one_line(res, f"{option} 1000000000", "needs at least", "GiB of memory", "this machine has")
    assert not (out / "cbtool.json").exists()


def test_embed_sizes_beyond_memory_or_disk_refused_before_it_starts(tiny_checkpoint, tmp_path):
    store = tmp_path / "codes"
    res = run_cli("embed", tiny_checkpoint, "--out", store, "--num-seqs", "1000000000000", "--device", "cpu")
    _one_line(res, "would write at least", "GiB free there", "--num-seqs")
    res = run_cli("embed", tiny_checkpoint, "--out", store, "--batch-size", "1000000000", "--device", "cpu")
    _one_line(res, "--batch-size 1000000000", "GiB of memory")
    assert not store.exists()
    res = run_cli("embed", tiny_checkpoint, "--out", store, "--num-seqs", "40", "--shard-tokens", "100000000000",
                  "--device", "cpu")  # a huge shard limit is capped by the tokens there are: fine
    assert res.exit_code == 0, res.output


def test_memory_and_disk_are_known_here(tmp_path):
    assert (budget.physical_memory() or 0) > 2**28 and (budget.free_disk(tmp_path / "a" / "b") or 0) > 0
