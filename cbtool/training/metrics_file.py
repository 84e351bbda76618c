"""Reading a checkpoint's training metrics log, `metrics.jsonl` (rows described in metrics_log.py), without
torch: `info` and `eval --plot` read it; cbtool/training/metrics_log.py, which writes it, re-exports these."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cbtool.errors import UserError
from cbtool.util import strict_json
from cbtool.util.files import read_text

FILE = "metrics.jsonl"
DEFAULT_EVERY = 10


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics log file (a checkpoint's `metrics.jsonl`); [] when the checkpoint has none."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        return []
    text = read_text(path, "metrics log")
    rows = [strict_json.loads(line, f"metrics log {path} line {i}")
            for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in rows):
        raise UserError(f"{path} is not a cbtool metrics log (a row has no integer 'step')")
    return rows


def summary(ckpt_path: Path) -> dict[str, Any] | None:
    """Where a checkpoint's metrics log is and what it covers (for `eval --json` and `info`)."""
    rows = read_metrics(ckpt_path)
    if not rows:
        return None
    return {"path": str(Path(ckpt_path) / FILE), "rows": len(rows), "first_step": rows[0]["step"],
            "last_step": rows[-1]["step"], "last": rows[-1]}
