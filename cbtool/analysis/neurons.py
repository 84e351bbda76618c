"""Codes vs neurons (docs/definitions.md): a neuron's precision on a feature at the activation
threshold that gives a code's recall.

Neurons of the built-in model, read in the same forward pass (codebooks on) that produced the stored
codes, before any codebook replaces them: per layer the attention heads side by side (the per-head
codebooks' input), the attention output, the MLP hidden units (after the GELU) and the MLP output.
Each neuron counts twice, as `high` (activation >= t) and `low` (activation <= t), so a feature a
neuron marks by a dip is found too.

Matched recall: a code fires on `hits` of the feature's |F| tokens. A neuron's threshold t is the
`hits`-th largest activation among the feature's tokens, the largest threshold whose recall is at
least the code's (ties can add feature tokens); its precision = feature tokens with activation >= t
over all tokens with activation >= t. The best neuron of a code has the highest such precision
(ties: the first neuron in the order above).

Memory stays bounded: the store's corpus is run through the model once per block of neurons, and a
block holds (tokens x neurons) activations within `memory_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from cbtool.errors import UserError
from cbtool.formats.checkpoint import Checkpoint, load_checkpoint
from cbtool.formats.store import Store

DEFAULT_MEMORY_BYTES = 512 * 2**20
DIRECTIONS = ("high", "low")


@dataclass(frozen=True)
class Group:
    """A named vector of neurons: `name[i]` for i < size."""

    name: str
    size: int


@dataclass
class Query:
    """One code row: the feature (a boolean mask over the store's tokens) and how many of its tokens the
    code fires on (its hits); the code's precision, for the comparison."""

    feature: np.ndarray
    hits: int
    code_precision: float


@dataclass
class NeuronMatch:
    neuron: str
    precision: float
    recall: float
    threshold: float
    fires: int


def neuron_groups(model) -> list[Group]:
    """The built-in model's neuron groups, in a fixed order."""
    cfg = model.base.config
    out = []
    for layer in range(cfg.n_layer):
        out += [Group(f"{layer}.attn.heads", cfg.d_model), Group(f"{layer}.attn", cfg.d_model),
                Group(f"{layer}.mlp.hidden", cfg.d_mlp), Group(f"{layer}.mlp", cfg.d_model)]
    return out


def neuron_name(groups: list[Group], index: int) -> str:
    """Global index over groups x directions -> `0.mlp.hidden[37]` or `0.mlp.hidden[37] (low)`."""
    total = sum(g.size for g in groups)
    direction, i = divmod(index, total)
    for g in groups:
        if i < g.size:
            return f"{g.name}[{i}]" + (" (low)" if direction else "")
        i -= g.size
    raise IndexError(index)


@contextmanager
def _recording(model, wanted: set[str], sink: dict[str, list[torch.Tensor]]) -> Iterator[None]:
    """Hooks that append the raw activations of the wanted groups (before any codebook) to `sink`."""
    base = model.base
    handles = []

    def keep(name: str, x: torch.Tensor) -> None:
        if name in wanted:
            sink.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]).float().cpu())

    for layer, block in enumerate(base.layers):
        # prepend: run before the codebooks' hooks on the same modules, so the values are the raw ones
        handles.append(block.attn.proj.register_forward_pre_hook(
            lambda _m, args, n=f"{layer}.attn.heads": keep(n, args[0]), prepend=True))
        handles.append(block.attn.register_forward_hook(
            lambda _m, _a, out, n=f"{layer}.attn": keep(n, out[0]), prepend=True))
        handles.append(block.mlp.up.register_forward_hook(
            lambda _m, _a, out, n=f"{layer}.mlp.hidden": keep(n, F.gelu(out)), prepend=True))
        handles.append(block.mlp.register_forward_hook(
            lambda _m, _a, out, n=f"{layer}.mlp": keep(n, out), prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def store_documents(store: Store) -> Iterator[np.ndarray]:
    """The token ids of every stored document, in store order."""
    for s in range(store.num_shards):
        tokens = np.asarray(store.tokens(s))
        offsets = np.asarray(store.doc_offsets(s))
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
            yield tokens[lo:hi]


def check_store_model(store: Store, ckpt: Checkpoint) -> None:
    """Refuse (UserError) a store whose corpus the checkpoint's model cannot re-run token for token."""
    recorded = store.manifest["checkpoint"].get("sha256")
    if not recorded:
        raise UserError(f"store {store.path} records no checkpoint: neurons must come from the model that "
                        f"wrote its codes")
    if recorded != ckpt.sha256:
        raise UserError(f"store {store.path} was embedded from another checkpoint than {ckpt.path} "
                        f"(sha256 mismatch): neurons must come from the store's own model")
    cfg = getattr(ckpt.model.base, "config", None)
    if cfg is None or not hasattr(ckpt.model.base, "layers"):
        raise UserError("--baseline neurons supports the built-in model only")
    for s in range(store.num_shards):
        tokens = np.asarray(store.tokens(s))
        offsets = np.asarray(store.doc_offsets(s))
        if len(tokens) and int(tokens.max()) >= cfg.vocab_size:
            raise UserError(f"store {store.path} holds token ids the model's vocabulary ({cfg.vocab_size}) "
                            f"lacks: it is not this model's corpus")
        if len(offsets) < 1 or offsets[-1] != len(tokens) or (len(offsets) > 1 and np.diff(offsets).max() >
                                                               cfg.block_size):
            raise UserError(f"store {store.path}: its documents do not fit the model's block size "
                            f"{cfg.block_size}: it is not this model's corpus")


@torch.inference_mode()
def collect(model, store: Store, wanted: set[str], device, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Run the store's documents through the model (codebooks on) and return the wanted groups'
    activations, one row per stored token (N, size)."""
    sink: dict[str, list[torch.Tensor]] = {}
    was_training = model.training
    model.eval()
    try:
        docs = store_documents(store)
        while True:
            batch = [d for _, d in zip(range(batch_size), docs, strict=False)]
            if not batch:
                break
            lengths = np.asarray([len(d) for d in batch])
            idx = np.zeros((len(batch), int(lengths.max())), dtype=np.int64)
            for i, d in enumerate(batch):
                idx[i, : len(d)] = d
            start = {k: len(v) for k, v in sink.items()}
            with _recording(model, wanted, sink):
                model(torch.from_numpy(idx).to(device))
            keep = torch.from_numpy((np.arange(idx.shape[1])[None, :] < lengths[:, None]).reshape(-1))
            for name in sink:
                for j in range(start.get(name, 0), len(sink[name])):
                    sink[name][j] = sink[name][j][keep]
    finally:
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in sink.items()}


def match_block(acts: torch.Tensor, queries: list[Query]) -> list[tuple[int, float, float, float, int]]:
    """For activations (N, D) of D neurons (the `high` direction; negate for `low`) and each query: the
    best neuron's (column, precision, recall, threshold, fires) at the query's matched recall."""
    n, _ = acts.shape
    sorted_all = torch.sort(acts.t().contiguous(), dim=1).values  # (D, N) ascending
    by_feature: dict[int, torch.Tensor] = {}  # queries of one feature share its sorted activations
    out = []
    for q in queries:
        mask = torch.from_numpy(np.asarray(q.feature, dtype=bool))
        size = int(mask.sum())
        if id(q.feature) not in by_feature:
            by_feature[id(q.feature)] = torch.sort(acts[mask].t().contiguous(), dim=1).values
        feat = by_feature[id(q.feature)]  # (D, |F|) ascending
        t = feat[:, size - q.hits].unsqueeze(1).contiguous()  # the hits-th largest per neuron
        fires = n - torch.searchsorted(sorted_all, t, side="left").squeeze(1)
        tp = size - torch.searchsorted(feat, t, side="left").squeeze(1)
        prec = tp.double() / fires.clamp(min=1).double()
        best = int(torch.argmax(prec))  # first maximum
        out.append((best, float(prec[best]), float(tp[best]) / size, float(t[best, 0]), int(fires[best])))
    return out


def best_neurons(model, store: Store, queries: list[Query], device,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 on_block: Callable[[int, int], None] | None = None) -> list[NeuronMatch]:
    """Each query's best neuron at matched recall, over every neuron of `neuron_groups(model)`."""
    for q in queries:
        size = int(np.count_nonzero(q.feature))
        if not 1 <= q.hits <= size:
            raise ValueError(f"hits {q.hits} must be in 1..|F| ({size})")
    groups = neuron_groups(model)
    total = sum(g.size for g in groups)
    per_neuron = max(1, store.num_tokens) * 4 * 6  # activations, negated, sorted, feature rows (both ways)
    width = max(1, memory_bytes // per_neuron)
    best: list[tuple[float, int, float, float, int] | None] = [None] * len(queries)
    blocks = _blocks(groups, width)
    for b, members in enumerate(blocks):
        if on_block:
            on_block(b, len(blocks))
        acts = collect(model, store, {g.name for g in members}, device)
        block = torch.cat([acts[g.name] for g in members], 1)
        offset = sum(g.size for g in groups[: groups.index(members[0])])
        for direction, sign in enumerate((1.0, -1.0)):
            for i, (col, prec, rec, thr, fires) in enumerate(match_block(sign * block, queries)):
                index = direction * total + offset + col
                cur = best[i]
                if cur is None or prec > cur[0] or (prec == cur[0] and index < cur[1]):
                    best[i] = (prec, index, rec, sign * thr, fires)
    return [NeuronMatch(neuron_name(groups, idx), p, r, t, f) for p, idx, r, t, f in best]  # type: ignore[misc]


def _blocks(groups: list[Group], width: int) -> list[list[Group]]:
    """Consecutive groups packed into blocks of about `width` neurons (a group is never split)."""
    out: list[list[Group]] = [[]]
    size = 0
    for g in groups:
        if out[-1] and size + g.size > width:
            out.append([])
            size = 0
        out[-1].append(g)
        size += g.size
    return out


def open_checkpoint(store: Store, path, device) -> Checkpoint:
    """The checkpoint whose neurons are compared: `path`, else the one the store came from."""
    if path is None:
        if not store.manifest["checkpoint"].get("path"):
            raise UserError(f"store {store.path} records no checkpoint: neurons must come from the model that "
                            f"wrote its codes")
        store.check_checkpoint(required=True)
        path = store.checkpoint_path
    ckpt = load_checkpoint(path, device=device)
    check_store_model(store, ckpt)
    return ckpt


def annotate(rows: list[dict[str, Any]], matches: list[NeuronMatch]) -> dict[str, Any]:
    """Add each row's best neuron; return the summary (share of codes that beat their best neuron)."""
    beat = tie = 0
    for r, m in zip(rows, matches, strict=True):
        r.update(neuron=m.neuron, neuron_precision=m.precision, neuron_recall=m.recall,
                 neuron_threshold=m.threshold, neuron_fires=m.fires)
        beat += r["precision"] > m.precision
        tie += r["precision"] == m.precision
    n = len(rows)
    return {"codes": n, "codes_beating_neuron": beat, "share_beating_neuron": beat / n if n else None,
            "codes_tying_neuron": tie,
            "mean_code_precision": float(np.mean([r["precision"] for r in rows])) if n else None,
            "mean_neuron_precision": float(np.mean([m.precision for m in matches])) if n else None}


def neuron_baseline(store: Store, checkpoint, device, rows: list[dict[str, Any]], features: list[np.ndarray],
                    memory_bytes: int = DEFAULT_MEMORY_BYTES, log: Callable[[str], None] | None = None,
                    ) -> dict[str, Any]:
    """`find-codes --baseline neurons`: every row (a code with `hits` and `precision`) gets its best neuron
    on its feature (a boolean mask over the store's tokens, one per row); returns the summary."""
    ckpt = open_checkpoint(store, checkpoint, device)
    if not rows:
        return annotate([], [])
    queries = [Query(f, int(r["hits"]), float(r["precision"])) for r, f in zip(rows, features, strict=True)]

    def on_block(b: int, n: int) -> None:
        if log:
            log(f"neurons: block {b + 1}/{n} over {store.num_tokens:,} tokens")

    matches = best_neurons(ckpt.model, store, queries, device, memory_bytes, on_block)
    return {"checkpoint": str(ckpt.path), "neurons": 2 * sum(g.size for g in neuron_groups(ckpt.model)),
            **annotate(rows, matches)}
