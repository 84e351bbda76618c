"""The codebook bottleneck: top-k of C code vectors by cosine similarity, output = their mean.

One `Codebook` holds G independent codebooks (G = number of heads for a per-head site, else 1) and
runs them as one batched operation. Selection never builds autograd state: the (tokens x C)
similarity is computed without gradients, in token chunks whose size bounds its memory, and only the
k winning ids and scores are kept. Gradients reach the codebook through the gathered code vectors
(task loss + reconstruction MSE) and reach the input straight through (plus an optional commitment
term), so a backward pass costs a gather and a scatter, not a second pass over the similarity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# Bytes of similarity scores one chunk may hold; 64 MiB keeps a C=65536 chunk at 256 tokens.
DEFAULT_CHUNK_BYTES = 64 * 2**20

# An id editor gets (ids, scores, x) with ids/scores of shape (N, G, k) and returns new (ids, scores).
IdEditor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Selection:
    """What a forward pass picked: ids and cosine scores, shape (N, G, k), best first."""

    ids: torch.Tensor
    scores: torch.Tensor


@torch.no_grad()
def select_topk(
    x: torch.Tensor, codes: torch.Tensor, k: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Selection:
    """Top-k codes by cosine similarity. x: (N, G, d); codes: (G, C, d) -> ids, scores (N, G, k)."""
    n, g, _ = x.shape
    c = codes.shape[1]
    xn = F.normalize(x.float(), dim=-1).transpose(0, 1)  # (G, N, d)
    cn_t = F.normalize(codes.float(), dim=-1).transpose(1, 2)  # (G, d, C)
    ids = torch.empty((g, n, k), dtype=torch.long, device=x.device)
    scores = torch.empty((g, n, k), dtype=torch.float32, device=x.device)
    step = max(1, chunk_bytes // (4 * g * c))
    for start in range(0, n, step):
        stop = min(n, start + step)
        sim = torch.bmm(xn[:, start:stop], cn_t)  # (G, n, C)
        if k == 1:
            s, i = sim.max(dim=-1, keepdim=True)
        else:
            s, i = sim.topk(k, dim=-1)
        scores[:, start:stop] = s
        ids[:, start:stop] = i
    return Selection(ids.transpose(0, 1), scores.transpose(0, 1))


def gather_mean(codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of the selected code vectors. codes: (G, C, d); ids: (N, G, k) -> (N, G, d)."""
    g = codes.shape[0]
    group = torch.arange(g, device=ids.device).view(1, g, 1)
    return codes[group, ids].mean(dim=2)


class Codebook(nn.Module):
    """G codebooks of `num_codes` vectors of size `dim`, each selecting the top `k` per token."""

    def __init__(
        self,
        dim: int,
        num_codes: int,
        k: int = 1,
        groups: int = 1,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_codes:
            raise ValueError(f"k must be in 1..{num_codes}, got {k}")
        self.dim, self.num_codes, self.k, self.groups = dim, num_codes, k, groups
        self.chunk_bytes = chunk_bytes
        self.codes = nn.Parameter(torch.randn(groups, num_codes, dim) / dim**0.5)
        self.enabled = True  # False: bypass, the activation passes through untouched
        self.record = False  # True: keep the last selection in `last`
        self.track_usage = False  # True: accumulate firing counts in `usage`
        self.commit_coef = 0.0
        self.id_editor: IdEditor | None = None  # interventions rewrite the selection here
        self.add_vector: torch.Tensor | None = None  # (G, d) added to the output ("add" steering)
        self.last: Selection | None = None
        self.aux_loss: torch.Tensor | None = None  # MSE (+ commitment) of the last training forward
        self.recent_inputs: torch.Tensor | None = None  # (n, G, d) sample kept for dead-code revival
        self.capture: list[torch.Tensor] | None = None  # a list: inputs are appended (k-means init)
        self.register_buffer("usage", torch.zeros(groups, num_codes), persistent=False)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, num_codes={self.num_codes}, dim={self.dim}, k={self.k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., G, d) -> same shape, each token's vector replaced by the mean of its k codes."""
        shape = x.shape
        flat = x.reshape(-1, self.groups, self.dim)
        if self.capture is not None:
            self.capture.append(flat.detach().float().cpu())
        if not self.enabled:
            return x
        sel = select_topk(flat, self.codes, self.k, self.chunk_bytes)
        if self.id_editor is not None:
            sel = Selection(*self.id_editor(sel.ids, sel.scores, flat))
        if self.record:
            self.last = sel
        if self.track_usage:
            self._count(sel.ids)
        quantised = gather_mean(self.codes, sel.ids).to(x.dtype)
        if self.training and torch.is_grad_enabled():
            target = flat.detach()
            loss = (quantised - target).pow(2).sum(-1).mean(0).sum()
            if self.commit_coef:
                commit = (flat - quantised.detach()).pow(2).sum(-1).mean(0).sum()
                loss = loss + self.commit_coef * commit
            self.aux_loss = loss
            self._keep_recent(target)
        if flat.requires_grad:  # straight-through: the input's gradient is the output's
            quantised = quantised + flat - flat.detach()
        if self.add_vector is not None:
            quantised = quantised + self.add_vector.to(quantised)
        return quantised.reshape(shape)

    @torch.no_grad()
    def _count(self, ids: torch.Tensor) -> None:
        g = self.groups
        offsets = torch.arange(g, device=ids.device).view(1, g, 1) * self.num_codes
        # a code counts once per token even if an edit put it in two slots
        flat = (ids + offsets).reshape(-1, self.k)
        flat = torch.where(_first_occurrence(flat), flat, torch.full_like(flat, -1)).reshape(-1)
        flat = flat[flat >= 0]
        counts = torch.bincount(flat, minlength=g * self.num_codes).view(g, self.num_codes)
        self.usage += counts.to(self.usage)

    @torch.no_grad()
    def _keep_recent(self, x: torch.Tensor, keep: int = 4096) -> None:
        stride = max(1, x.shape[0] // keep)  # deterministic subsample: resumable runs stay exact
        self.recent_inputs = x[::stride][:keep].clone()

    @torch.no_grad()
    def revive_dead(self, generator: torch.Generator | None = None) -> int:
        """Re-initialise codes that fired on no token since the last call from recent inputs.

        Returns how many codes were replaced; resets the usage counts."""
        dead = self.usage == 0
        n_dead = int(dead.sum())
        if n_dead and self.recent_inputs is not None:
            src = self.recent_inputs
            for g in range(self.groups):
                idx = dead[g].nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                pick = torch.randint(0, src.shape[0], (idx.numel(),), generator=generator)
                noise = torch.randn(idx.numel(), self.dim, generator=generator) * 1e-3
                self.codes[g, idx] = src[pick.to(src.device), g] + noise.to(src)
        self.usage.zero_()
        return n_dead


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Mask of (rows, k) that is True where an id has not appeared earlier in its row."""
    k = ids.shape[1]
    if k == 1:
        return torch.ones_like(ids, dtype=torch.bool)
    eq = ids.unsqueeze(2) == ids.unsqueeze(1)  # (rows, k, k)
    earlier = torch.tril(torch.ones(k, k, dtype=torch.bool, device=ids.device), diagonal=-1)
    return ~(eq & earlier).any(dim=2)
