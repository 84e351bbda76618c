"""`cbtool info`: what a checkpoint holds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cbtool.checkpoint import load_checkpoint
from cbtool.commands.common import RUN_OPTION_HELP, default_checkpoint, emit_json, out


def info(
    path: Path | None = typer.Argument(None, help="Checkpoint directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """What a checkpoint holds: model, sites, C, k, training summary, file hashes.

    Examples:  cbtool info    cbtool info runs/a/checkpoint --json
    """
    ckpt = load_checkpoint(default_checkpoint(path, run))
    meta = ckpt.meta
    training = meta.get("training") or {}
    if as_json:
        emit_json("info", {"path": str(ckpt.path), "sha256": ckpt.sha256, **meta,
                           "sites": list(ckpt.model.sites)})
        return
    version = f"format {meta['format_version']}, cbtool {meta.get('cbtool_version')}"
    out.print(f"[bold]checkpoint[/] {ckpt.path}  ({version})")
    model = meta["model"]
    desc = ", ".join(f"{k}={v}" for k, v in (model.get("config") or {}).items())
    out.print(f"[bold]model[/] {model.get('kind')}: {desc}")
    if meta.get("task"):
        out.print(f"[bold]task[/] {meta['task']}")
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
                r = res[label]
                out.print(f"  codebooks {label:8s} loss {r['loss']:.4f}  transition accuracy "
                          f"{r['transition_accuracy']:.3f}")
    files = Table(title="files")
    files.add_column("file")
    files.add_column("sha256")
    for name, digest in meta["files"].items():
        files.add_row(name, digest)
    out.print(files)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
