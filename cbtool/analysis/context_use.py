"""Context use: how much a model reads topic context (`cbtool eval --context-use`, docs/steer.md).

Steering a topic by forcing an attention head's codes can only work where the model reads topic context
through its heads; this is the number that says whether it does, for any text checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from cbtool.analysis.features import match_ranges, tokens_overlapping
from cbtool.errors import UserError
from cbtool.model.sites import CodebookModel
from cbtool.tasks.base import Document
from cbtool.util.files import read_text
from cbtool.util.regexes import UserRegex

__all__ = ["context_use", "read_topics"]

def read_topics(source: str) -> dict[str, str]:
    """Topic word groups from a file of `NAME: REGEX` lines (`#` comments, blank lines skipped); the regexes
    are matched as written (add `(?i)` for case-insensitive). Used by `eval --context-use` and to steer."""
    path = Path(source)
    if not path.is_file():
        raise UserError(f"--context-use {source}: no such file (one 'NAME: REGEX' line per topic)")
    topics: dict[str, str] = {}
    for n, line in enumerate(read_text(path, "--context-use").split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, pattern = line.partition(":")
        if not sep or not name.strip() or not pattern.strip():
            raise UserError(f"{source}:{n}: expected 'NAME: REGEX', got {line[:60]!r}")
        if name.strip() in topics:
            raise UserError(f"{source}:{n}: topic {name.strip()!r} given twice")
        topics[name.strip()] = pattern.strip()
    if not topics:
        raise UserError(f"{source}: no topics (one 'NAME: REGEX' line per topic)")
    return topics


@torch.no_grad()
def context_use(model: CodebookModel, documents: Iterable[Document], topics: dict[str, str], window: int,
                device, batch_size: int = 16) -> dict[str, Any]:
    """How much the model reads topic context: for each topic (a regex over words), the mean log-probability of
    the first token of a match when another match of the same topic begins among the `window` tokens before it,
    minus the same mean when none does. Only matches with `window` tokens of their document before them count,
    so both means see a full window. Documents must fit the model's block. Returns per topic the counts, both
    means and the gain (nats), and `mean_gain` over the topics that have both kinds of occurrence."""
    regexes = {name: UserRegex(p, "--context-use") for name, p in topics.items()}
    sums = {name: {"with": [0.0, 0], "without": [0.0, 0]} for name in topics}
    was_training = model.training
    model.eval()
    docs = [d for d in documents if len(d.tokens) > window]
    try:
        for lo in range(0, len(docs), batch_size):
            chunk = docs[lo: lo + batch_size]
            width = max(len(d.tokens) for d in chunk)
            idx = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, d in enumerate(chunk):
                idx[i, : len(d.tokens)] = torch.from_numpy(np.asarray(d.tokens, dtype=np.int64))
            logits, _ = model(idx.to(device))
            logp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, idx[:, 1:].to(device).unsqueeze(-1))
            logp = logp[..., 0].cpu().numpy()  # logp[i, t - 1]: log-probability of token t of row i
            for i, d in enumerate(chunk):
                bounds = np.array([0, len(d.text)])
                for name, rx in regexes.items():
                    starts, ends = match_ranges(rx, d.text, bounds)
                    firsts = np.flatnonzero(tokens_overlapping(np.asarray(d.spans), starts, ends, "first"))
                    for j, f in enumerate(firsts):
                        if f < window:
                            continue
                        seen = firsts[:j]
                        key = "with" if np.any(seen >= f - window) else "without"
                        sums[name][key][0] += float(logp[i, f - 1])
                        sums[name][key][1] += 1
    finally:
        model.train(was_training)
    rows: dict[str, Any] = {}
    for name, s in sums.items():
        (w_sum, w_n), (o_sum, o_n) = s["with"], s["without"]
        w_mean = w_sum / w_n if w_n else None
        o_mean = o_sum / o_n if o_n else None
        rows[name] = {"regex": topics[name], "with": w_n, "without": o_n, "logprob_with": w_mean,
                      "logprob_without": o_mean,
                      "gain": None if w_mean is None or o_mean is None else w_mean - o_mean}
    gains = [r["gain"] for r in rows.values() if r["gain"] is not None]
    return {"window": window, "documents": len(docs), "topics": rows,
            "mean_gain": sum(gains) / len(gains) if gains else None}
