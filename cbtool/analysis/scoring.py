"""Precision, recall and F1 of every code against a feature, by vectorised counting.

fires[c] = tokens whose stored top-k contains c (stored per shard at embed time);
hits[c]  = bincount of the stored ids of the feature's tokens;
precision = hits / fires, recall = hits / |F|, F1 = their harmonic mean. Top-k ids of a token are
distinct (selection is a top-k), so a bincount counts each code once per token. Label mode counts
all label values at once: bincount over (label index * C + id). Under torchrun a feature holds only the
rank's own shards (the others are empty: cbtool/analysis/features.py) and the counts are summed over the ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbtool.formats.store import Store
from cbtool.util import distributed


@dataclass
class SiteScores:
    """Scores of every code of one site; arrays have shape (C,) or (V, C) in label mode."""

    site: str
    hits: np.ndarray
    fires: np.ndarray  # (C,)
    feature_size: np.ndarray | int  # |F| (or (V,) per label value)

    @property
    def precision(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.fires > 0, self.hits / np.maximum(self.fires, 1), 0.0)

    @property
    def recall(self) -> np.ndarray:
        size = np.asarray(self.feature_size, dtype=np.float64)
        if size.ndim:
            size = size[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(size > 0, self.hits / np.maximum(size, 1), 0.0)

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0.0)

    def metric(self, name: str) -> np.ndarray:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1}[name]


def score_mask(store: Store, site: str, masks: list[np.ndarray]) -> SiteScores:
    """Scores of every code of `site` against a feature given as per-shard boolean masks."""
    c = store.sites[site].num_codes
    hits = np.zeros(c, dtype=np.int64)
    size = 0
    for s, mask in enumerate(masks):
        if not mask.any():
            continue
        ids = store.codes(s, site)
        hits += np.bincount(np.asarray(ids[mask]).reshape(-1), minlength=c)
        size += int(mask.sum())
    hits, size = distributed.all_reduce_np(hits), int(distributed.all_reduce_np(np.array([size]))[0])
    return SiteScores(site, hits, store.counts(site), size)


def score_labels(store: Store, site: str, index: list[np.ndarray], num_values: int) -> SiteScores:
    """Scores of every code of `site` against every label value at once: hits has shape (V, C)."""
    c = store.sites[site].num_codes
    hits = np.zeros(num_values * c, dtype=np.int64)
    sizes = np.zeros(num_values, dtype=np.int64)
    for s, idx in enumerate(index):
        labelled = idx >= 0
        if not labelled.any():
            continue
        lab = idx[labelled]
        ids = np.asarray(store.codes(s, site)[labelled]).astype(np.int64)
        keys = lab[:, None] * c + ids
        hits += np.bincount(keys.reshape(-1), minlength=num_values * c)
        sizes += np.bincount(lab, minlength=num_values)
    hits, sizes = distributed.all_reduce_np(hits), distributed.all_reduce_np(sizes)
    return SiteScores(site, hits.reshape(num_values, c), store.counts(site), sizes)
