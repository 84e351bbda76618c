"""Lock files under real concurrent processes (cbtool/util/locks.py): of many writers racing for one lock, live
or left stale by a killed writer, exactly one wins and every other is refused with one line."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cbtool.errors import UserError
from cbtool.util.locks import acquire, remove_if_stale

TAKERS = 4
TRIALS = 25


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _taker(lock: str, start, done, results) -> None:
    start.wait()
    try:
        held = acquire(Path(lock), "the test lock")
    except UserError as e:
        results.put(("refused", str(e)))
        done.wait()
        return
    results.put(("won", os.getpid()))
    done.wait()  # hold it until every taker has tried
    held.release()


def _race(lock: Path) -> list[tuple[str, object]]:
    ctx = mp.get_context("fork")
    start, done, results = ctx.Barrier(TAKERS), ctx.Barrier(TAKERS), ctx.Queue()
    procs = [ctx.Process(target=_taker, args=(str(lock), start, done, results)) for _ in range(TAKERS)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return got


@pytest.mark.parametrize("stale", [True, False], ids=["stale-lock", "no-lock"])
def test_concurrent_takers_exactly_one_wins(tmp_path, stale):
    for trial in range(TRIALS):
        lock = tmp_path / f".t{trial}.lock"
        if stale:  # left by a killed writer on this host
            lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0.0}))
        got = _race(lock)
        winners = [who for kind, who in got if kind == "won"]
        assert len(winners) == 1, (trial, got)
        for kind, msg in got:
            if kind == "refused":
                assert f"pid {winners[0]} on" in msg or "another writer" in msg, msg
                assert "\n" not in msg
        assert not lock.exists()  # the winner released it


def test_live_lock_refused_and_stale_claim_removed(tmp_path):
    lock = tmp_path / ".x.lock"
    held = acquire(lock, "x")
    with pytest.raises(UserError, match=f"pid {os.getpid()} on"):
        acquire(lock, "x")
    assert not remove_if_stale(lock) and lock.exists()
    held.release()
    held.release()  # idempotent
    assert not lock.exists()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0.0}))
    assert remove_if_stale(lock) and not lock.exists()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid(), "time": 0.0}))
    with pytest.raises(UserError, match="elsewhere"):  # a writer on another host is never judged dead
        acquire(lock, "x")
