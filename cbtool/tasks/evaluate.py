"""Evaluation harness shared by every task: mean loss, codebooks on vs bypassed, code usage.

Each task (cbtool/tasks/tokfsm.py, cbtool/tasks/text.py) measures its own figures with these."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.nn import functional as F

from cbtool.model.sites import CodebookModel
from cbtool.util import progress


@torch.no_grad()
def mean_loss(model: CodebookModel, batches: Iterable[torch.Tensor], device) -> float:
    """Mean next-token cross-entropy (nats/token) over batches of (n, L) token ids."""
    total, count = 0.0, 0
    for chunk in batches:
        tokens = chunk.to(device)
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += tokens[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def code_usage(model: CodebookModel, batches: Iterable[torch.Tensor], device) -> dict[str, float]:
    """Fraction of each site's codes that fire at least once on batches of (n, L) token ids."""
    cbs = [cb for _, cb in model.items()]
    for cb in cbs:
        cb.track_usage, _ = True, cb.usage.zero_()
    try:
        for chunk in batches:
            model(chunk[:, :-1].to(device))
        return {name: float((cb.usage[g] > 0).float().mean())
                for spec, cb in model.items() for g, name in enumerate(spec.site_names)}
    finally:
        for cb in cbs:
            cb.track_usage = False
            cb.usage.zero_()


def on_vs_bypassed(
    model: CodebookModel, measure: Callable[[], dict[str, Any]], usage_batches: Iterable[torch.Tensor], device
) -> dict[str, Any]:
    """`measure()` with codebooks on and bypassed, plus code usage; the model's mode is restored."""
    was_training = model.training
    model.eval()
    result: dict[str, Any] = {}
    try:
        with progress.track("eval (codebooks on)", 3, "parts") as bar:
            for label, enabled in (("on", True), ("bypassed", False)):
                model.set_enabled(enabled)
                result[label] = measure()
                bar.advance(1, phase="eval (bypassed)" if enabled else "eval (code usage)")
            model.set_enabled(True)
            result["code_usage"] = code_usage(model, usage_batches, device)
            bar.advance(1)
    finally:
        model.set_enabled(True)
        model.train(was_training)
    return result

