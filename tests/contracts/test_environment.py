"""Environment variables are parsed like options (cbtool/util/limits.py `check_environment`): a value that is
not a number, NaN, infinite, negative or out of range is exit 2 with one line naming the variable; a stale
torchrun environment never hangs; a bad $COLUMNS never stops a command nor empties its output."""

from __future__ import annotations

import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.helpers import run_cli

SECONDS = ("CBTOOL_PROGRESS_SECONDS", "CBTOOL_DIST_TIMEOUT", "CBTOOL_REGEX_TIMEOUT")
NOT_SECONDS = ("abc", "nan", "NaN", "-1", "0", "inf", "-inf", "1e999", "1s", "0x10")
NOT_INTS = ("abc", "nan", "-1", "1.5", "1e3", "9" * 40, "²")
CASES = ([({v: bad}, v) for v in SECONDS for bad in NOT_SECONDS]
         + [({"WORLD_SIZE": bad}, "WORLD_SIZE") for bad in (*NOT_INTS, "0")]
         + [({"WORLD_SIZE": "2", "RANK": bad, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "RANK")
            for bad in (*NOT_INTS, "2", "9")]
         + [({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": bad, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
             "LOCAL_RANK") for bad in NOT_INTS])


def _one_error_line(res, needle: str) -> None:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbtool: error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.output


@pytest.mark.parametrize(("env", "name"), CASES, ids=[f"{n}={e[n]!r}" for e, n in CASES])
def test_bad_environment_variable_is_one_line(env, name, monkeypatch, tmp_path):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    _one_error_line(run_cli("dead-codes", tmp_path / "no-store"), f"${name}")


def test_cbtool_run_that_is_a_file(monkeypatch, tmp_path):
    (tmp_path / "f").write_text("x")
    monkeypatch.setenv("CBTOOL_RUN", str(tmp_path / "f"))
    _one_error_line(run_cli("info"), "$CBTOOL_RUN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_waiting_for_peers_says_so_and_honours_sigterm(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    proc = subprocess.Popen([sys.executable, "-m", "cbtool", "dead-codes", str(tmp_path / "codes")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        assert "waiting for the other ranks" in first and "CBTOOL_DIST_TIMEOUT" in first, first
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 143 and time.monotonic() - t0 < 10
    assert rest.strip().splitlines() == ["cbtool: interrupted by SIGTERM while waiting for the other ranks"], rest


@pytest.mark.parametrize("columns", ["abc", "0", "-3", "nan", "99999999"])
@pytest.mark.parametrize("tty", [False, True], ids=["piped", "terminal"])
def test_bad_columns_neither_stops_nor_empties_output(columns, tty, tmp_path):
    args = [sys.executable, "-m", "cbtool", "info", "--help"]
    env = {**os.environ, "COLUMNS": columns}
    if not tty:
        res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
        rc, got = res.returncode, res.stdout + res.stderr
    else:
        master, slave = pty.openpty()
        proc = subprocess.Popen(args, env=env, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        rc, got = proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")
    assert rc == 0, got
    got = re.sub(r"\x1b\[[0-9;]*m", "", got)  # rich's own styles on a terminal
    assert "Traceback" not in got and "Usage" in got and "--run" in got, got
