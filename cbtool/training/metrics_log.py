"""The training metrics log: `metrics.jsonl` in the checkpoint, one JSON row per logging step.

Written by `train` every `log_every` steps (and at the last step) and saved with every checkpoint, so it is
hashed in cbtool.json like the other files and `--resume` continues it. A row holds:

- `step`, `phase` (base | codebook), `loss` (task cross-entropy of the step's batch, nats/token),
  `accuracy` (next-token accuracy of the batch), `mse` (the batch's summed reconstruction MSE, codebook phase),
  `lr`, `tokens_per_s` and `seconds` (wall time of the steps since the previous row), `revived` (dead codes
  re-initialised since the previous row);
- TokFSM only: `fsm_valid`, the share of the batch's greedy (argmax) next-token predictions that continue
  the FSM validly (a first digit some out-neighbour of the current state starts with; a second digit that
  completes an out-neighbour) — the task accuracy, which plain next-token accuracy cannot show because
  transitions are random;
- codebook phase: `sites`, per site `mse` (squared error summed over dimensions, averaged over the step's
  tokens, measured after the update) and `live` / `dead` (codes that fired / did not fire on any token of
  the steps since the previous row).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cbtool.errors import UserError
from cbtool.formats.schema import METRICS_ROW, validate
from cbtool.model.codebook import gather_mean, select_topk
from cbtool.model.sites import CodebookModel
from cbtool.tasks.tokfsm import TokFSM
from cbtool.util import strict_json
from cbtool.util.files import read_text

FILE = "metrics.jsonl"
DEFAULT_EVERY = 10


def fsm_valid_rate(fsm: TokFSM, tokens: torch.Tensor, pred: torch.Tensor) -> float:
    """Share of greedy predictions `pred` (n, L-1) for targets tokens[:, 1:] that continue the FSM validly.

    The prefix before each target is the real sequence `tokens` (BOS + digit pairs)."""
    n, length = tokens.shape
    s = fsm.spec.num_states
    digits = (tokens[:, 1:] - 1).cpu()  # target digits at positions 1..L-1
    p = (pred - 1).cpu()
    ok_digit = (p >= 0) & (p <= 9)
    p = p.clamp(0, 9)
    j = torch.arange(length - 1)
    pair, first = j // 2, j % 2 == 0
    npairs = (length - 1) // 2
    states = digits[:, : 2 * npairs].reshape(n, npairs, 2)
    states = states[..., 0] * 10 + states[..., 1]  # (n, pairs) the real states
    prev_idx = (pair - 1).clamp(min=0).clamp(max=max(npairs - 1, 0))
    prev = states[:, prev_idx] if npairs else torch.zeros(n, length - 1, dtype=torch.long)
    has_prev = (pair >= 1).expand(n, -1)
    first_digits = torch.zeros(s, 10, dtype=torch.bool)  # state -> first digits of its out-neighbours
    first_digits[torch.arange(s).unsqueeze(1), fsm.neighbours // 10] = True
    any_first = torch.zeros(10, dtype=torch.bool)
    any_first[torch.arange(s) // 10] = True
    valid_first = torch.where(has_prev, first_digits[prev, p], any_first[p])
    d1 = torch.cat([torch.zeros(n, 1, dtype=torch.long), digits[:, :-1]], 1)  # the real preceding digit
    cand = d1.clamp(0, 9) * 10 + p
    in_range = cand < s
    cand = cand.clamp(max=s - 1)
    valid_second = in_range & torch.where(has_prev, fsm.adjacency[prev, cand], torch.ones_like(in_range))
    valid = ok_digit & torch.where(first.expand(n, -1), valid_first, valid_second)
    return float(valid.float().mean())


@torch.no_grad()
def site_mse(model: CodebookModel) -> dict[str, float]:
    """Per site: reconstruction error of the codebook on its most recent training inputs (as the loss's MSE)."""
    out: dict[str, float] = {}
    for spec, cb in model.items():
        x = cb.recent_inputs
        if x is None or not x.shape[0]:
            continue
        x = x.to(cb.codes.dtype)
        sel = select_topk(x, cb.codes, cb.k, cb.chunk_bytes)
        err = (gather_mean(cb.codes, sel.ids) - x).pow(2).sum(-1).mean(0)  # (G,)
        for g, name in enumerate(spec.site_names):
            out[name] = float(err[g])
    return out


class MetricsLog:
    """Rows of the metrics log plus the per-window accumulators (codes seen firing, revived codes)."""

    def __init__(self, every: int = DEFAULT_EVERY, rows: list[dict[str, Any]] | None = None) -> None:
        self.every = every
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.seen: dict[str, torch.Tensor] = {}  # codebook key -> (G, C) bool: fired since the last row
        self.revived = 0
        self.seconds = 0.0
        self.tokens = 0

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last)

    def attach(self, model: CodebookModel) -> None:
        """Count, on every training forward of an enabled codebook, which codes fired (into the window)."""
        for spec, cb in model.items():
            cb.record = True  # keeps the last selection in cb.last (a reference, no copy)
            cb.register_forward_hook(lambda mod, _inp, _out, key=spec.key: self._fired(key, mod))

    def _fired(self, key: str, cb: Any) -> None:
        if not (cb.enabled and cb.training and torch.is_grad_enabled()) or cb.last is None:
            return
        ids = cb.last.ids.detach()  # (n, G, k)
        g, c = cb.groups, cb.num_codes
        if key not in self.seen or self.seen[key].shape != (g, c):
            self.seen[key] = torch.zeros(g, c, dtype=torch.bool, device=ids.device)
        self.seen[key] = self.seen[key].to(ids.device)
        offsets = torch.arange(g, device=ids.device).view(1, g, 1) * c
        self.seen[key].view(-1)[(ids + offsets).reshape(-1)] = True

    def add_step(self, seconds: float, tokens: int, revived: int) -> None:
        self.seconds += seconds
        self.tokens += tokens
        self.revived += revived

    def record(self, step: int, phase: str, row: dict[str, float], lr: float, model: CodebookModel,
               fsm_valid: float | None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "step": step, "phase": phase, "loss": row["loss"], "accuracy": row["acc"],
            "mse": row["mse"] if phase == "codebook" else None, "lr": lr,
            "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else None,
            "seconds": round(self.seconds, 4), "revived": self.revived,
        }
        if fsm_valid is not None:
            entry["fsm_valid"] = fsm_valid
        if phase == "codebook":
            mse = site_mse(model)
            sites: dict[str, dict[str, Any]] = {}
            for spec in model.specs:
                seen = self.seen.get(spec.key)
                for g, name in enumerate(spec.site_names):
                    live = int(seen[g].sum()) if seen is not None else 0  # fired in the window
                    sites[name] = {"mse": mse.get(name), "live": live, "dead": spec.num_codes - live}
            entry["sites"] = sites
        self.rows.append(entry)
        self.seen, self.revived, self.seconds, self.tokens = {}, 0, 0.0, 0
        return entry

    def to_bytes(self) -> bytes:
        return "".join(strict_json.dumps(r, separators=(",", ":")) + "\n" for r in self.rows).encode("utf-8")

    # the window's accumulators travel in train_state.safetensors, so --resume continues the row exactly
    def state(self) -> dict[str, torch.Tensor]:
        state = {f"metrics.seen.{k}": v.to(torch.uint8).cpu() for k, v in self.seen.items()}
        state["metrics.revived"] = torch.tensor(self.revived)
        state["metrics.tokens"] = torch.tensor(self.tokens)
        return state

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        prefix = "metrics.seen."
        self.seen = {k[len(prefix):]: v.bool() for k, v in state.items() if k.startswith(prefix)}
        self.revived = int(state["metrics.revived"]) if "metrics.revived" in state else 0
        self.tokens = int(state["metrics.tokens"]) if "metrics.tokens" in state else 0


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
