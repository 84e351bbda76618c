"""One writer per share of a code store (cbtool/formats/store_writer.py `.writer.lock`), a store that could not be
finalised is an error, and a store or shard is only read with the checkpoint and store it belongs to.

The concurrency cases run the real CLI in separate processes on the tiny checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from cbtool.formats.store_writer import StoreWriter
from tests.helpers import run_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _errors(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("cbtool: error:")]


def _cbtool(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cbtool", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_second_writer_and_overwrite_refused_while_embed_runs(tiny_checkpoint, tmp_path):
    store = tmp_path / "codes"
    args = [tiny_checkpoint, "--out", store, "--num-seqs", "400000", "--shard-tokens", "2000", "--batch-size", "8",
            "--device", "cpu"]  # far more than it writes before it is stopped
    first = subprocess.Popen([sys.executable, "-m", "cbtool", "embed", *map(str, args)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (store / ".writer.lock").is_file() or not list(store.glob("shard-*/shard.json")):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first embed never started writing"
            time.sleep(0.05)
        for extra in (["--overwrite"], []):
            res = _cbtool("embed", *args, *extra)
            lines = _errors(res.stderr)
            assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
            assert f"being written by pid {first.pid}" in lines[0], lines
        assert first.poll() is None and (store / "shard-000000" / "shard.json").is_file(), \
            "the refused --overwrite removed shards"
    finally:
        first.send_signal(signal.SIGTERM)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 143 and len(_errors(err) + [ln for ln in err.splitlines() if "SIGTERM" in ln]) >= 1
    assert "Traceback" not in err and (store / "shard-000000" / "shard.json").is_file()
    assert not list(store.glob(".writer*.lock")) and not list(store.glob("*.lock")), "locks left behind"
    res = _cbtool("embed", *args, "--overwrite", "--num-seqs", "40")  # no writer left: --overwrite may start over
    assert res.returncode == 0, res.stderr
    assert json.loads((store / "manifest.json").read_text())["complete"]


def test_embed_whose_store_cannot_be_finalised_fails(tiny_checkpoint, tmp_path, monkeypatch):
    """A shard removed under a running embed (by any hand): the store is not complete, so embed must not say
    it succeeded."""
    store = tmp_path / "codes"
    write = StoreWriter.write_shard

    def write_then_lose_shard_0(self, index, arrays):
        n = write(self, index, arrays)
        if index == 1:
            shutil.rmtree(self.path / "shard-000000")
        return n

    monkeypatch.setattr(StoreWriter, "write_shard", write_then_lose_shard_0)
    res = run_cli("embed", tiny_checkpoint, "--out", store, "--num-seqs", "200", "--shard-tokens", "2000",
                  "--device", "cpu")
    assert res.exit_code == 2 and "could not be finalised" in res.output, res.output
    assert not json.loads((store / "manifest.json").read_text())["complete"]
    assert not list(store.glob(".writer*.lock"))
    monkeypatch.setattr(StoreWriter, "write_shard", write)
    res = run_cli("embed", tiny_checkpoint, "--out", store, "--num-seqs", "200", "--shard-tokens", "2000",
                  "--device", "cpu")  # running it again finishes the store
    assert res.exit_code == 0, res.output


def test_report_refuses_a_store_of_another_checkpoint_and_a_foreign_shard(tiny_checkpoint, tmp_path):
    other = tmp_path / "other"
    assert run_cli("train", "--preset", "tiny", "--out", other, "--seed", "2", "--device", "cpu").exit_code == 0
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for ck, store in ((tiny_checkpoint, mine), (other, theirs)):
        res = run_cli("embed", ck, "--out", store, "--num-seqs", "60", "--shard-tokens", "1000", "--device", "cpu")
        assert res.exit_code == 0, res.output
    res = _cbtool("report", other, mine, "--out", tmp_path / "r.html")
    lines = _errors(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and "another checkpoint" in lines[0], res.stderr
    assert not (tmp_path / "r.html").exists()
    # the same shard of a store of the same size from another checkpoint, copied in
    shutil.rmtree(mine / "shard-000001")
    shutil.copytree(theirs / "shard-000001", mine / "shard-000001")
    res = _cbtool("find-codes", mine, "--labels", "state")
    lines = _errors(res.stderr)
    assert res.returncode == 2 and len(lines) == 1 and "not the shard this store was finalised with" in lines[0], \
        res.stderr
