"""Training through the real CLI: checkpoint written, read back by info/eval, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from cbtool.formats.checkpoint import load_checkpoint
from cbtool.training.config import TrainConfig, apply_preset
from cbtool.training.trainer import Trainer
from tests.helpers import assert_same_training, run_cli


def test_train_writes_checkpoint_that_info_and_eval_read(tiny_checkpoint):
    meta = json.loads((tiny_checkpoint / "cbtool.json").read_text())
    assert meta["format"] == "cbtool-checkpoint"
    assert set(meta["files"]) >= {"codebooks.safetensors", "model.safetensors"}
    assert meta["training"]["finished"] is True
    assert [c["key"] for c in meta["codebooks"]] == ["0.attn.heads", "0.mlp", "1.attn.heads", "1.mlp"]

    res = run_cli("info", tiny_checkpoint, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == 1
    assert "0.attn.h1" in doc["sites"] and "1.mlp" in doc["sites"]

    res = run_cli("eval", tiny_checkpoint, "--json", "--samples", "16", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    ev = json.loads(res.stdout)
    for label in ("on", "bypassed"):
        assert 0.0 <= ev[label]["transition_accuracy"] <= 1.0
        assert ev[label]["loss"] > 0
    assert set(ev["code_usage"]) == set(doc["sites"])
    # codebooks really are in the path: on and bypassed differ
    assert ev["on"]["loss"] != ev["bypassed"]["loss"]


def test_train_uses_run_dir_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run_cli("train", "--preset", "tiny", "--base-steps", "2", "--steps", "2", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / "cbtool-run" / "checkpoint" / "cbtool.json").is_file()
    assert run_cli("info").exit_code == 0


def _train_args(out, *extra):
    return ("train", "--preset", "tiny", "--out", out, "--device", "cpu", "--seed", "3",
            "--checkpoint-every", "10", *extra)


class _Stop(Exception):
    pass


def _interrupted_run(out, stop_at: int) -> None:
    cfg = apply_preset("tiny")
    cfg.seed, cfg.checkpoint_every = 3, 10

    def stop(step: int) -> None:
        if step == stop_at:
            raise _Stop

    trainer = Trainer(cfg, out, torch.device("cpu"), Console(stderr=True, quiet=True))
    with pytest.raises(_Stop):
        trainer.run(on_checkpoint=stop)


@pytest.mark.parametrize("stop_at", [20, 30, 40])  # plain phase; at the pending switch; after it
def test_resume_equals_uninterrupted(tmp_path, stop_at):
    full = tmp_path / "full"
    assert run_cli(*_train_args(full)).exit_code == 0
    part = tmp_path / "part"
    _interrupted_run(part, stop_at)
    meta = json.loads((part / "cbtool.json").read_text())
    assert meta["training"]["step"] == stop_at and meta["training"]["finished"] is False
    res = run_cli("train", "--resume", "--out", part, "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    assert_same_training(full, part)


def test_resume_refuses_finished_and_missing(tmp_path, tiny_checkpoint):
    res = run_cli("train", "--resume", "--out", tiny_checkpoint)
    assert res.exit_code == 2 and "already finished" in res.stderr
    res = run_cli("train", "--resume", "--out", tmp_path / "nothing")
    assert res.exit_code == 2 and "nothing to resume" in res.stderr


def _fixed_batch_mse(trainer: Trainer) -> float:
    tokens = trainer.task.train_batch(16, 999, 0)
    trainer.model.train()
    with torch.enable_grad():
        trainer.model(tokens[:, :-1])
    return trainer.model.aux_loss().item()


def test_codebook_phase_trains_only_codebooks_and_reduces_mse(tmp_path):
    cfg = apply_preset("tiny")
    cfg.base_steps, cfg.steps, cfg.checkpoint_every, cfg.dead_window, cfg.mse_coef = 20, 40, 0, 0, 1.0
    trainer = Trainer(cfg, tmp_path / "ck", torch.device("cpu"), Console(stderr=True, quiet=True))
    for _ in range(cfg.base_steps + 1):  # the plain phase, then the k-means switch and one codebook step
        trainer.train_step()
    base_before = {k: v.clone() for k, v in trainer.model.base.state_dict().items()}
    with torch.no_grad():  # push the codes away from their k-means optimum: training must pull them back
        for cb in trainer.model.codebooks.values():
            cb.codes.add_(0.05 * torch.randn_like(cb.codes))
    before = _fixed_batch_mse(trainer)
    for _ in range(cfg.steps - 1):
        trainer.train_step()
    for k, v in trainer.model.base.state_dict().items():
        assert torch.equal(v, base_before[k]), f"frozen base weight {k} changed"
    assert _fixed_batch_mse(trainer) < 0.8 * before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--k", "0"), "--k"),
        (("--num-codes", str(10**12)), "--num-codes"),
        (("--steps", "-1"), "--steps"),
        (("--batch-size", "0"), "--batch-size"),
        (("--lr", "nan"), "--lr"),
        (("--sites", "7.mlp"), "out of range"),
        (("--sites", "foo"), "foo"),
        (("--task", "nope"), "nope"),
        (("--preset", "huge"), "huge"),
        (("--device", "tpu"), "tpu"),
    ],
)
def test_bad_train_arguments_exit_2_with_one_line(tmp_path, args, needle):
    res = run_cli("train", "--preset", "tiny", "--out", tmp_path / "ck", *args)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and needle in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "ck").exists()


def test_trainconfig_roundtrip():
    cfg = TrainConfig(num_codes=77, k=3)
    assert TrainConfig.from_dict({**cfg.__dict__, "unknown": 1}) == cfg


def test_loaded_checkpoint_matches_trained_model(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    tokens = torch.randint(1, 11, (2, 20))
    logits_on, _ = ckpt.model(tokens)
    ckpt.model.set_enabled(False)
    logits_off, _ = ckpt.model(tokens)
    assert not torch.allclose(logits_on, logits_off)


def test_eval_samples_default_to_the_runs_own(tiny_checkpoint_master):
    """`eval` without --samples samples as many sequences as the run's own final evaluation (tiny: 32), so that
    evaluating a seconds-long run does not cost more than training it; --samples still chooses."""
    own = json.loads((tiny_checkpoint_master / "cbtool.json").read_text())["training"]["config"]["eval_samples"]
    res = run_cli("eval", tiny_checkpoint_master, "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["samples"] == own == 32
    res = run_cli("eval", tiny_checkpoint_master, "--json", "--device", "cpu", "--samples", "8")
    assert res.exit_code == 0 and json.loads(res.stdout)["samples"] == 8, res.output
