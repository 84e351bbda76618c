# ruff: noqa: B008  (typer declares options as call defaults)
"""`cbtool report`: one self-contained offline HTML file of a checkpoint and its code store."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from cbtool.commands.common import (
    RUN_OPTION_HELP,
    default_checkpoint,
    default_store,
    err,
    open_run_store,
    out,
    run_dir,
)
from cbtool.errors import UserError
from cbtool.formats.checkpoint_names import META
from cbtool.formats.store import MANIFEST
from cbtool.report.build import Limits, build, write_report
from cbtool.util.files import refuse_overwriting_inputs

LIMITS = Limits()


def _classify(paths: list[Path]) -> tuple[Path | None, Path | None]:
    """[CHECKPOINT] [STORE] in either order, told apart by their cbtool.json / manifest.json."""
    checkpoint = store = None
    for p in paths:
        if (p / MANIFEST).is_file():
            if store is not None:
                raise UserError(f"two code stores given ({store}, {p}); give at most one")
            store = p
        elif (p / META).is_file():
            if checkpoint is not None:
                raise UserError(f"two checkpoints given ({checkpoint}, {p}); give at most one")
            checkpoint = p
        elif not p.exists():
            raise UserError(f"{p} does not exist")
        else:
            raise UserError(f"{p} is neither a cbtool checkpoint ({META}) nor a code store ({MANIFEST})")
    return checkpoint, store


def report(
    paths: list[Path] = typer.Argument(None, metavar="[CHECKPOINT] [STORE]",
                                       help="Checkpoint and/or code store (default RUN/checkpoint, RUN/codes)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    out_path: Path | None = typer.Option(None, "--out", help="HTML file to write (default RUN/report.html)."),
    include: list[Path] = typer.Option([], "--include", help="A --json output of another command to show "
                                       "(intervene --fsm-eval, intervene, explain: on the code cards, "
                                       "find-codes, ...); repeatable."),
    labels: str | None = typer.Option(None, "--labels", help="Labels for the label table and label filters: a "
                                      "stored label name or a file, as find-codes (default: the store's own)."),
    codes_per_site: int = typer.Option(LIMITS.codes_per_site, "--codes-per-site",
                                       help="Code cards per site (its most used codes)."),
    contexts: int = typer.Option(LIMITS.contexts, "--contexts", help="Contexts per code card."),
    context: int = typer.Option(LIMITS.context, "--context", help="Tokens of context on each side."),
    min_count: int = typer.Option(LIMITS.min_count, "--min-count", help="Codes firing on fewer tokens are rare."),
    similar: int = typer.Option(LIMITS.similar, "--similar", help="Nearest codes by vector cosine per code card "
                                "(as show-code --similar; 0 = none)."),
) -> None:
    """One self-contained HTML file (no server, no network, opens from disk): model, sites, training
    curves, code usage per site, a searchable code browser with contexts, the TokFSM state table, and
    included fsm-eval / steering / explain results.

    Examples:
      cbtool report                                       # RUN/checkpoint + RUN/codes -> RUN/report.html
      cbtool report runs/a/checkpoint runs/a/codes --out a.html
      cbtool intervene --fsm-eval --json > fsm.json && cbtool report --include fsm.json
      cbtool explain --json > explain.json && cbtool report --include explain.json   # hypotheses on the cards
    """
    if paths and len(paths) > 2:
        raise UserError(f"expected at most a checkpoint and a store, got {len(paths)} paths")
    checkpoint, store_path = _classify([Path(p) for p in paths or []])
    if not paths:
        checkpoint = default_checkpoint(None, run)
        store_path = default_store(None, run) if (default_store(None, run) / MANIFEST).is_file() else None
        if not (checkpoint / META).is_file():
            raise UserError(f"checkpoint {checkpoint} does not exist (train one with `cbtool train`, or give paths)")
    store = open_run_store(store_path, None) if store_path is not None else None
    if store is not None and checkpoint is None and store.checkpoint_path.name and \
            (store.checkpoint_path / META).is_file():
        checkpoint = store.checkpoint_path  # unchanged since embedding (open_store checked its hash)
    if store is not None and checkpoint is not None:
        store.check_same_checkpoint(checkpoint)
    if store is None:
        err.print("no code store: the report shows the checkpoint only (run `cbtool embed` for codes)")
    limits = Limits(codes_per_site=codes_per_site, contexts=contexts, context=context, min_count=min_count,
                    similar=similar)
    target = Path(out_path) if out_path is not None else run_dir(run) / "report.html"
    if target.is_dir():
        raise UserError(f"--out {target} is a directory; give a file name such as report.html")
    refuse_overwriting_inputs(target, "--out", files=[*include, *([Path(labels)] if labels else [])],
                              dirs=[d for d in (checkpoint, store.path if store else None) if d is not None])
    t0 = time.perf_counter()
    data = build(checkpoint, store, list(include), limits, labels)
    size = write_report(data, target)
    cards = len(data.get("codes") or [])
    err.print(f"{cards:,} code cards, {size / 2**20:.1f} MiB, {time.perf_counter() - t0:.1f} s")
    out.print(f"report written to {target}")


def register(app: typer.Typer) -> None:
    app.command("report")(report)
