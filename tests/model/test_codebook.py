"""The codebook layer against a dense, obviously-correct reference written here."""

from __future__ import annotations

import pytest
import torch

from cbtool.model.codebook import Codebook, Selection, gather_mean, select_topk
from cbtool.training.kmeans import init_codebook


def naive(x: torch.Tensor, codes: torch.Tensor, k: int, commit: float = 0.0):
    """Dense reference: full similarity matrix, advanced indexing, straight-through by x - sg(x).

    x: (N, G, d) leaf requiring grad; codes: (G, C, d) leaf requiring grad."""
    n, g, _ = x.shape
    xn = x / x.norm(dim=-1, keepdim=True)
    cn = codes / codes.norm(dim=-1, keepdim=True)
    sim = torch.einsum("ngd,gcd->ngc", xn, cn)
    scores, ids = sim.detach().topk(k, dim=-1)
    q = codes[torch.arange(g).view(1, g, 1), ids].mean(dim=2)
    loss = ((q - x.detach()) ** 2).sum(-1).mean(0).sum()
    loss = loss + commit * ((x - q.detach()) ** 2).sum(-1).mean(0).sum()
    out = q + x - x.detach()
    return ids, scores, out, loss


def make(n: int, g: int, d: int, c: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, g, d, generator=gen)
    codes = torch.randn(g, c, d, generator=gen)
    gout = torch.randn(n, g, d, generator=gen)
    return x, codes, gout


def run_layer(cb: Codebook, x: torch.Tensor, gout: torch.Tensor, aux_weight: float = 0.7):
    """Training forward + backward of (out . gout) + aux_weight * aux_loss; returns out, loss, grads."""
    cb.train()
    cb.record = True
    xl = x.clone().requires_grad_(True)
    cb.codes.grad = None
    out = cb(xl)
    loss = cb.aux_loss
    ((out * gout).sum() + aux_weight * loss).backward()
    return out.detach(), loss.detach(), xl.grad, cb.codes.grad.clone()


def run_naive(x, codes, gout, k, commit=0.0, aux_weight=0.7):
    xl = x.clone().requires_grad_(True)
    cl = codes.clone().requires_grad_(True)
    ids, scores, out, loss = naive(xl, cl, k, commit)
    ((out * gout).sum() + aux_weight * loss).backward()
    return ids, scores, out.detach(), loss.detach(), xl.grad, cl.grad


def layer_with(codes: torch.Tensor, k: int, chunk_bytes: int | None = None) -> Codebook:
    g, c, d = codes.shape
    cb = Codebook(d, c, k, g) if chunk_bytes is None else Codebook(d, c, k, g, chunk_bytes)
    with torch.no_grad():
        cb.codes.copy_(codes)
    return cb


@pytest.mark.parametrize("g,k", [(1, 1), (1, 4), (3, 1), (3, 4)])
def test_layer_matches_dense_reference(g, k):
    x, codes, gout = make(200, g, 12, 37, seed=g * 10 + k)
    cb = layer_with(codes, k)
    out, loss, gx, gc = run_layer(cb, x, gout)
    ids, scores, out_r, loss_r, gx_r, gc_r = run_naive(x, codes, gout, k)
    assert torch.equal(cb.last.ids, ids)
    torch.testing.assert_close(cb.last.scores, scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    # straight-through: the input's gradient is exactly the output's gradient (no commitment)
    torch.testing.assert_close(gx, gx_r, rtol=1e-5, atol=1e-5)
    assert torch.equal(gx, gout)
    torch.testing.assert_close(gc, gc_r, rtol=1e-5, atol=1e-5)
    assert gc.abs().sum() > 0


def test_commitment_term_reaches_the_input():
    x, codes, gout = make(150, 2, 8, 20, seed=3)
    cb = layer_with(codes, 2)
    cb.commit_coef = 0.25
    out, loss, gx, gc = run_layer(cb, x, gout)
    _, _, out_r, loss_r, gx_r, gc_r = run_naive(x, codes, gout, 2, commit=0.25)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, gc_r, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gx, gout)  # the commitment gradient is really there


def test_aux_loss_is_mse_summed_over_dims_averaged_over_tokens():
    x, codes, gout = make(64, 1, 6, 10, seed=4)
    cb = layer_with(codes, 1).train()
    out = cb(x.clone().requires_grad_(True))
    expected = ((out.detach() - x) ** 2).sum() / 64
    torch.testing.assert_close(cb.aux_loss.detach(), expected)


@pytest.mark.parametrize("g,k", [(1, 1), (2, 3)])
def test_chunking_does_not_change_results(g, k):
    x, codes, gout = make(101, g, 10, 33, seed=5)
    big = layer_with(codes, k)
    tiny = layer_with(codes, k, chunk_bytes=4 * g * 33 * 7)  # 7 tokens per chunk, ragged last chunk
    one = layer_with(codes, k, chunk_bytes=1)  # one token per chunk
    ref = run_layer(big, x, gout)
    for cb in (tiny, one):
        got = run_layer(cb, x, gout)
        assert torch.equal(cb.last.ids, big.last.ids)
        torch.testing.assert_close(cb.last.scores, big.last.scores, rtol=1e-6, atol=1e-6)
        for a, b in zip(got, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_select_topk_chunk_size_bounds_nothing_but_memory():
    x, codes, _ = make(50, 2, 6, 40, seed=6)
    whole = select_topk(x, codes, 5)
    chunked = select_topk(x, codes, 5, chunk_bytes=4 * 2 * 40 * 3)
    assert torch.equal(whole.ids, chunked.ids)
    torch.testing.assert_close(whole.scores, chunked.scores)


def test_per_head_batch_equals_loop_of_single_codebooks():
    g, k = 4, 2
    x, codes, gout = make(120, g, 8, 25, seed=7)
    batched = layer_with(codes, k)
    out, loss, gx, gc = run_layer(batched, x, gout)
    total_loss = 0.0
    for h in range(g):
        single = layer_with(codes[h : h + 1], k)
        o, lo, gxh, gch = run_layer(single, x[:, h : h + 1], gout[:, h : h + 1])
        assert torch.equal(single.last.ids[:, 0], batched.last.ids[:, h])
        torch.testing.assert_close(o, out[:, h : h + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gxh, gx[:, h : h + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gch, gc[h : h + 1], rtol=1e-5, atol=1e-6)
        total_loss += float(lo)
    assert float(loss) == pytest.approx(total_loss, rel=1e-5)


def test_topk_returns_k_distinct_codes_best_first():
    x, codes, _ = make(80, 3, 8, 30, seed=8)
    sel = select_topk(x, codes, 6)
    assert sel.ids.shape == (80, 3, 6) and sel.scores.shape == (80, 3, 6)
    assert (sel.scores[..., :-1] >= sel.scores[..., 1:]).all()
    assert all(len(set(row.tolist())) == 6 for row in sel.ids.reshape(-1, 6))
    # the scores are the cosine similarities of the returned codes
    cos = torch.nn.functional.cosine_similarity(
        x.unsqueeze(2), codes[torch.arange(3).view(1, 3, 1), sel.ids], dim=-1
    )
    torch.testing.assert_close(sel.scores, cos, rtol=1e-5, atol=1e-5)


def test_gather_mean_matches_indexing():
    _, codes, _ = make(1, 3, 5, 9, seed=9)
    ids = torch.randint(0, 9, (17, 3, 4), generator=torch.Generator().manual_seed(0))
    expected = torch.stack([codes[h][ids[:, h]].mean(1) for h in range(3)], dim=1)
    torch.testing.assert_close(gather_mean(codes, ids), expected)


def test_dead_codes_are_revived_from_recent_inputs_and_then_fire():
    gen = torch.Generator().manual_seed(10)
    d, c = 8, 16
    x = torch.randn(2000, 1, d, generator=gen)
    x[:, 0, 0] = x[:, 0, 0].abs() + 0.5  # every token has a positive first coordinate
    cb = Codebook(d, c, k=1)
    with torch.no_grad():
        cb.codes.copy_(torch.randn(1, c, d, generator=gen))
        cb.codes[0, :8, 0] = 5.0  # codes 0-7 point along the data ...
        cb.codes[0, 8:, 0] = -50.0  # ... codes 8-15 point away from it: they never fire
    cb.train()
    cb.track_usage = True
    before = cb.codes.detach().clone()
    cb(x.clone().requires_grad_(True))
    assert (cb.usage[0, 8:] == 0).all() and cb.usage.sum() == 2000
    revived = cb.revive_dead(torch.Generator().manual_seed(0))
    assert revived == 8
    assert cb.usage.sum() == 0  # counts restart
    assert torch.equal(cb.codes[0, :8], before[0, :8])  # live codes untouched
    # each revived code now sits (up to 1e-3 noise) on one of the recent inputs
    dist = torch.cdist(cb.codes[0, 8:].detach(), cb.recent_inputs[:, 0])
    assert (dist.min(dim=1).values < 0.01).all()
    cb(x.clone().requires_grad_(True))
    assert (cb.usage[0, 8:] > 0).all(), cb.usage  # and they fire


def test_usage_counts_a_code_once_per_token_even_if_duplicated():
    x, codes, _ = make(30, 2, 6, 12, seed=11)
    cb = layer_with(codes, 3).eval()
    cb.track_usage = True
    cb(x)
    assert torch.equal(cb.usage.sum(1), torch.tensor([90.0, 90.0]))  # 30 tokens x 3 distinct ids
    cb.usage.zero_()

    def duplicate(ids, scores, _x):
        ids = ids.clone()
        ids[..., 0] = 5
        ids[..., 1] = 5  # code 5 in two slots of every token
        return ids, scores

    cb.id_editor = duplicate
    cb.record = True
    cb(x)
    assert cb.usage[0, 5] == 30 and cb.usage[1, 5] == 30  # not 60
    for h in range(2):  # every token counts each of its distinct ids once
        distinct = sum(len(set(row.tolist())) for row in cb.last.ids[:, h])
        assert cb.usage[h].sum() == distinct < 90
        expected = torch.zeros(12)
        for row in cb.last.ids[:, h]:
            expected[sorted(set(row.tolist()))] += 1
        assert torch.equal(cb.usage[h], expected)


def test_bypass_is_identity():
    x, codes, gout = make(40, 2, 6, 10, seed=12)
    cb = layer_with(codes, 2).train()
    cb.enabled = False
    xl = x.clone().requires_grad_(True)
    out = cb(xl)
    assert torch.equal(out, x)
    (out * gout).sum().backward()
    assert torch.equal(xl.grad, gout)
    assert cb.aux_loss is None and cb.codes.grad is None


def test_id_editor_and_add_vector_are_applied():
    x, codes, _ = make(25, 2, 6, 10, seed=13)
    cb = layer_with(codes, 2).eval()
    cb.record = True

    def force(ids, scores, _x):
        ids = ids.clone()
        ids[:, 1, :] = 7  # head 1: code 7 in every slot
        return ids, scores

    cb.id_editor = force
    out = cb(x)
    assert (cb.last.ids[:, 1] == 7).all()
    torch.testing.assert_close(out[:, 1], codes[1, 7].expand(25, 6))
    plain = select_topk(x, codes, 2)
    torch.testing.assert_close(out[:, 0], gather_mean(codes, plain.ids)[:, 0])
    add = torch.randn(2, 6)
    cb.add_vector = add
    torch.testing.assert_close(cb(x), out + add)


def test_record_keeps_selection_and_eval_has_no_aux_loss():
    x, codes, _ = make(10, 1, 4, 8, seed=14)
    cb = layer_with(codes, 1).eval()
    cb.record = True
    with torch.no_grad():
        cb(x.unsqueeze(0))  # leading batch dims are flattened
    assert isinstance(cb.last, Selection) and cb.last.ids.shape == (10, 1, 1)
    assert cb.aux_loss is None


def test_empty_and_low_precision_inputs():
    _, codes, _ = make(1, 2, 4, 8, seed=15)
    cb = layer_with(codes, 2).eval()
    assert cb(torch.zeros(0, 2, 4)).shape == (0, 2, 4)
    x = torch.randn(5, 2, 4).to(torch.bfloat16)
    out = cb(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_kmeans_init_reconstructs_clustered_data_better_than_random_codes():
    gen = torch.Generator().manual_seed(16)
    centres = torch.randn(12, 16, generator=gen) * 3
    acts = centres[torch.randint(0, 12, (3000,), generator=gen)] + 0.1 * torch.randn(3000, 16, generator=gen)
    acts = acts.unsqueeze(1)  # (N, 1, d)

    def recon_error(cb: Codebook) -> float:
        with torch.no_grad():
            return float(((cb.eval()(acts) - acts) ** 2).sum(-1).mean())

    random_cb = Codebook(16, 12, k=1)
    km_cb = Codebook(16, 12, k=1)
    init_codebook(km_cb, acts, seed=0)
    err_km, err_rand = recon_error(km_cb), recon_error(random_cb)
    assert err_km < 0.2 * err_rand, (err_km, err_rand)
    assert err_km < 16 * 0.1**2 * 3  # close to the noise floor (16 dims x 0.01)


def test_eval_mode_with_grad_is_straight_through_without_aux_loss():
    x, codes, gout = make(60, 2, 6, 10, seed=17)
    cb = layer_with(codes, 2).eval()
    xl = x.clone().requires_grad_(True)
    out = cb(xl)
    assert cb.aux_loss is None
    (out * gout).sum().backward()
    _, _, out_r, _, gx_r, gc_r = run_naive(x, codes, gout, 2, aux_weight=0.0)
    torch.testing.assert_close(out.detach(), out_r, rtol=1e-5, atol=1e-5)
    assert torch.equal(xl.grad, gout)
    torch.testing.assert_close(cb.codes.grad, gc_r, rtol=1e-5, atol=1e-5)
