"""`cbtool eval`: loss and accuracy with codebooks on vs bypassed, and code usage per site."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cbtool.commands.common import DEVICE_HELP, RUN_OPTION_HELP, default_checkpoint, emit_json, err, out
from cbtool.errors import UserError
from cbtool.formats.checkpoint import Checkpoint, load_checkpoint
from cbtool.model.devices import resolve_device
from cbtool.report import plots
from cbtool.report.plots import check_plot_path
from cbtool.training import metrics_log
from cbtool.util.limits import MAX_SAMPLES


def evaluate(
    path: Path | None = typer.Argument(None, help="Checkpoint directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    samples: int = typer.Option(512, "--samples", help="TokFSM: sampled sequences for transition accuracy."),
    temperature: float = typer.Option(1.0, "--temperature", help="TokFSM: sampling temperature (0 = greedy)."),
    seed: int = typer.Option(0, "--seed", help="TokFSM: seed of the sampled sequences."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    blocks: int = typer.Option(256, "--blocks", help="Text checkpoints: held-out blocks for the LM loss."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the training curves (metrics log) and the "
                                     "on/bypassed loss to FILE.png or FILE.svg (needs matplotlib)."),
) -> None:
    """Loss and accuracy with codebooks ON vs BYPASSED, and the share of codes that fire per site.

    Examples:
      cbtool eval
      cbtool eval runs/a/checkpoint --samples 2048 --json
      cbtool eval --plot curves.png
    """
    plot = check_plot_path(plot)
    if not 1 <= samples <= MAX_SAMPLES:
        raise UserError(f"--samples must be in 1..{MAX_SAMPLES:,}, got {samples}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if blocks < 1:
        raise UserError(f"--blocks must be >= 1, got {blocks}")
    dev = resolve_device(device)
    ckpt = load_checkpoint(default_checkpoint(path, run), device=dev)
    task = ckpt.task
    res = task.evaluate(ckpt.model, dev, samples=samples, seed=seed, temperature=temperature, blocks=blocks)
    if as_json:
        emit_json("eval", {"checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256, **res,
                           "metrics_log": metrics_log.summary(ckpt.path)})
        _plot(ckpt, res, plot)
        return
    table = Table(title=f"{ckpt.path}: codebooks on vs bypassed ({task.eval_setting(res)})")
    table.add_column("", no_wrap=True)
    for head, _ in task.metrics.values():
        table.add_column(head, justify="right")
    for label in ("on", "bypassed"):
        r = res[label]
        table.add_row(f"codebooks {label}", *[f"{r[key]:{fmt}}" for key, (_, fmt) in task.metrics.items()])
    out.print(table)
    out.print(_usage_table(res["code_usage"]))
    _plot(ckpt, res, plot)


def _plot(ckpt: Checkpoint, res: dict, plot: Path | None) -> None:
    if plot is not None:
        plots.training_curves(metrics_log.read_metrics(ckpt.path), res, plot, f"{ckpt.path}: training curves")
        err.print(f"plot written to {plot}")


def _usage_table(code_usage: dict[str, float]) -> Table:
    usage = Table(title="share of codes that fired on held-out data")
    usage.add_column("site")
    usage.add_column("alive", justify="right")
    for name, frac in code_usage.items():
        usage.add_row(name, f"{frac:.1%}")
    return usage


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
