"""Initialise codebooks from real activations with scikit-learn's MiniBatchKMeans.

Clustering runs on unit-normalised activations (selection is by cosine similarity); each code is
then set to the mean of the *raw* activations of its cluster, which reconstructs better than a
rescaled centre (../shared/notes/calibration.md). Empty clusters take a random activation.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from cbtool.codebook import Codebook


@torch.no_grad()
def capture_inputs(codebooks: list[Codebook], run) -> list[torch.Tensor]:
    """Run `run()` once with every codebook recording its input; returns (N, G, d) per codebook."""
    for cb in codebooks:
        cb.capture = []
    try:
        run()
        return [torch.cat(cb.capture, 0) for cb in codebooks]
    finally:
        for cb in codebooks:
            cb.capture = None


@torch.no_grad()
def kmeans_codes(acts: torch.Tensor, num_codes: int, seed: int) -> torch.Tensor:
    """acts: (N, d) raw activations -> (num_codes, d) code vectors."""
    x = acts.double().numpy()
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    if len(x) <= num_codes:  # fewer points than codes: use them all, pad with jittered copies
        pick = np.concatenate([np.arange(len(x)), rng.integers(0, len(x), num_codes - len(x))])
        codes = x[pick] + 1e-3 * rng.standard_normal((num_codes, x.shape[1])) * (pick >= len(x))[:, None]
        return torch.from_numpy(codes).float()
    km = MiniBatchKMeans(
        n_clusters=num_codes, random_state=seed, batch_size=max(4096, 2 * num_codes),
        n_init=1, max_iter=20, max_no_improvement=5, reassignment_ratio=0.01,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = km.fit_predict(unit)
    counts = np.bincount(labels, minlength=num_codes)
    sums = np.zeros((num_codes, x.shape[1]))
    np.add.at(sums, labels, x)
    codes = sums / np.maximum(counts, 1)[:, None]
    empty = counts == 0
    if empty.any():
        codes[empty] = x[rng.integers(0, len(x), int(empty.sum()))]
    return torch.from_numpy(codes).float()


@torch.no_grad()
def init_codebook(cb: Codebook, acts: torch.Tensor, seed: int) -> None:
    """acts: (N, G, d) -> every group's codes set by k-means."""
    for g in range(cb.groups):
        cb.codes[g] = kmeans_codes(acts[:, g], cb.num_codes, seed + g).to(cb.codes)
