"""Starting a training run: a new one (a preset with options over it) or a stored one resumed exactly, with
the checks before any work and the lock that allows one `train` per --out (docs/train.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cbtool.errors import UserError
from cbtool.formats.checkpoint import (
    load_checkpoint,
    real_target,
    recover_interrupted_swap,
)
from cbtool.model import devices
from cbtool.model.devices import resolve_device
from cbtool.training.config import (
    TrainConfig,
    make_config,
)
from cbtool.training.resume import reconcile
from cbtool.training.trainer import Trainer
from cbtool.util import distributed
from cbtool.util.locks import Lock, acquire


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse before any work to replace what the user has, unless asked to."""
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} exists and is not a directory")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # refuse now rather than after training (nothing could be saved)
        raise UserError(f"cannot write checkpoint to {target}: {parent} is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not (target / "cbtool.json").is_file():
            raise UserError(f"--out {target} exists and is not a cbtool checkpoint; refusing to replace it")
        if not overwrite:
            raise UserError(f"checkpoint {target} exists; pass --overwrite to replace it or --resume to continue it")


def start_training(out: Path, preset: str | None = None, *, resume: bool = False, overwrite: bool = False,
                   device: str | torch.device = "auto", log: Console | None = None, device_map: str | None = None,
                   **options: Any) -> Trainer:
    """A Trainer ready to `run()`: a new run of a preset (default "default") with options (TrainConfig
    fields) over it, writing its checkpoint to `out` (refused if one is there, unless `overwrite`), or with
    `resume` the run at `out`, continued exactly; a preset or options given with `resume` must agree with
    the stored run, but for those cbtool/training/resume.py lets change (applied and logged). `device_map="auto"`
    spreads a pretrained base over the devices (cbtool/model/devices.py)."""
    target = Path(out)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    log = log if log is not None else Console(stderr=True, quiet=True)
    world = distributed.world()
    distributed.agree({"out": str(target.resolve()), "preset": preset, "resume": resume, "overwrite": overwrite,
                       "device": str(dev), "options": options}, "the training options")
    if not world.is_main:  # one log: rank 0's
        log = Console(stderr=True, quiet=True)
    check_target(target, overwrite or resume)
    cfg = None if resume else make_config(preset or "default", **options)
    if cfg is not None:
        cfg.validate()  # bad options are refused before anything is created
        devices.check_device_map(device_map, cfg.base_model is not None)
    lock = acquire_out(target) if world.is_main else None  # rank 0 holds the claim for all ranks
    try:
        trainer = (_start(target, cfg, overwrite, dev, log, device_map) if cfg is not None
                   else _resume(target, dev, log, preset, options, device_map))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.lock = lock
    if cfg is not None:
        trainer.preset = preset or "default"
    return trainer


def acquire_out(target: Path) -> Lock:
    """One `train` per --out at a time: the lock file `.NAME.lock` beside the (real) checkpoint directory."""
    real = real_target(target)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write checkpoint to {target}: {e.strerror or e}") from None
    return acquire(real.parent / f".{real.name}.lock", f"checkpoint {target}")


def _resume(target: Path, dev: torch.device, log: Console, preset: str | None, options: dict[str, Any],
            device_map: str | None = None) -> Trainer:
    """The run at `target` resumed, with the options that may change applied (cbtool/training/resume.py)."""
    distributed.main_first(lambda: recover_interrupted_swap(target))
    if not target.exists():
        raise UserError(f"nothing to resume: {target} does not exist")
    ckpt = load_checkpoint(target, with_train_state=True)
    training = ckpt.meta.get("training")
    changes, notes = reconcile(training if isinstance(training, dict) else {}, preset, options)
    if changes:
        training["config"] = {**training["config"], **changes}
    trainer = Trainer.resume(ckpt, target, dev, log, device_map)
    if trainer.step >= trainer.total_steps:
        raise UserError(f"{target} is already finished ({trainer.step} steps); nothing to resume (a larger "
                        f"--steps continues it)")
    for note in notes:
        log.print(f"resume: {note}", markup=False, highlight=False)
    if not any(k.startswith("opt.") for k in ckpt.train_state or {}):
        log.print("resume: the checkpoint holds no optimizer moments (a finished run drops them unless "
                  "--keep-optimizer): they start again from zero", markup=False, highlight=False)
    log.print(f"resuming {target} at step {trainer.step}/{trainer.total_steps}")
    return trainer


def _start(target: Path, cfg: TrainConfig, overwrite: bool, dev: torch.device, log: Console,
           device_map: str | None = None) -> Trainer:
    """A new run of `cfg`."""
    world = distributed.world()
    check_target(target, overwrite)  # again: another run may have finished while this one waited
    distributed.barrier()  # no rank may see rank 0's first checkpoint here
    trainer = Trainer(cfg, target, dev, log, device_map=device_map)
    sizes = f"C={cfg.num_codes}" + (f" ({cfg.site_codes})" if cfg.site_codes else "")
    ranks = f" x {world.size} ranks" if world.active else ""
    log.print(f"training {cfg.task} on {dev}{ranks}: {len(trainer.model.sites)} sites, {sizes}, k={cfg.k}, "
              f"{cfg.base_steps} base + {cfg.steps} codebook steps -> {target}")
    return trainer
