"""SIGKILL at random (seeded) points of a real `cbtool train` / `cbtool embed` process.

After the kill, what is on disk either refuses to load (exit 2) or loads and equals the state an
uninterrupted run had at that point (a checkpoint of step s equals the reference's step-s save; a
complete store equals the reference store). Then `train --resume` / re-running `embed` finishes the
job and the result equals the uninterrupted run, tensor for tensor (CPU, same seed).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from cbtool.errors import UserError
from cbtool.formats.checkpoint import MODEL, TRAIN_STATE, load_checkpoint
from cbtool.formats.store import Store
from cbtool.training.config import apply_preset
from cbtool.training.trainer import Trainer
from tests.helpers import run_cli

CLI = [sys.executable, "-m", "cbtool"]
KILL_SEEDS = (0, 1, 2)
TRAIN = {"base_steps": 5, "steps": 5, "checkpoint_every": 1, "seed": 2}
TENSOR_FILES = ("codebooks.safetensors", MODEL, TRAIN_STATE)


def _train_args(out: Path) -> list[str]:
    return ["train", "--preset", "tiny", "--base-steps", str(TRAIN["base_steps"]), "--steps", str(TRAIN["steps"]),
            "--checkpoint-every", str(TRAIN["checkpoint_every"]), "--seed", str(TRAIN["seed"]), "--device", "cpu",
            "--out", str(out)]


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in TENSOR_FILES:
        for key, t in load_file(str(ckpt / name)).items():
            # wall-clock times (total and per phase): the only state that may differ
            if key != "trainer.elapsed" and not key.startswith("trainer.seconds."):
                out[f"{name}:{key}"] = t
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


def _kill_after(cmd: list[str], ready: Path, delay: float, cwd: Path) -> tuple[float, int | None]:
    """Start `cmd`, wait until `ready` exists (or the process ends), sleep `delay`, SIGKILL it."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "CBTOOL_DEBUG": "1"})
    t0 = time.monotonic()
    try:
        while not ready.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=120)
    return time.monotonic() - t0, proc.returncode


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    """An uninterrupted run in-process, with a copy of every intermediate checkpoint it saved."""
    root = tmp_path_factory.mktemp("kill-train-ref")
    cfg = apply_preset("tiny")
    for k, v in TRAIN.items():
        setattr(cfg, k, v)
    out = root / "full"
    snaps: dict[int, dict[str, torch.Tensor]] = {}

    def snapshot(step: int) -> None:
        snaps[step] = _tensors(out)

    t0 = time.monotonic()
    trainer = Trainer(cfg, out, torch.device("cpu"), Console(stderr=True, quiet=True))
    trainer.run(on_checkpoint=snapshot)
    seconds = time.monotonic() - t0
    final = _tensors(out)  # the finished checkpoint: no optimizer state (it cannot be resumed)
    assert sorted(snaps) == list(range(1, trainer.total_steps))  # the last step's save is the finished one
    results = json.loads((out / "cbtool.json").read_text())["training"]["results"]
    return {"snaps": snaps, "final": final, "results": results, "seconds": seconds,
            "total": trainer.total_steps}


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_train_killed_then_resumed_equals_uninterrupted(seed, train_reference, tmp_path):
    out = tmp_path / "ck"
    # kill some time after the first checkpoint appeared: anywhere in training, saving or evaluation
    delay = random.Random(seed).uniform(0.0, 1.2 * train_reference["seconds"])
    _, rc = _kill_after([*CLI, *_train_args(out)], out / "cbtool.json", delay, tmp_path)

    info = run_cli("info", out, "--json")
    assert info.exit_code in (0, 2), info.output
    if info.exit_code == 2:  # refused: one line, and nothing that loads
        assert info.stderr.startswith("cbtool: error: ") and info.stderr.count("\n") == 1
        with pytest.raises(UserError):
            load_checkpoint(out)
    else:  # loads: it must be exactly the reference's checkpoint of that step
        training = json.loads(info.stdout)["training"]
        step = training["step"]
        want = train_reference["final"] if training.get("finished") else train_reference["snaps"][step]
        _assert_same(_tensors(out), want, f"killed checkpoint at step {step}")
    # nothing but checkpoints and hidden temporaries beside it
    assert {p.name for p in tmp_path.iterdir() if not p.name.startswith(".")} <= {"ck"}

    meta = json.loads((out / "cbtool.json").read_text()) if (out / "cbtool.json").is_file() else None
    if meta is None:
        res = run_cli(*_train_args(out))
    elif meta["training"]["finished"]:
        res = run_cli("train", "--resume", "--out", out, "--device", "cpu")
        assert res.exit_code == 2 and "already finished" in res.stderr
        res = None
    else:
        res = run_cli("train", "--resume", "--out", out, "--device", "cpu")
    if res is not None:
        assert res.exit_code == 0, res.output
    _assert_same(_tensors(out), train_reference["final"], f"seed {seed}: resumed run (killed rc {rc})")
    results = json.loads((out / "cbtool.json").read_text())["training"]["results"]
    for label in ("on", "bypassed"):
        assert results[label] == train_reference["results"][label]


def test_interrupted_swap_is_recovered_by_resume(tmp_path, tiny_checkpoint_master):
    """A writer killed between its two renames leaves only `.NAME.old-PID`: resume and readers put it back."""
    out = tmp_path / "ck"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shutil.copytree(tiny_checkpoint_master, tmp_path / f".ck.old-{dead.pid}")
    (tmp_path / ".ck.tmp-half").mkdir()  # the new checkpoint, half written
    res = run_cli("info", out)
    assert res.exit_code == 0, res.output
    assert (out / "cbtool.json").read_bytes() == (tiny_checkpoint_master / "cbtool.json").read_bytes()
    # another live writer's swap in progress is left alone
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        shutil.move(out, tmp_path / f".ck.old-{live.pid}")
        res = run_cli("info", out)
        assert res.exit_code == 2 and "does not exist" in res.stderr
        assert (tmp_path / f".ck.old-{live.pid}" / "cbtool.json").is_file()
    finally:
        live.kill()
        live.wait()
    assert run_cli("train", "--resume", "--out", out).exit_code == 2  # restored, and finished already
    assert (out / "cbtool.json").is_file()


# -- embed ---------------------------------------------------------------------------------------------

EMBED = ["--num-seqs", "24", "--shard-tokens", "256", "--batch-size", "2", "--device", "cpu"]


def _store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(store).parts)}


@pytest.fixture(scope="module")
def embed_reference(tiny_checkpoint_master, tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-embed-ref") / "codes"
    t0 = time.monotonic()
    res = run_cli("embed", tiny_checkpoint_master, "--out", out, *EMBED)
    assert res.exit_code == 0, res.output
    files = _store_files(out)
    assert sum(name.endswith("shard.json") for name in files) == 12
    return {"files": files, "seconds": time.monotonic() - t0}


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_embed_killed_then_rerun_equals_uninterrupted(seed, embed_reference, tiny_checkpoint_master, tmp_path):
    out = tmp_path / "codes"
    delay = random.Random(100 + seed).uniform(0.0, 1.5 * embed_reference["seconds"])
    _kill_after([*CLI, "embed", str(tiny_checkpoint_master), "--out", str(out), *EMBED], out / "manifest.json",
                delay, tmp_path)
    ref = embed_reference["files"]
    # after the kill: refused as incomplete, or complete and equal to the reference
    try:
        Store(out)
    except UserError as e:
        assert "incomplete" in str(e) or "does not exist" in str(e), e
        r = run_cli("dead-codes", out)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1
    else:
        assert _store_files(out) == ref
    # every shard already there is whole and equals the reference's
    now = _store_files(out)
    for name in now:
        if name != "manifest.json" and not name.endswith(".lock"):
            assert now[name] == ref[name], name
    res = run_cli("embed", tiny_checkpoint_master, "--out", out, *EMBED)
    assert res.exit_code == 0, res.output
    assert _store_files(out) == ref  # byte for byte, no lock left behind
    assert not [p for p in out.iterdir() if p.name.startswith(".shard")]  # the killed writer's temp dir is gone
