"""Evaluation: loss and TokFSM transition accuracy with codebooks on vs bypassed, code usage."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.nn import functional as F

from cbtool.generate import sample
from cbtool.sites import CodebookModel
from cbtool.tokfsm import BOS, TokFSM

EVAL_SEED = 987_654_321  # held-out data stream, disjoint from any training seed's stream


def fsm_batches(fsm: TokFSM, num_seqs: int, batch_size: int = 64, first_step: int = 0) -> Iterator[torch.Tensor]:
    """Held-out TokFSM sequences (the EVAL_SEED stream) in batches of token ids."""
    for i, lo in enumerate(range(0, num_seqs, batch_size)):
        yield fsm.step_batch(min(batch_size, num_seqs - lo), EVAL_SEED, first_step + i)[0]


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
def fsm_accuracy(
    model: CodebookModel, fsm: TokFSM, num_samples: int, device, seed: int = 0,
    digits: int = 64, temperature: float = 1.0, batch_size: int = 256,
) -> float:
    """Share of sampled state transitions that are edges of the FSM (generation from BOS)."""
    digits = min(digits, fsm.spec.seq_len - 1)
    gen = torch.Generator().manual_seed(seed)
    valid = total = 0
    for lo in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - lo)
        prompt = torch.full((n, 1), BOS, dtype=torch.long, device=device)
        out = sample(model, prompt, digits, gen, temperature=temperature)
        v, t = fsm.transition_accuracy(out)
        valid, total = valid + v, total + t
    return valid / max(total, 1)


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
        for label, enabled in (("on", True), ("bypassed", False)):
            model.set_enabled(enabled)
            result[label] = measure()
        model.set_enabled(True)
        result["code_usage"] = code_usage(model, usage_batches, device)
    finally:
        model.set_enabled(True)
        model.train(was_training)
    return result


def evaluate_fsm(
    model: CodebookModel, fsm: TokFSM, device, num_samples: int = 512, num_seqs: int = 256,
    seed: int = 0, temperature: float = 1.0,
) -> dict[str, Any]:
    """The 'modest degradation' figure: loss and transition accuracy, codebooks on and bypassed."""

    def measure() -> dict[str, Any]:
        return {
            "loss": mean_loss(model, fsm_batches(fsm, num_seqs), device),
            "transition_accuracy": fsm_accuracy(model, fsm, num_samples, device, seed, temperature=temperature),
            "greedy_accuracy": fsm_accuracy(model, fsm, min(num_samples, 64), device, seed, temperature=0.0),
        }

    result = on_vs_bypassed(model, measure, fsm_batches(fsm, num_seqs, first_step=10**6), device)
    result["samples"] = num_samples
    result["temperature"] = temperature
    return result


def evaluate_text(model: CodebookModel, task, device, num_blocks: int = 256) -> dict[str, Any]:
    """LM loss and perplexity on held-out text, codebooks on vs bypassed (`task`: cbtool.text.TextTask)."""
    blocks = task.heldout_blocks[: max(1, num_blocks)]

    def measure() -> dict[str, Any]:
        loss = mean_loss(model, blocks.split(16), device)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    result = on_vs_bypassed(model, measure, blocks.split(16), device)
    result["heldout_tokens"] = int(blocks.shape[0] * (blocks.shape[1] - 1))
    result["loss_increase"] = result["on"]["loss"] - result["bypassed"]["loss"]
    return result
