"""torch k-means (the pretrained-base default) against scikit-learn's, and the `middle` site preset."""

from __future__ import annotations

import torch

from cbtool.model.sites import parse_sites_option
from cbtool.training.kmeans import kmeans_codes, torch_kmeans_codes


def _clusters(n_clusters: int = 40, per: int = 50, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=g), dim=1) * 5
    x = centres.repeat_interleave(per, 0) + 0.05 * torch.randn(n_clusters * per, d, generator=g)
    return x, centres


def _worst_fit(codes: torch.Tensor, x: torch.Tensor) -> float:
    """Largest cosine distance from a point to its nearest code."""
    sim = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(codes, dim=1).T
    return float(1 - sim.max(dim=1).values.min())


def _mean_fit(codes: torch.Tensor, x: torch.Tensor) -> float:
    sim = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(codes, dim=1).T
    return float(1 - sim.max(dim=1).values.mean())


def test_torch_kmeans_covers_every_cluster_and_fits_like_sklearn():
    x, centres = _clusters()
    codes = torch_kmeans_codes(x, 160, seed=0)  # 4 codes per true cluster: none left without one
    assert codes.shape == (160, 32)
    # every true cluster has a code at its mean (raw scale kept: codes are raw-activation means)
    assert float(torch.cdist(centres, codes).min(dim=1).values.max()) < 0.5  # clusters are ~7 apart
    assert _worst_fit(codes, x) < 0.01
    assert torch.equal(codes, torch_kmeans_codes(x, 160, seed=0))  # deterministic
    # at C = the number of clusters, random seeding may merge a few; the mean fit stays near sklearn's
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(4000, 32, generator=g) @ torch.randn(32, 32, generator=g)  # unclustered, anisotropic
    ours, ref = _mean_fit(torch_kmeans_codes(acts, 64, seed=0), acts), _mean_fit(kmeans_codes(acts, 64, seed=0), acts)
    assert ours <= 1.1 * ref


def test_torch_kmeans_more_codes_than_clusters_and_than_points():
    x, _ = _clusters(n_clusters=5, per=40)
    codes = torch_kmeans_codes(x, 64, seed=1)  # 200 points, 64 codes: empty clusters re-seeded, none NaN
    assert codes.shape == (64, 32) and torch.isfinite(codes).all()
    few = torch_kmeans_codes(x[:10], 16, seed=1)  # fewer points than codes: every point is a code
    assert few.shape == (16, 32) and torch.isfinite(few).all()
    assert _worst_fit(few, x[:10]) < 1e-6


def test_middle_sites_preset():
    assert parse_sites_option("middle", 30) == [(10, "mlp"), (15, "attn"), (15, "mlp"), (20, "attn"), (20, "mlp")]
    assert (0, "mlp") in parse_sites_option("middle,0.mlp", 12)
    assert parse_sites_option("middle", 12) == [(4, "mlp"), (6, "attn"), (6, "mlp"), (8, "attn"), (8, "mlp")]
