"""The codebook bottleneck: top-k of C code vectors by cosine similarity, output = their mean.

One `Codebook` holds G independent codebooks (G = number of heads for a per-head site, else 1) and
runs them as one batched operation. Selection never builds autograd state: the (tokens x C)
similarity is computed without gradients, in token chunks whose size bounds its memory, and only the
k winning ids and scores are kept. Gradients reach the codebook through the gathered code vectors
(task loss + reconstruction MSE) and reach the input straight through (plus an optional commitment
term), so a backward pass costs a gather and a scatter, not a second pass over the similarity.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# Bytes of similarity scores one chunk may hold (one transient buffer per forward): 256 MiB keeps a
# C=65536 chunk at 1024 tokens. Measured for d=512, C=65536 on the 2-core CPU: 64 MiB chunks ran at 1.10x
# the unchunked roofline (the codes are re-read per chunk), 128 MiB 0.96x, 256 MiB 0.90x.
DEFAULT_CHUNK_BYTES = 256 * 2**20

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
    return _select(x, F.normalize(codes.float(), dim=-1), k, chunk_bytes)


@torch.no_grad()
def _select(x: torch.Tensor, unit_codes: torch.Tensor, k: int, chunk_bytes: int) -> Selection:
    """select_topk with the codes already unit-normalised.

    Ranking a token's codes by x . c/|c| gives the same order as by cosine, so the tokens are not
    normalised: only the k winning scores are divided by |x|. The (chunk x C) similarity block lives in
    one buffer reused for every chunk (no fresh allocation and page faults per chunk); one group uses a
    plain matmul, several a batched one over the groups."""
    n, g, _ = x.shape
    c = unit_codes.shape[1]
    if n == 0:
        return Selection(torch.empty((0, g, k), dtype=torch.long, device=x.device),
                         torch.empty((0, g, k), dtype=torch.float32, device=x.device))
    xf = x.float()
    cn_t = unit_codes.transpose(1, 2)  # (G, d, C), a view
    step = min(n, max(1, _chunk_bytes(unit_codes, chunk_bytes) // (4 * g * c)))
    buf = torch.empty(g * step * c, dtype=torch.float32, device=x.device)
    parts: list[tuple[torch.Tensor, torch.Tensor]] = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        m = stop - start
        if g == 1:
            sim = torch.mm(xf[start:stop, 0], cn_t[0], out=buf[: m * c].view(m, c)).unsqueeze(1)
        else:  # (m, G, C) laid out as (G, m, C)
            sim = torch.bmm(xf[start:stop].transpose(0, 1), cn_t, out=buf[: g * m * c].view(g, m, c))
            sim = sim.transpose(0, 1)
        if k == 1:
            parts.append(sim.max(dim=-1, keepdim=True))
        else:
            parts.append(sim.topk(k, dim=-1))
    if len(parts) == 1:
        scores, ids = parts[0]
    else:
        scores, ids = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    norms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    scores = scores / norms.clamp_min_(1e-12)
    return Selection(ids, scores)


def _chunk_bytes(unit_codes: torch.Tensor, limit: int) -> int:
    """Bytes of similarity per chunk: small enough to stay in cache while top-k reads it back, large
    enough that re-reading the codes once per chunk stays cheap (a chunk >= 8x the codes' bytes),
    never above `limit`. Measured on the 2-core CPU: 4 heads x d=32, C=1000 ran 2.2x faster in 16 MiB
    chunks than in 256 MiB ones; d=512, C=65536 (128 MiB of codes) was fastest in 256 MiB chunks."""
    return min(limit, max(8 * 2**20, 8 * unit_codes.numel() * 4))


def gather_mean(codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean of the selected code vectors. codes: (G, C, d); ids: (N, G, k) -> (N, G, d).

    The groups' codes are laid end to end and indexed once; the (N, G, k, d) gathered vectors are
    never materialised, and the backward adds each slot's gradient into the selected rows with one
    `index_add_` per slot (deterministic on CPU) instead of autograd's generic scatter."""
    g, c, d = codes.shape
    n = ids.shape[0]
    return _GatherMean.apply(codes, _flat_ids(ids, c)).view(n, g, d)


def _gather(codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(G, C, d) codes, (rows, k) flat ids -> (rows, d) mean of the rows' codes."""
    table = codes.reshape(-1, codes.shape[-1])
    if ids.shape[1] == 1:
        return F.embedding(ids[:, 0], table)
    return F.embedding_bag(ids, table, mode="mean")


def _flat_ids(ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(N, G, k) ids -> (N*G, k) rows into the groups' codes laid end to end."""
    n, g, k = ids.shape
    if g > 1:
        ids = ids + torch.arange(g, device=ids.device).view(1, g, 1) * num_codes
    return ids.reshape(n * g, k)


def _scatter_mean_grad(grad: torch.Tensor, ids: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gradient of codes (shape) for out = mean of codes[ids]; grad: (rows, d), ids: (rows, k).

    k > 1 on the CPU: one sparse (codes x rows) CSR matrix, with 1/k wherever a row selected a code,
    times grad. It is built straight from the ids sorted by code (no COO conversion) and sums each
    code's rows in one pass, deterministically; measured on the 2-core CPU for 8192 rows x k=8, d=512,
    C=1024: 3.8 ms against 9.8 ms for one `index_add_` per slot. Elsewhere (k = 1, other devices or
    dtypes): `index_add_`, one per slot."""
    g, c, d = shape
    rows, k = ids.shape
    if k > 1 and grad.device.type == "cpu" and grad.dtype in (torch.float32, torch.float64):
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # slots by code, each code's rows in token order
        crow = torch.zeros(g * c + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(flat, minlength=g * c), 0, out=crow[1:])
        values = torch.full((flat.numel(),), 1.0 / k, dtype=grad.dtype)
        with warnings.catch_warnings():  # torch flags sparse CSR as beta once per process
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            weights = torch.sparse_csr_tensor(
                crow, order.div_(k, rounding_mode="floor"), values, (g * c, rows), check_invariants=False
            )
            return torch.mm(weights, grad).view(g, c, d)
    out = torch.zeros(g * c, d, dtype=grad.dtype, device=grad.device)
    for j in range(k):
        out.index_add_(0, ids[:, j], grad, alpha=1.0 / k)
    return out.view(g, c, d)


class _GatherMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.codes_shape = codes.shape
        return _gather(codes, ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        (ids,) = ctx.saved_tensors
        return _scatter_mean_grad(grad.contiguous(), ids, ctx.codes_shape), None


class _QuantiseTrain(torch.autograd.Function):
    """The training forward in one node: out = mean of the selected codes, loss = the reconstruction
    MSE (summed over dimensions and groups, averaged over tokens) against the stop-gradient input plus
    `commit` x the same error with the codes stopped instead.

    Backward: the codes get the output's gradient (task loss) and the MSE's through the selected rows;
    the input gets the output's gradient unchanged (straight-through) plus the commitment gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, ids: torch.Tensor, commit: float):
        n, g, d = x.shape
        out = _gather(codes, ids).view(n, g, d)
        # one fused pass, nothing materialised; the error itself is recomputed in backward
        loss = F.mse_loss(out, x, reduction="sum") * ((1.0 + commit) / max(1, n))
        ctx.save_for_backward(ids, out, x)
        ctx.codes_shape, ctx.commit, ctx.n = codes.shape, commit, max(1, n)
        return out, loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_loss: torch.Tensor | None):
        ids, out, x = ctx.saved_tensors
        n, g, d = x.shape
        grad_x = grad_codes = None
        diff = None
        if grad_loss is not None:  # d loss / d out = 2 (out - x) / n
            diff = torch.sub(out, x).mul_(grad_loss * (2.0 / ctx.n))
        keep_diff = ctx.needs_input_grad[0] and ctx.commit and diff is not None
        if ctx.needs_input_grad[1]:
            if diff is None:
                gq = torch.zeros_like(x) if grad_out is None else grad_out
            elif grad_out is None:
                gq = diff
            else:  # in place unless the commitment term still needs diff: no extra buffer
                gq = diff.add(grad_out) if keep_diff else diff.add_(grad_out)
            grad_codes = _scatter_mean_grad(gq.reshape(n * g, d), ids, ctx.codes_shape)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out  # straight-through (None: no gradient reaches x)
            if keep_diff:
                grad_x = diff.mul(-ctx.commit) if grad_out is None else torch.add(grad_out, diff, alpha=-ctx.commit)
        return grad_x, grad_codes, None, None


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantised value, exactly. Backward: its gradient goes to the codes' path and,
    unchanged, to the input (the straight-through estimator), without the two extra elementwise passes
    of `q + x - x.detach()`."""

    @staticmethod
    def forward(ctx, quantised: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return quantised.view_as(quantised)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad


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
        # (rank, ranks): inputs are that slice of a batch split evenly over ranks (cbtool/training/ddp.py); the
        # sample kept is then this slice's part of the whole batch's sample
        self.batch_slice: tuple[int, int] = (0, 1)
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
        if self.training and torch.is_grad_enabled():
            target = flat.detach()
            self._keep_recent(target)
            ids = _flat_ids(sel.ids, self.num_codes)
            quantised, self.aux_loss = _QuantiseTrain.apply(
                flat.to(self.codes.dtype), self.codes, ids, float(self.commit_coef)
            )
            quantised = quantised.to(x.dtype)
        else:
            quantised = gather_mean(self.codes, sel.ids).to(x.dtype)
            if flat.requires_grad:  # straight-through: the input's gradient is the output's
                quantised = _StraightThrough.apply(quantised, flat)
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
        """Rows 0, s, 2s, ... (at most `keep`) of the whole batch: deterministic, so resumed runs stay
        exact, and the ranks' parts of it concatenate to the one-process sample."""
        rank, ranks = self.batch_slice
        n = x.shape[0]
        stride = max(1, n * ranks // keep)
        offset = rank * n
        lo = -(-offset // stride)  # the first sampled row at or after this slice's start
        hi = min(keep, -(-(offset + n) // stride))
        self.recent_inputs = x[lo * stride - offset:: stride][: max(0, hi - lo)].clone()

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
