"""Data-parallel training over the ranks of `torchrun` (cbtool/training/trainer.py, docs/scaling.md).

Every rank holds the whole model and trains on its contiguous slice of the same step-indexed batch
(`World.rows`), so the global batch is the one-process batch. After the backward pass the gradients of
the parameters being trained (only the codebooks' with a frozen base) are averaged over the ranks in one
flat all-reduce, together with the step's loss, MSE and accuracy; every rank then takes the same optimizer
step and the weights stay identical on all ranks. The codebook statistics that decisions depend on are
combined exactly: firing counts (dead-code revival) are summed, the revival sample of recent inputs is
gathered in rank order (each rank keeps its part of the one-process sample: `Codebook.batch_slice`), the
metrics window's fired-codes masks are OR-ed. Counts stay split so that each reduction adds every token
once: after a reduction rank 0 keeps the total and the other ranks restart from zero.
"""

from __future__ import annotations

import torch

from cbtool.model.sites import CodebookModel
from cbtool.training.metrics_log import MetricsLog
from cbtool.util import distributed
from cbtool.util.distributed import World


def attach(world: World, model: CodebookModel) -> None:
    """Tell each codebook which slice of the batch its inputs are."""
    for cb in model.codebooks.values():
        cb.batch_slice = (world.rank, world.size)


def average_gradients(params: list[torch.nn.Parameter], scalars: list[float]) -> list[float]:
    """Average the gradients of `params` and the `scalars` over all ranks (one all-reduce); returns the
    averaged scalars."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    flat = torch.cat([*(g.reshape(-1).float() for g in grads), torch.tensor(scalars, device=device)])
    distributed.all_reduce(flat).div_(distributed.world().size)
    at = 0
    for g in grads:
        g.copy_(flat[at: at + g.numel()].view_as(g))
        at += g.numel()
    return flat[at:].tolist()


def mean(value: float) -> float:
    """The mean of a per-rank value over the ranks."""
    return float(distributed.all_reduce(torch.tensor([value], dtype=torch.float64))[0]) / distributed.world().size


def combine_stats(model: CodebookModel, metrics: MetricsLog) -> None:
    """Make every rank's codebook statistics the whole batch's: usage counts summed (rank 0 keeps the
    total, the others restart from zero), revival samples gathered, fired-codes masks OR-ed."""
    world = distributed.world()
    for cb in model.codebooks.values():
        total = distributed.all_reduce(cb.usage.clone())
        cb.usage.copy_(total if world.is_main else torch.zeros_like(total))
        if cb.recent_inputs is not None:
            cb.recent_inputs = distributed.gather_rows(cb.recent_inputs)
    for key in sorted(metrics.seen):
        metrics.seen[key] = distributed.all_reduce(metrics.seen[key].to(torch.uint8), "max").bool()


def global_usage(model: CodebookModel) -> None:
    """Before dead-code revival (after `combine_stats`): every rank gets the total counts."""
    for cb in model.codebooks.values():
        distributed.broadcast(cb.usage)


def split_counts(model: CodebookModel) -> None:
    """After loading totals from a checkpoint: only rank 0 keeps them, so later sums count them once."""
    if not distributed.world().is_main:
        for cb in model.codebooks.values():
            cb.usage.zero_()
