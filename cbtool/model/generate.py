"""Batched sampling with a KV cache and left padding (built-in model interface)."""

from __future__ import annotations

import torch
from torch import nn


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (B, T) and return each row's first real position."""
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad, dtype=torch.long)
    start = torch.empty(len(prompts), dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        start[i] = width - len(p)
    return idx, start


@torch.no_grad()
def sample(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue (B, T) prompts by `max_new_tokens`; returns only the new tokens (B, max_new_tokens).

    temperature 0 is greedy. Random numbers come from `generator` (on the CPU) so that two
    batches sampled with equal generators draw identical uniforms: a steered sample and its
    unsteered twin differ only through the model."""
    device = idx.device
    if start is not None:
        start = start.to(device)
    logits, past = model(idx, past=None, start=start)
    out = []
    for _ in range(max_new_tokens):
        nxt = _pick(logits[:, -1].float(), generator, temperature, top_k)
        out.append(nxt)
        logits, past = model(nxt.to(device).unsqueeze(1), past=past, start=start)
    return torch.stack(out, dim=1)


def _pick(logits: torch.Tensor, generator: torch.Generator, temperature: float, top_k: int | None):
    return pick_token(logits, torch.rand(logits.shape[0], generator=generator), temperature, top_k)


def pick_token(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Next token per row from (B, V) logits and one uniform per row (B,): inverse-CDF sampling, so two
    rows given the same uniform differ only through their logits (steered twins stay in lockstep).
    temperature 0 is greedy; `top_k` keeps the k most likely tokens."""
    logits = logits.cpu()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return (probs.cumsum(-1) < u.unsqueeze(1)).sum(-1).clamp(max=probs.shape[-1] - 1)
