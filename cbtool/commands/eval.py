"""`cbtool eval`: loss and accuracy with codebooks on vs bypassed, and code usage per site."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from cbtool.commands.common import DEVICE_HELP, RUN_OPTION_HELP, default_checkpoint, emit_json, err, out
from cbtool.errors import UserError
from cbtool.report import plots
from cbtool.report.plots import check_plot_path
from cbtool.training import metrics_file as metrics_log
from cbtool.util.limits import MAX_SAMPLES

if TYPE_CHECKING:
    from cbtool.formats.checkpoint import Checkpoint


def evaluate(
    path: Path | None = typer.Argument(None, help="Checkpoint directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    samples: int = typer.Option(512, "--samples", help="TokFSM: sampled sequences for transition accuracy."),
    temperature: float = typer.Option(1.0, "--temperature", help="TokFSM: sampling temperature (0 = greedy)."),
    seed: int = typer.Option(0, "--seed", help="TokFSM: seed of the sampled sequences."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    blocks: int = typer.Option(256, "--blocks", help="Text checkpoints: held-out blocks for the LM loss."),
    context_use: Path | None = typer.Option(None, "--context-use", help="Text checkpoints: also measure how much "
                                            "the model reads topic context, for the topics in FILE ('NAME: REGEX' "
                                            "lines, e.g. fixtures/topics/shakespeare.txt) on held-out text."),
    context_window: int = typer.Option(100, "--context-window", help="--context-use: a topic word counts as in "
                                       "context when another one begins within this many tokens before it."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw the training curves (metrics log) and the "
                                     "on/bypassed loss to FILE.png or FILE.svg (needs matplotlib)."),
) -> None:
    """Loss and accuracy with codebooks ON vs BYPASSED, and the share of codes that fire per site.

    Examples:
      cbtool eval
      cbtool eval runs/a/checkpoint --samples 2048 --json
      cbtool eval --plot curves.png
      cbtool eval --context-use fixtures/topics/shakespeare.txt   # does the model read topic context?
    """
    from cbtool.analysis.context_use import read_topics  # torch: imported when the command runs
    from cbtool.formats.checkpoint import load_checkpoint
    from cbtool.model.devices import resolve_device
    from cbtool.tasks.tokfsm import TokFSM

    plot = check_plot_path(plot)
    if not 1 <= samples <= MAX_SAMPLES:
        raise UserError(f"--samples must be in 1..{MAX_SAMPLES:,}, got {samples}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if blocks < 1:
        raise UserError(f"--blocks must be >= 1, got {blocks}")
    topics = None
    if context_use is not None:
        if context_window < 1:
            raise UserError(f"--context-window must be >= 1, got {context_window}")
        topics = read_topics(str(context_use))
    dev = resolve_device(device)
    ckpt = load_checkpoint(default_checkpoint(path, run), device=dev)
    task = ckpt.task
    if topics is not None and isinstance(task, TokFSM):
        raise UserError("--context-use measures topic words in text: give a text checkpoint")
    res = task.evaluate(ckpt.model, dev, samples=samples, seed=seed, temperature=temperature, blocks=blocks)
    if topics is not None:
        res["context_use"] = _context_use(ckpt, topics, context_window, dev, context_use)
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
    if "context_use" in res:
        out.print(_context_table(res["context_use"]))
    _plot(ckpt, res, plot)


def _context_use(ckpt: Checkpoint, topics: dict[str, str], window: int, dev: Any, source: Path) -> dict[str, Any]:
    """Context use with codebooks on and bypassed, on the checkpoint's held-out documents."""
    from cbtool.analysis.context_use import context_use
    docs = list(ckpt.task.corpus(split="heldout").documents)
    res: dict[str, Any] = {}
    for label, enabled in (("on", True), ("bypassed", False)):
        ckpt.model.set_enabled(enabled)
        try:
            res[label] = context_use(ckpt.model, docs, topics, window, dev)
        finally:
            ckpt.model.set_enabled(True)
    absent = [name for name, r in res["on"]["topics"].items() if r["with"] + r["without"] == 0]
    if absent:
        raise UserError(f"--context-use {source}: {', '.join(absent)} never occur(s) in the held-out text with "
                        f"{window} tokens before them; choose words the corpus has or a smaller --context-window")
    return res


def _context_table(cu: dict[str, Any]) -> Table:
    table = Table(title=f"context use: log-prob of a topic word with another of its topic in the previous "
                        f"{cu['on']['window']} tokens minus without ({cu['on']['documents']} held-out documents)")
    for col in ("topic", "with", "without", "log-prob with", "log-prob without", "gain (bypassed)", "gain (on)"):
        table.add_column(col, justify="left" if col == "topic" else "right")

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:+.3f}" if x == x else "-"

    for name, r in cu["bypassed"]["topics"].items():
        table.add_row(name, f"{r['with']:,}", f"{r['without']:,}", f(r["logprob_with"]), f(r["logprob_without"]),
                      f(r["gain"]), f(cu["on"]["topics"][name]["gain"]))
    table.add_row("mean", "", "", "", "", f(cu["bypassed"]["mean_gain"]), f(cu["on"]["mean_gain"]))
    return table


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
