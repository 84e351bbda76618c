"""Shared pieces of the commands: the run directory, consoles, JSON output."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from cbtool.formats.store import Store, open_store
from cbtool.util import strict_json
from cbtool.util.limits import env_columns, env_path
from cbtool.util.safe_text import SafeConsole as Console  # data strings never reach the terminal raw

SCHEMA_VERSION = 1

# results: stdout. Piped or redirected, tables get room for their natural width (up to 200 columns, or
# $COLUMNS) instead of the 80 columns rich assumes, so headers and samples are not cut or wrapped.
PIPED_WIDTH = 200
out = Console(highlight=False, soft_wrap=True,
              width=None if sys.stdout is not None and sys.stdout.isatty() else env_columns() or PIPED_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # logs: stderr, one line per message


def _closed_stdout() -> None:
    """rich would exit 1 when the reader of stdout is gone; the CLI ends quietly with 0 (docs/cli.md)."""
    out.quiet = True
    raise BrokenPipeError(errno.EPIPE, "stdout was closed")


out.on_broken_pipe = _closed_stdout  # type: ignore[method-assign]


def keep_whole(table: Table, *names: str) -> Table:
    """Cells of the named columns (code ids, ready-to-paste queries) are never cut (`1.m…`) or wrapped: those
    columns get the width of their longest cell and rich narrows the others. Call after adding the rows."""
    from rich.measure import Measurement

    for column in table.columns:
        if column.header in names:
            widths = [Measurement.get(out, out.options, cell).maximum for cell in column.cells]
            column.no_wrap, column.min_width = True, max(widths, default=1)
    return table


def run_dir(run: Path | None) -> Path:
    """`--run DIR`, else $CBTOOL_RUN, else ./cbtool-run."""
    if run is not None:
        return Path(run)
    return Path(env_path("CBTOOL_RUN") or "cbtool-run")


def default_checkpoint(path: Path | None, run: Path | None) -> Path:
    return Path(path) if path is not None else run_dir(run) / "checkpoint"


def default_store(path: Path | None, run: Path | None) -> Path:
    return Path(path) if path is not None else run_dir(run) / "codes"


def open_run_store(path: Path | None, run: Path | None) -> Store:
    """The store at `path` (default RUN/codes), refused when its checkpoint changed; a warning on stderr
    when that cannot be checked."""
    return open_store(default_store(path, run), warn=lambda line: err.print(f"warning: {line}", soft_wrap=True))


def emit_json(kind: str, doc: dict[str, Any]) -> None:
    """One JSON document on stdout, with schema_version and kind (non-finite numbers as null)."""
    print(strict_json.dumps({"schema_version": SCHEMA_VERSION, "kind": kind, **doc}, indent=2))


def emit_jsonl(rows: list[dict[str, Any]]) -> None:
    for row in rows:
        print(strict_json.dumps(row))


RUN_OPTION_HELP = "Run directory (default $CBTOOL_RUN or ./cbtool-run)."
DEVICE_HELP = "auto, cpu or cuda."
