"""Reading a checkpoint's training metrics log, `metrics.jsonl` (rows described in metrics_log.py), without
torch: `info` and `eval --plot` read it; cbtool/training/metrics_log.py, which writes it, re-exports these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbtool.errors import UserError
from cbtool.formats.schema import METRICS_ROW, validate
from cbtool.util import strict_json
from cbtool.util.files import read_text

FILE = "metrics.jsonl"
DEFAULT_EVERY = 10


def read_metrics(path: Path, sites: set[str] | None = None) -> list[dict[str, Any]]:
    """Rows of a metrics log file (a checkpoint's `metrics.jsonl`); [] when the checkpoint has none. Each row
    is validated against one schema (formats/schema.py METRICS_ROW: a string where a number belongs is one
    UserError line naming the line and key); with `sites` (the checkpoint's), a row naming another site is
    refused too."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        return []
    text = read_text(path, "metrics log")
    rows = []
    for i, line in enumerate(strict_json.lines(text), 1):
        if not line.strip():
            continue
        where = f"metrics log {path} line {i}"
        row = strict_json.loads(line, where)
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            raise UserError(f"{path} is not a cbtool metrics log (line {i} has no integer 'step')")
        validate(row, METRICS_ROW, where)
        unknown = sorted(set(row.get("sites") or {}) - sites) if sites is not None else []
        if unknown:
            raise UserError(f"{where}: site {unknown[0]!r} is not a site of this checkpoint")
        rows.append(row)
    return rows


def summary(ckpt_path: Path) -> dict[str, Any] | None:
    """Where a checkpoint's metrics log is and what it covers (for `eval --json` and `info`)."""
    rows = read_metrics(ckpt_path)
    if not rows:
        return None
    return {"path": str(Path(ckpt_path) / FILE), "rows": len(rows), "first_step": rows[0]["step"],
            "last_step": rows[-1]["step"], "last": rows[-1]}
