"""Real signals sent to real `cbtool` processes, and a real closed pipe (cbtool/util/signals.py).

Ctrl-C (SIGINT) or SIGTERM: exit 130 / 143, one line saying what was saved and how to continue, no
traceback, no lock or temp file left, and what is on disk loads. `cbtool ... | head -1`: exit 0, nothing on
stderr."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cbtool.formats.checkpoint import load_checkpoint
from tests.helpers import run_cli

CLI = [sys.executable, "-m", "cbtool"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CBTOOL_PROGRESS_SECONDS": "0.1"}
PIPE_BUFFER = 65536  # Linux's default: output beyond it blocks the writer until the reader reads or goes away


def _interrupt(args: list[object], sig: int, ready, cwd: Path) -> tuple[int, list[str]]:
    """Start `cbtool ARGS`, read its stderr until `ready(line)` holds, send `sig`; the exit code and the
    stderr lines that followed."""
    proc = subprocess.Popen([*CLI, *map(str, args)], cwd=cwd, env=ENV, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=_default_sighup)
    try:
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if ready(line):
                break
        else:
            raise AssertionError(f"the command ended before it was ready to be interrupted: {''.join(seen)[-800:]}")
        proc.send_signal(sig)
        rest = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, rest.splitlines()


def _stepping(line: str) -> bool:
    """A training progress line: `N steps/s`, or `N s/step` when a loaded machine makes steps slower than 1 s."""
    return "steps/s" in line or "s/step" in line


def _default_sighup() -> None:
    """The command starts with SIGHUP's and SIGINT's default dispositions, as from a terminal (not the ignored ones
    a pytest run under `nohup` or started with `&` by a script would pass on, which the command would then keep
    ignoring)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _leftovers(folder: Path) -> list[str]:
    """Lock files, temp files and swapped-out checkpoints: none may survive an interrupt."""
    return [p.name for p in folder.rglob("*") if p.name.endswith((".lock", ".tmp")) or ".tmp-" in p.name
            or ".old-" in p.name]


def _one_line(lines: list[str], start: str) -> str:
    assert not any("Traceback" in line for line in lines), lines
    ours = [line for line in lines if line.startswith("cbtool: ")]
    assert len(ours) == 1 and ours[0].startswith(start), lines
    return ours[0]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_train_interrupted_names_its_last_checkpoint_which_resumes(sig, code, tmp_path):
    out = tmp_path / "ck"
    rc, lines = _interrupt(["train", "--preset", "tiny", "--device", "cpu", "--out", out, "--base-steps", 20,
                            "--steps", 2000, "--checkpoint-every", 10],
                           sig, lambda line: _stepping(line) and (out / "cbtool.json").is_file(), tmp_path)
    assert rc == code
    name = signal.Signals(sig).name
    line = _one_line(lines, f"cbtool: interrupted by {name}: the last checkpoint, step ")
    step = int(re.search(r"step (\d+)/2020", line).group(1))
    assert step % 10 == 0 and f"continue with: cbtool train --resume --out {out}" in line
    assert load_checkpoint(out, with_train_state=True).meta["training"]["step"] == step  # intact, hashes checked
    assert _leftovers(tmp_path) == []
    # what the line says works; --steps may change on --resume (announced), the rest of the run is the stored one
    res = run_cli("train", "--resume", "--out", out, "--device", "cpu", "--steps", 1, "--preset", "tiny")
    assert res.exit_code == 0, res.output
    assert "resume: --steps 2000 -> 1" in res.stderr
    assert json.loads((out / "cbtool.json").read_text())["training"]["step"] == 21


def test_train_terminated_before_any_checkpoint_says_nothing_was_saved(tmp_path):
    out = tmp_path / "ck"
    rc, lines = _interrupt(["train", "--preset", "tiny", "--device", "cpu", "--out", out, "--base-steps", 2000,
                            "--checkpoint-every", 0], signal.SIGTERM, _stepping, tmp_path)
    assert rc == 143
    _one_line(lines, "cbtool: interrupted by SIGTERM: nothing was saved yet")
    assert not (out / "cbtool.json").exists() and _leftovers(tmp_path) == []


def test_embed_interrupted_names_its_complete_shards(tiny_checkpoint_master, tmp_path):
    store = tmp_path / "codes"
    # embed logs nothing while it runs off a terminal: the signal goes once its first shard is complete
    rc, lines = _interrupt_embed(["embed", tiny_checkpoint_master, "--out", store, "--num-seqs", 20000,
                                  "--shard-tokens", 4096, "--device", "cpu"], store / "shard-000000" / "shard.json",
                                 tmp_path)
    assert rc == 130
    line = _one_line(lines, "cbtool: interrupted by SIGINT: ")
    done = int(re.search(r"(\d+) complete shard\(s\) are kept in", line).group(1))
    assert done >= 1 and done == len(list(store.glob("shard-*/shard.json")))
    assert "run the same command again to continue" in line
    assert _leftovers(tmp_path) == []


def test_other_commands_interrupted_say_so_in_one_line(tiny_checkpoint_master, tmp_path):
    rc, lines = _interrupt(["eval", tiny_checkpoint_master, "--samples", 200000], signal.SIGTERM,
                           lambda line: line.startswith("eval ("), tmp_path)
    assert rc == 143 and _one_line(lines, "cbtool: interrupted") == "cbtool: interrupted by SIGTERM"


def _interrupt_embed(args: list[object], first: Path, cwd: Path) -> tuple[int, list[str]]:
    proc = subprocess.Popen([*CLI, *map(str, args)], cwd=cwd, env=ENV, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=_default_sighup)
    try:
        deadline = time.monotonic() + 120
        while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.splitlines()


@pytest.fixture(scope="module")
def big_store(tmp_path_factory, tiny_checkpoint_master) -> Path:
    store = tmp_path_factory.mktemp("pipe") / "codes"
    res = run_cli("embed", tiny_checkpoint_master, "--out", store, "--num-seqs", 512, "--device", "cpu")
    assert res.exit_code == 0, res.output
    return store


def _output_commands(store: Path) -> dict[str, list[str]]:
    """Commands whose output is larger than the pipe holds: a JSON document, and a table of contexts."""
    top = json.loads(run_cli("find-codes", store, "--regex", ".", "--json").stdout)["rows"][0]["code"]
    return {"json": ["find-codes", str(store), "--regex", ".", "--top", "0", "--json"],
            "table": ["show-code", str(store), top, "--examples", "3000", "--context", "20"]}


@pytest.mark.parametrize("kind", ["json", "table"])
def test_closed_pipe_exits_quietly_with_0(kind, big_store):
    args = [*CLI, *_output_commands(big_store)[kind]]
    whole = subprocess.run(args, env=ENV, capture_output=True, timeout=300)
    assert whole.returncode == 0 and len(whole.stdout) > PIPE_BUFFER  # more than the pipe holds: the writer blocks
    writer = subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = subprocess.Popen(["head", "-1"], stdin=writer.stdout, stdout=subprocess.PIPE)
    writer.stdout.close()  # only head reads the pipe now: when it exits, the pipe is closed
    first, _ = head.communicate(timeout=300)
    _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0 and err == b"", err.decode()
    assert first == whole.stdout.splitlines(keepends=True)[0]
