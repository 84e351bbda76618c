"""`cbtool train`: train a model with codebooks and write a checkpoint."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_type_hints

import typer

from cbtool.commands.common import DEVICE_HELP, RUN_OPTION_HELP, default_checkpoint, emit_json, err, out
from cbtool.training.config import TrainConfig, cli_fields, cli_help
from cbtool.util import signals

if TYPE_CHECKING:
    from cbtool.training.trainer import Trainer


def train(
    ctx: typer.Context,
    preset: str = typer.Option("default", "--preset",
                               help="default (CPU, ~5 min), paper (20k steps x 512, GPU), scratch (codebooks "
                               "trained with the model from step 0: TokFSM for a GPU; text, MLP codebooks, ~3 min "
                               "on a CPU), tiny (seconds). The "
                               "defaults shown below are the TokFSM default preset's; --task text and --base-model "
                               "runs have their own presets (docs/train.md)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str | None = typer.Option(None, "--device-map",
                                          help="auto: spread a --base-model too large for one device over the "
                                          "visible devices (accelerate); each codebook sits on its layer's device."),
    out_dir: Path | None = typer.Option(None, "--out", help="Checkpoint directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run at --out exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing checkpoint at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON document."),
    **options: Any,
) -> None:
    """Train a transformer with codebooks (TokFSM by default) and write a checkpoint.

    Examples:
      cbtool train                          # the default: ~5 min on a 2-core CPU, >= 97.5% accuracy
      cbtool train --site-codes '' --steps 600  # the earlier default: C=1000 everywhere (95.6%)
      cbtool train --sites mlp --num-codes 2000 --k 2 --out runs/mlp
      cbtool train --preset paper --device cuda
      cbtool train --preset scratch --device cuda   # codebooks from step 0, as in the paper (~6 min on a GPU)
      cbtool train --resume                 # after an interruption
      cbtool train --task text              # built-in text model on Shakespeare, <= 10 min on a CPU
      cbtool train --base-model ./pythia-70m --corpus notes.jsonl --text-field body --sites 3.mlp
      cbtool train --base-model ./big-model --device-map auto --sites 20.mlp   # layers over several GPUs
      torchrun --nproc-per-node 2 -m cbtool train   # data-parallel over 2 processes (docs/scaling.md)
    """
    from cbtool.training.resume import saved_line  # torch: imported when a command runs, not for --help
    from cbtool.training.start import start_training

    target = default_checkpoint(out_dir, run)
    given = ctx.get_parameter_source("preset").name not in ("DEFAULT", "DEFAULT_MAP")  # type: ignore[union-attr]
    started: list[Trainer] = []

    def saved() -> str:  # an interrupt's one line (cbtool/util/signals.py)
        t = started[0] if started else None
        return saved_line(target, t.saved_step if t else None, t.total_steps if t else None, resume)

    with signals.describing(saved):
        started.append(start_training(target, preset if given else None, resume=resume, overwrite=overwrite,
                                      device=device, log=err, device_map=device_map,
                                      **options))
        trainer = started[0]
        results = trainer.run()
    if not trainer.world.is_main:  # under torchrun rank 0 reports
        return
    if as_json:
        emit_json("train", {"checkpoint": str(target), "results": results})
        return
    on, off = results["on"], results["bypassed"]
    out.print(f"checkpoint: {target}  ({results['train_seconds']:.0f} s of training)")
    for key, (head, fmt) in trainer.task.metrics.items():
        if key in on:
            out.print(f"{head:<20} codebooks on {on[key]:{fmt}}  bypassed {off[key]:{fmt}}")


def _with_config_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` (which takes **options) one Typer option per CLI field of TrainConfig: the field's
    help, its flag, its type or None (None = the preset's value)."""
    hints = get_type_hints(TrainConfig)
    sig = inspect.signature(command)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    annotations = {p.name: p.annotation for p in params}
    for f in cli_fields():
        kind = next((t for t in get_args(hints[f.name]) if t is not type(None)), hints[f.name]) | None
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        default = typer.Option(None, *flag.split(" "), help=cli_help(f))
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind))
        annotations[f.name] = kind
    command.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    command.__annotations__ = {**annotations, "return": None}
    return command


def register(app: typer.Typer) -> None:
    app.command("train")(_with_config_options(train))
