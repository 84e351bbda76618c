"""The contexts a code fires on, with the firing token marked (`cbtool show-code`).

Examples are spread evenly over a code's firings; in a store with activations (an SAE store) a firing is a slot
with a nonzero activation, and the examples are the firings with the largest activations, largest first."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbtool.errors import UserError
from cbtool.formats.store import Store
from cbtool.model.refs import parse_code_ref
from cbtool.util import distributed


def _render(store: Store, text: str, tokens: np.ndarray, spans: np.ndarray, lo: int, hi: int,
            after: int | None = None, before: int | None = None) -> str:
    """Text of tokens [lo, hi): their characters plus the text between them; names for specials.

    Byte-level tokens may share a character (one UTF-8 character split over two tokens): each character
    is shown once, and the result is clipped to [after, before) so left + token + right is the text."""
    pieces = []
    prev_end = after
    for i in range(lo, hi):
        s, e = int(spans[i, 0]), int(spans[i, 1])
        if e <= s:
            pieces.append(store.token_string(int(tokens[i]), text, (s, e)))
            continue
        if prev_end is not None and s > prev_end:
            pieces.append(text[prev_end:s])
        a = s if prev_end is None else max(s, prev_end)
        b = e if before is None else min(e, before)
        pieces.append(text[a:b] if b > a else "")
        prev_end = e if prev_end is None else max(prev_end, e)
    return "".join(pieces)


def _start(spans: np.ndarray, p: int) -> int | None:
    s, e = int(spans[p, 0]), int(spans[p, 1])
    return s if e > s else None


def _end(spans: np.ndarray, p: int) -> int | None:
    s, e = int(spans[p, 0]), int(spans[p, 1])
    return e if e > s else None


def code_contexts(store: Store, ref: str, examples: int = 10, context: int = 8) -> dict[str, Any]:
    """Where a code (`SITE:CODE`) fires: its firing count and share of tokens, the tokens it fires on most, and
    `examples` contexts spread evenly over its firings (`context` tokens each side of the firing token,
    as `left`, `token`, `right`; with activations: the strongest firings, each with its `activation`). What
    `cbtool show-code --json` prints."""
    if examples < 0 or context < 0:
        raise UserError("--examples and --context must be >= 0")
    site, code = parse_code_ref(ref, store.sites)
    return {"store": str(store.path), "code": f"{site.name}:{code}", "site": site.name, "code_id": code,
            "tokens": store.num_tokens, **_contexts(store, site.name, code, examples, context)}


def _contexts(store: Store, site: str, code: int, n_examples: int, context: int) -> dict[str, Any]:
    """Under torchrun each rank reads its own shards; firing counts are summed and the examples, which are
    chosen from the global firing order, are gathered (cbtool/util/distributed.py)."""
    world = distributed.world()
    positions = []  # (shard, local positions) of this rank's shards
    shard_fires = np.zeros(store.num_shards, dtype=np.int64)
    token_counts: dict[int, int] = {}
    strength: dict[int, np.ndarray] = {}  # shard -> activation of each firing (stores with activations)
    for s in world.shards(store.num_shards):
        hit = np.asarray(store.codes(s, site)) == code
        acts = store.acts(s, site)
        if acts is not None:
            hit &= np.asarray(acts) > 0
        pos = np.flatnonzero(hit.any(axis=1))
        shard_fires[s] = len(pos)
        if acts is not None:
            strength[s] = np.where(hit[pos], np.asarray(acts[pos], dtype=np.float32), 0).max(axis=1)
        if len(pos):
            positions.append((s, pos))
            tok = np.asarray(store.tokens(s))[pos].astype(np.int64)
            for t, c in zip(*np.unique(tok, return_counts=True), strict=True):
                token_counts[int(t)] = token_counts.get(int(t), 0) + int(c)
    shard_fires = distributed.all_reduce_np(shard_fires)
    if world.active:
        summed: dict[int, int] = {}
        for part in distributed.gather_json(list(token_counts.items())):
            for t, c in part:
                summed[t] = summed.get(t, 0) + c
        token_counts = summed
    fires = int(shard_fires.sum())
    first_fire = np.concatenate([[0], np.cumsum(shard_fires)])
    # examples spread evenly over all firings (deterministic)
    picks = (
        np.unique(np.linspace(0, fires - 1, num=min(n_examples, fires)).round().astype(np.int64))
        if fires
        else []
    )
    by_strength = store.has_acts(site)
    if by_strength:  # the n strongest firings over all shards (ties: the earlier position)
        cand = [(float(strength[s][j]), int(first_fire[s]) + j) for s, pos in positions
                for j in np.argsort(-strength[s], kind="stable")[:n_examples].tolist()]
        if world.active:
            cand = [tuple(c) for part in distributed.gather_json(cand) for c in part]
        picks = np.array(sorted(p for _, p in sorted(cand, key=lambda c: (-c[0], c[1]))[:n_examples]),
                         dtype=np.int64)
    examples = []
    doc_base = np.concatenate([[0], np.cumsum([int(x["docs"]) for x in store.manifest["shards"]])])
    token_repr: dict[int, str] = {}
    repr_shard: dict[int, int] = {}  # the shard a token's text was taken from: the first it fires in
    for s, pos in positions:
        cum = int(first_fire[s])
        mine = [int(p) - cum for p in picks if cum <= p < cum + len(pos)]
        text = store.text(s) if mine or any(t not in token_repr for t in token_counts) else ""
        tokens = np.asarray(store.tokens(s))
        spans = np.asarray(store.spans(s))
        for t in token_counts:
            if t not in token_repr:
                hit = pos[tokens[pos] == t]
                if len(hit):
                    token_repr[t] = store.token_string(t, text, spans[hit[0]])
                    repr_shard[t] = s
        if mine:
            offs = np.asarray(store.doc_offsets(s))
            labels = {n: store.labels(s, n) for n in store.label_names}
            for j in mine:
                p = int(pos[j])
                d = int(np.searchsorted(offs, p, side="right") - 1)
                lo, hi = max(int(offs[d]), p - context), min(int(offs[d + 1]), p + context + 1)
                examples.append(
                    {
                        "position": int(store.token_offsets[s] + p),
                        "doc": int(doc_base[s] + d),
                        "doc_position": p - int(offs[d]),
                        "left": _render(store, text, tokens, spans, lo, p, before=_start(spans, p)),
                        "token": _render(store, text, tokens, spans, p, p + 1),
                        "right": _render(store, text, tokens, spans, p + 1, hi, after=_end(spans, p)),
                        **{f"label_{n}": int(lab[p]) for n, lab in labels.items()},
                        **({"activation": float(strength[s][j])} if by_strength else {}),
                    }
                )
    if world.active:  # rank order is shard order within each rank: sort by position; first shard's repr wins
        examples = sorted((e for part in distributed.gather_json(examples) for e in part), key=lambda e: e["position"])
    if by_strength:
        examples.sort(key=lambda e: (-e["activation"], e["position"]))
        reprs = distributed.gather_json([[t, repr_shard[t], r] for t, r in token_repr.items()])
        token_repr = {t: r for t, _, r in sorted((x for part in reprs for x in part), key=lambda x: -x[1])}
    top = sorted(token_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    return {
        "fires": fires,
        "share_of_tokens": fires / max(store.num_tokens, 1),
        "top_tokens": [{"token": token_repr.get(t, f"<{t}>"), "token_id": t, "count": c} for t, c in top],
        "examples": examples,
    }
