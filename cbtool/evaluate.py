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
def next_state_distribution(model: CodebookModel, prompts: torch.Tensor, device) -> torch.Tensor:
    """Inputs (n, P) ending in a state's two digits -> (n, 100) the model's distribution over the next
    two-digit state: P(d1) at the last position times P(d2 | d1) (each renormalised over the digits)."""
    n = prompts.shape[0]
    logits1, past = model(prompts.to(device))
    past10 = [(k.repeat_interleave(10, 0), v.repeat_interleave(10, 0)) for k, v in past]
    digits = torch.arange(1, 11, device=device).repeat(n).unsqueeze(1)
    logits2, _ = model(digits, past=past10)
    p1 = torch.softmax(logits1[:, -1, 1:11].double().cpu(), -1)
    p2 = torch.softmax(logits2[:, -1, 1:11].double().cpu(), -1).view(n, 10, 10)
    return (p1.unsqueeze(2) * p2).reshape(n, 100)


@torch.no_grad()
def first_transition_accuracy(model: CodebookModel, fsm: TokFSM, device) -> float:
    """The paper's first-transition accuracy (its authors' TokFSM tutorial): for every state s, the
    input `BOS s`; the model's `out_degree` most likely next states; the share of them that are
    edges of s; averaged over the states. Deterministic (no sampling)."""
    s = fsm.spec.num_states
    states = torch.arange(s)
    prompts = torch.cat([torch.full((s, 1), BOS), states.view(-1, 1) // 10 + 1, states.view(-1, 1) % 10 + 1], 1)
    dist = next_state_distribution(model, prompts, device)[:, :s]
    top = dist.topk(fsm.spec.out_degree, dim=-1).indices
    return float(fsm.adjacency[states.view(-1, 1), top].double().mean())


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
            "first_transition_accuracy": first_transition_accuracy(model, fsm, device),
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
