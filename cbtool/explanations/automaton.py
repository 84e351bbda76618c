"""Recovering the TokFSM automaton from one site's codes alone (`cbtool explain --fsm`).

The paper's claim is that codes are the FSM's states. Test it end to end: at every state's second digit (the
token where the whole state is known), take the site's code; count code-to-code transitions between consecutive
states of each stored sequence; keep the edges seen at least `min_edge_count` times. That graph is built from
codes only. To score it, each code is mapped to the state it fires on most (majority label at its second-digit
firings), the kept code edges become state edges, and those are compared with the true FSM's edges (the store's
corpus records the FSM: states, out-degree and seed): edge precision = predicted edges that are true / predicted,
recall = true edges predicted / true edges.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cbtool.errors import UserError
from cbtool.formats.store import Store

DEFAULT_MIN_EDGE_COUNT = 5


def true_edges(store: Store) -> np.ndarray:
    """(S, S) bool adjacency of the FSM a TokFSM store was sampled from."""
    corpus = store.manifest.get("corpus") or {}
    if corpus.get("kind") != "tokfsm" or "state" not in store.label_names:
        raise UserError(f"--fsm needs a TokFSM store (with state labels); {store.path} holds "
                        f"{corpus.get('kind', 'an unknown corpus')}")
    from cbtool.tasks.tokfsm import FSMSpec, TokFSM

    try:
        spec = FSMSpec(**{k: int(corpus[k]) for k in ("num_states", "out_degree", "seq_len", "seed")})
        return TokFSM(spec).adjacency.numpy()
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"store {store.path}: malformed TokFSM corpus entry ({e})") from None


def second_digits(store: Store) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per shard: positions of every state's second digit (document offsets 2, 4, ...: BOS, then two digits
    per state) and whether the next such position belongs to the same document."""
    pos_out, same_out = [], []
    for s in range(store.num_shards):
        offs = np.asarray(store.doc_offsets(s), dtype=np.int64)
        n = int(offs[-1])
        doc = np.repeat(np.arange(len(offs) - 1), np.diff(offs))
        rel = np.arange(n) - offs[doc]
        pos = np.flatnonzero((rel >= 2) & (rel % 2 == 0))
        pos_out.append(pos)
        same_out.append(np.r_[doc[pos[1:]] == doc[pos[:-1]], False] if len(pos) else np.zeros(0, bool))
    return pos_out, same_out


def recover_automaton(store: Store, site: str, min_edge_count: int = DEFAULT_MIN_EDGE_COUNT) -> dict[str, Any]:
    """The code graph of `site` and its edge precision/recall against the true FSM (see the module docstring)."""
    if min_edge_count < 1:
        raise UserError("--fsm-min-edge-count must be >= 1")
    adjacency = true_edges(store)
    num_states = adjacency.shape[0]
    c = store.sites[site].num_codes
    pos, same = second_digits(store)
    src, dst, code_ids, labels = [], [], [], []
    for s in range(store.num_shards):
        ids = np.asarray(store.codes(s, site), dtype=np.int64)[pos[s]]  # (m, k)
        lab = np.asarray(store.labels(s, "state"), dtype=np.int64)[pos[s]]
        k = ids.shape[1]
        nxt = np.flatnonzero(same[s])
        # every pair of the two tokens' codes (k = 1: one pair per transition)
        src.append(np.repeat(ids[nxt], k, axis=1).reshape(-1))
        dst.append(np.tile(ids[nxt + 1], (1, k)).reshape(-1))
        code_ids.append(ids.reshape(-1))
        labels.append(np.repeat(lab, k))
    src_a, dst_a = np.concatenate(src), np.concatenate(dst)
    code_a, lab_a = np.concatenate(code_ids), np.concatenate(labels)
    # code -> majority state (scoring only)
    ok = lab_a >= 0
    votes = np.bincount(code_a[ok] * num_states + lab_a[ok], minlength=c * num_states).reshape(c, num_states)
    state_of = np.where(votes.sum(1) > 0, votes.argmax(1), -1)
    purity = float(votes.max(1).sum() / max(votes.sum(), 1))
    edges, counts = np.unique(src_a * c + dst_a, return_counts=True)
    kept = edges[counts >= min_edge_count]
    a, b = state_of[kept // c], state_of[kept % c]
    pred = np.zeros_like(adjacency)
    good = (a >= 0) & (b >= 0)
    pred[a[good], b[good]] = True
    hit = int((pred & adjacency).sum())
    n_pred, n_true = int(pred.sum()), int(adjacency.sum())
    return {
        "site": site, "min_edge_count": min_edge_count, "transitions": int(len(src_a)),
        "codes": int((np.bincount(code_a, minlength=c) > 0).sum()), "code_edges": int(len(edges)),
        "kept_code_edges": int(len(kept)), "states_mapped": int(len(np.unique(state_of[state_of >= 0]))),
        "majority_purity": purity, "predicted_edges": n_pred, "true_edges": n_true, "correct_edges": hit,
        "edge_precision": hit / n_pred if n_pred else 0.0, "edge_recall": hit / n_true if n_true else 0.0,
    }
