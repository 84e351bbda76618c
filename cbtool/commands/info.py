"""`cbtool info`: what a checkpoint or a code store holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from cbtool.commands.common import RUN_OPTION_HELP, default_checkpoint, emit_json, out
from cbtool.formats.store import MANIFEST, checkpoint_status, read_manifest
from cbtool.tasks.base import format_metrics
from cbtool.training import metrics_file as metrics_log


def info(
    path: Path | None = typer.Argument(None, help="Checkpoint or code store directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """What a checkpoint holds (model, sites, C, k, training summary, file hashes) or a code store holds
    (tokens, docs, shards, sites, labels, and whether its checkpoint is unchanged).

    Examples:
      cbtool info
      cbtool info runs/a/checkpoint --json
      cbtool info cbtool-run/codes
    """
    if path is not None and (Path(path) / MANIFEST).is_file():
        _store_info(Path(path), as_json)
        return
    ckpt = load_checkpoint(default_checkpoint(path, run))
    meta = ckpt.meta
    training = meta.get("training") or {}
    if as_json:
        emit_json("info", {"path": str(ckpt.path), "sha256": ckpt.sha256, **meta,
                           "sites": list(ckpt.model.sites), "metrics_log": metrics_log.summary(ckpt.path)})
        return
    version = f"format {meta['format_version']}, cbtool {meta.get('cbtool_version')}"
    out.print(f"[bold]checkpoint[/] {ckpt.path}  ({version})")
    model = meta["model"]
    desc = _fields(model.get("config") or {k: v for k, v in model.items() if k != "kind"})
    out.print(f"[bold]model[/] {model.get('kind')}: {escape(desc)}", soft_wrap=True)
    if meta.get("task"):
        out.print(f"[bold]task[/] {escape(_fields(meta['task']))}", soft_wrap=True)
    table = Table(title="codebooks")
    for col in ("module", "sites", "C", "dim", "k", "similarity"):
        table.add_column(col)
    for spec in ckpt.model.specs:
        names = spec.site_names
        shown = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} heads)"
        table.add_row(spec.key, shown, str(spec.num_codes), str(spec.dim), str(spec.k), "cosine")
    out.print(table)
    if training:
        res = training.get("results") or {}
        line = f"[bold]training[/] step {training.get('step')}/{training.get('total_steps')}, "
        line += f"{training.get('seconds')} s on {training.get('device')}"
        line += "" if training.get("finished") else "  [yellow](unfinished: cbtool train --resume)[/]"
        out.print(line)
        for label in ("on", "bypassed"):
            if label in res:
                out.print(f"  codebooks {label:8s} {format_metrics(ckpt.task, res[label])}")
    log = metrics_log.summary(ckpt.path)
    if log:
        out.print(f"[bold]metrics log[/] {log['path']} ({log['rows']} rows, steps {log['first_step']}-"
                  f"{log['last_step']}; `cbtool eval --plot curves.png` or `cbtool report` draws it)")
    files = Table(title="files")
    files.add_column("file")
    files.add_column("sha256")
    for name, digest in meta["files"].items():
        files.add_row(name, digest)
    out.print(files)


def load_checkpoint(path: Path, **kwargs: Any) -> Any:
    """cbtool.formats.checkpoint.load_checkpoint, imported (with torch) only when a checkpoint is read: a
    store's info needs neither."""
    from cbtool.formats.checkpoint import load_checkpoint as load

    return load(path, **kwargs)


def _fields(d: dict) -> str:
    """`key=value, ...` for people; nested values as compact JSON."""
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in d.items())


def _store_info(path: Path, as_json: bool) -> None:
    man = read_manifest(path)
    ck = man["checkpoint"]
    status = checkpoint_status(path, man)
    sites = [e for e in man["sites"] if isinstance(e, dict)]
    if as_json:
        emit_json("store_info", {"path": str(path), "checkpoint_status": status, **man})
        return
    state = "complete" if man.get("complete") else "[yellow]incomplete: re-run `cbtool embed` to finish it[/]"
    out.print(f"[bold]code store[/] {path}  (format {man.get('format_version')}, {state})")
    if man.get("complete"):
        out.print(f"[bold]tokens[/] {man.get('tokens'):,} in {man.get('docs'):,} documents, "
                  f"{man.get('num_shards')} shard(s)")
    sae = man.get("sae")
    if isinstance(sae, dict):  # embedded through an SAE (docs/formats.md "SAE stores")
        tr = sae.get("truncation") or {}
        kept = (f"k = {sae.get('k')} (TopK)" if sae.get("k_fixed") else
                f"k_max = {sae.get('k')}, dropped {tr.get('dropped_latent_share', 0):.1%} of active latents, "
                f"{tr.get('dropped_mass_share', 0):.1%} of activation mass")
        out.print(f"[bold]SAE[/] {escape(str(sae.get('absolute_path')))} ({sae.get('format')} "
                  f"{sae.get('architecture')}, {sae.get('d_sae')} latents at {sae.get('site')}, {kept})",
                  soft_wrap=True)
        base = man.get("base_model") or {}
        out.print(f"[bold]base model[/] {escape(str(base.get('path')))} ({base.get('kind')})", soft_wrap=True)
    else:
        out.print(f"[bold]checkpoint[/] {ck.get('path')} ({status})")
    if man.get("corpus") is not None:
        corpus = man["corpus"]
        out.print(f"[bold]corpus[/] {escape(_fields(corpus) if isinstance(corpus, dict) else str(corpus))}",
                  soft_wrap=True)
    out.print(f"[bold]labels[/] {', '.join(man.get('labels') or []) or 'none'}")
    table = Table(title="sites")
    for col in ("site", "C", "k"):
        table.add_column(col)
    for e in sites:
        table.add_row(str(e.get("name")), str(e.get("num_codes")), str(e.get("k")))
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
