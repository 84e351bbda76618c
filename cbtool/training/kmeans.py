"""Initialise codebooks from real activations by k-means.

Clustering runs on unit-normalised activations (selection is by cosine similarity); each code is
then set to the mean of the *raw* activations of its cluster, which reconstructs better than a
rescaled centre. Empty clusters take a random activation.

Two implementations (`TrainConfig.kmeans`):
- "sklearn": scikit-learn's MiniBatchKMeans (k-means++ seeding). The TokFSM and built-in text defaults
  use it; its seeding is sequential in the number of codes, so it takes minutes for C >= 1024 on a
  576-dim model.
- "torch": spherical Lloyd iterations as chunked matmuls, seeded from distinct random activations (empty
  clusters re-seeded at the worst-fitting points): seconds for C=16384 on a CPU. Pretrained bases use it.
  Random seeding can leave a small, isolated cluster without a code when C is close to the number of
  clusters (k-means++ avoids that but is sequential in C); with C in the thousands over activations the
  fit is within a few per cent of scikit-learn's (tests/training/test_kmeans_sites.py).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans

from cbtool.model.codebook import Codebook


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
        n_clusters=num_codes, random_state=seed % 2**32, batch_size=max(4096, 2 * num_codes),  # sklearn: < 2^32
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
def torch_kmeans_codes(acts: torch.Tensor, num_codes: int, seed: int, iters: int = 25,
                       chunk: int = 8192) -> torch.Tensor:
    """acts: (N, d) raw activations -> (num_codes, d) code vectors, by spherical k-means in torch."""
    x = acts.float()
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if n <= num_codes:  # fewer points than codes: the same rule as kmeans_codes
        return kmeans_codes(acts, num_codes, seed)
    unit = torch.nn.functional.normalize(x, dim=1)
    centres = unit[torch.randperm(n, generator=gen)[:num_codes]].clone()
    labels = torch.empty(n, dtype=torch.long)
    best = torch.empty(n)
    for _ in range(iters):
        for lo in range(0, n, chunk):
            sim = unit[lo: lo + chunk] @ centres.T
            best[lo: lo + chunk], labels[lo: lo + chunk] = sim.max(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, labels, unit)
        counts = torch.bincount(labels, minlength=num_codes)
        empty = counts == 0
        if empty.any():  # re-seed empty clusters at the points their centres fit worst
            worst = torch.argsort(best)[: int(empty.sum())]
            sums[empty] = unit[worst]
        new = torch.nn.functional.normalize(sums, dim=1)
        moved = float((new - centres).norm(dim=1).max())
        centres = new
        if moved < 1e-4:
            break
    for lo in range(0, n, chunk):
        labels[lo: lo + chunk] = (unit[lo: lo + chunk] @ centres.T).argmax(dim=1)
    counts = torch.bincount(labels, minlength=num_codes)
    codes = torch.zeros(num_codes, x.shape[1]).index_add_(0, labels, x) / counts.clamp_min(1).unsqueeze(1)
    empty = counts == 0
    if empty.any():
        codes[empty] = x[torch.randint(0, n, (int(empty.sum()),), generator=gen)]
    return codes


KMEANS = {"sklearn": kmeans_codes, "torch": torch_kmeans_codes}


@torch.no_grad()
def init_codebook(cb: Codebook, acts: torch.Tensor, seed: int, impl: str = "sklearn") -> None:
    """acts: (N, G, d) -> every group's codes set by k-means (`impl`: a key of KMEANS)."""
    for g in range(cb.groups):
        cb.codes[g] = KMEANS[impl](acts[:, g], cb.num_codes, seed + g).to(cb.codes)
