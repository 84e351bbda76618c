"""Continuing a training run: which options `train --resume` may change, and what an interrupted run tells
the user (README.md "Exit codes").

`--resume` continues the run stored in the checkpoint. An option given with it either agrees with the stored
run, or is one that may change (MAY_CHANGE: how long phase 2 lasts, how often to save and log, whether the
final save keeps the optimizer) and is applied and announced, or conflicts: the whole command is refused
with one line naming every conflicting option (exit 2). Only options the user gave count; the CLI passes
only those (cbtool/commands/train.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cbtool.errors import UserError
from cbtool.training.config import SHAPE_OPTIONS  # the model shape, stored inside config["model"]

# TrainConfig fields a resumed run may change: none alters what the steps already taken computed
MAY_CHANGE = ("steps", "checkpoint_every", "log_every", "keep_optimizer")
PATH_OPTIONS = ("corpus", "base_model")  # stored resolved: compared as resolved paths


def _flag(name: str) -> str:
    return SHAPE_OPTIONS.get(name) or "--" + name.replace("_", "-")


def _same(name: str, given: Any, stored: Any) -> bool:
    if name in PATH_OPTIONS and isinstance(given, str) and isinstance(stored, str) and Path(given).exists():
        return str(Path(given).resolve()) == str(Path(stored).resolve())
    if isinstance(given, float) or isinstance(stored, float):
        return isinstance(stored, int | float) and not isinstance(stored, bool) and float(given) == float(stored)
    return given == stored


def reconcile(training: dict[str, Any], preset: str | None, options: dict[str, Any]) -> tuple[dict[str, Any],
                                                                                                list[str]]:
    """The stored run's `training` metadata (cbtool.json) against the options given with --resume: the
    changes to apply (TrainConfig field -> value) and one announcement per change. A conflicting option,
    or a --steps that ends before the step already reached, is refused with one UserError line."""
    config = training.get("config") if isinstance(training.get("config"), dict) else {}
    given = {k: v for k, v in options.items() if v is not None}
    conflicts = []
    if preset is not None and preset != training.get("preset"):
        stored = training.get("preset")
        conflicts.append(f"--preset {preset} (the run's: {stored})" if stored is not None
                         else f"--preset {preset} (the checkpoint does not record its preset)")
    changes: dict[str, Any] = {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    config = {**config, **{k: model[k] for k in SHAPE_OPTIONS if k in model}}
    for name, value in given.items():
        if name not in config or _same(name, value, config[name]):
            continue
        if name in MAY_CHANGE:
            changes[name] = value
        else:
            conflicts.append(f"{_flag(name)} {value} (the run's: {config[name]})")
    if conflicts:
        raise UserError(f"--resume continues the stored run; these options conflict with it: {'; '.join(conflicts)}. "
                        f"Only {', '.join(map(_flag, MAY_CHANGE))} may change on --resume; train a new run "
                        f"(--overwrite, or another --out) to change the others")
    notes = []
    if "steps" in changes:
        step, base = training.get("step"), config.get("base_steps")
        if isinstance(step, int) and isinstance(base, int) and base + changes["steps"] < step:
            raise UserError(f"--steps {changes['steps']} ends at step {base + changes['steps']}, but the run is "
                            f"already at step {step}; give at least {step - base}")
        notes.append(f"--steps {config['steps']} -> {changes['steps']} (the codebook phase's learning-rate "
                     f"schedule follows the new length from here on)")
    notes += [f"{_flag(k)} {config[k]} -> {v}" for k, v in changes.items() if k != "steps"]
    return changes, notes


def check_train_state(state: dict[str, Any], bad: str, codebooks: dict[str, Any]) -> None:
    """A stored training state as `train --resume` will use it, checked in one pass (one UserError line, `bad`
    first): every floating tensor finite, the trainer's counters single non-negative finite numbers, usage
    counts (groups, C) and revival samples (n, groups, dim) of the codebooks they belong to."""
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.is_complex():
            raise UserError(f"{bad} ({key} is not a real tensor)")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise UserError(f"{bad} ({key} holds NaN or infinite values)")
        if key.startswith(("trainer.", "metrics.revived", "metrics.tokens")):
            if t.numel() != 1 or float(t) < 0:
                raise UserError(f"{bad} ({key} must be one non-negative number)")
    for cb_key, cb in codebooks.items():
        usage, recent = state.get(f"usage.{cb_key}"), state.get(f"recent.{cb_key}")
        if usage is not None and (tuple(usage.shape) != tuple(cb.usage.shape) or not usage.is_floating_point()
                                  and usage.dtype not in (torch.int32, torch.int64)):
            raise UserError(f"{bad} (usage.{cb_key} has shape {tuple(usage.shape)} and dtype "
                            f"{str(usage.dtype).removeprefix('torch.')}; expected {tuple(cb.usage.shape)})")
        want = (cb.codes.shape[0], cb.codes.shape[-1])
        if recent is not None and (recent.dim() != 3 or (recent.shape[1], recent.shape[2]) != want
                                   or not recent.is_floating_point()):
            raise UserError(f"{bad} (recent.{cb_key} has shape {tuple(recent.shape)}; expected (n, {want[0]}, "
                            f"{want[1]}))")


def saved_line(target: Path, saved_step: int | None, total_steps: int | None, resuming: bool) -> str:
    """What an interrupted `train` left at `target` and how to continue (cbtool/util/signals.py prints it)."""
    again = f"cbtool train --resume --out {target}"
    if saved_step is None:
        if resuming:
            return f"the checkpoint at {target} is as it was; continue with: {again}"
        return f"nothing was saved yet (no checkpoint written to {target} by this run)"
    if total_steps is not None and saved_step >= total_steps:
        return f"the finished checkpoint is at {target}"
    return f"the last checkpoint, step {saved_step}/{total_steps}, is at {target}; continue with: {again}"
