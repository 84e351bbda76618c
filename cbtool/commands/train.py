"""`cbtool train`: train a model with codebooks and write a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from cbtool.checkpoint import load_checkpoint
from cbtool.commands.common import DEVICE_HELP, RUN_OPTION_HELP, default_checkpoint, emit_json, err, out
from cbtool.errors import UserError
from cbtool.train import Trainer, apply_preset, resolve_device


def train(
    task: str = typer.Option("tokfsm", "--task", help="Training task: tokfsm."),
    preset: str = typer.Option("default", "--preset", help="default (CPU, ~6 min), paper (20k steps x 512, GPU), tiny."),
    sites: str | None = typer.Option(None, "--sites", help="Where codebooks go: attn-heads,mlp (default), attn, "
                                     "mlp, 2.mlp, 0-1.attn, or a layer list 0,2."),
    num_codes: int | None = typer.Option(None, "--num-codes", help="Codes per codebook (C)."),
    k: int | None = typer.Option(None, "--k", help="Codes selected per token."),
    base_steps: int | None = typer.Option(None, "--base-steps", help="Phase 1: plain transformer steps "
                                          "(0 = train codebooks from scratch with the model)."),
    steps: int | None = typer.Option(None, "--steps", help="Phase 2: codebook training steps."),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr", help="Phase 1 learning rate."),
    codebook_lr: float | None = typer.Option(None, "--codebook-lr", help="Phase 2 learning rate."),
    mse_coef: float | None = typer.Option(None, "--mse-coef", help="Weight of the reconstruction MSE."),
    commit_coef: float | None = typer.Option(None, "--commit-coef", help="Weight of the commitment term."),
    train_base: bool | None = typer.Option(None, "--train-base/--freeze-base",
                                           help="Phase 2: also fine-tune the base weights."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Save every N steps (0: never)."),
    seed: int | None = typer.Option(None, "--seed"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    out_dir: Path | None = typer.Option(None, "--out", help="Checkpoint directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run at --out exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing checkpoint at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON document."),
) -> None:
    """Train a transformer with codebooks (TokFSM by default) and write a checkpoint.

    Examples:
      cbtool train                          # the default: ~6 min on a laptop CPU, >= 95% accuracy
      cbtool train --sites mlp --num-codes 2000 --k 2 --out runs/mlp
      cbtool train --preset paper --device cuda
      cbtool train --resume                 # after an interruption
    """
    target = default_checkpoint(out_dir, run)
    dev = resolve_device(device)
    if resume:
        if not target.exists():
            raise UserError(f"nothing to resume: {target} does not exist")
        ckpt = load_checkpoint(target, with_train_state=True)
        trainer = Trainer.resume(ckpt, target, dev, err)
        if trainer.step >= trainer.total_steps:
            raise UserError(f"{target} is already finished ({trainer.step} steps); nothing to resume")
        err.print(f"resuming {target} at step {trainer.step}/{trainer.total_steps}")
    else:
        check_target(target, overwrite)
        cfg = apply_preset(preset)
        overrides = {"task": task, "sites": sites, "num_codes": num_codes, "k": k, "base_steps": base_steps,
                     "steps": steps, "batch_size": batch_size, "lr": lr, "codebook_lr": codebook_lr,
                     "mse_coef": mse_coef, "commit_coef": commit_coef, "train_base": train_base,
                     "checkpoint_every": checkpoint_every, "seed": seed}
        for name, value in overrides.items():
            if value is not None:
                setattr(cfg, name, value)
        trainer = Trainer(cfg, target, dev, err)
        err.print(f"training {cfg.task} on {dev}: {len(trainer.model.sites)} sites, C={cfg.num_codes}, k={cfg.k}, "
                  f"{cfg.base_steps} base + {cfg.steps} codebook steps -> {target}")
    results = trainer.run()
    if as_json:
        emit_json("train", {"checkpoint": str(target), "results": results})
        return
    on, off = results["on"], results["bypassed"]
    out.print(f"checkpoint: {target}  ({results['train_seconds']:.0f} s of training)")
    out.print(f"transition accuracy  codebooks on {on['transition_accuracy']:.3f}   "
              f"bypassed {off['transition_accuracy']:.3f}")
    out.print(f"loss (nats/token)    codebooks on {on['loss']:.4f}  bypassed {off['loss']:.4f}")


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse before any work to replace what the user has, unless asked to."""
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not (target / "cbtool.json").is_file():
            raise UserError(f"--out {target} exists and is not a cbtool checkpoint; refusing to replace it")
        if not overwrite:
            raise UserError(f"checkpoint {target} exists; pass --overwrite to replace it or --resume to continue it")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
