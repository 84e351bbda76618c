"""Sites: the --sites option, site names, the hooks that insert codebooks, and SITE:CODE references."""

from __future__ import annotations

import copy

import pytest
import torch

from cbtool.errors import UserError
from cbtool.model.refs import parse_code_ref, resolve_site
from cbtool.model.sites import BuiltinLocator, CodebookModel, hook_site, parse_sites_option
from cbtool.model.transformer import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=11, block_size=32, n_layer=3, n_head=4, d_model=32, d_mlp=64)


def build(chosen, num_codes=16, k=1, seed=0):
    torch.manual_seed(seed)
    base = Transformer(CFG)
    plain = copy.deepcopy(base)  # the same weights with no hooks
    model = CodebookModel.build(base, BuiltinLocator(base), chosen, num_codes, k).eval()
    return model, plain.eval()


def tokens(b=3, t=20, seed=1):
    return torch.randint(0, 11, (b, t), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------- --sites


@pytest.mark.parametrize(
    "text,expected",
    [
        ("mlp", [(0, "mlp"), (1, "mlp"), (2, "mlp")]),
        ("attn", [(0, "attn"), (1, "attn"), (2, "attn")]),
        ("attn-heads", [(0, "attn_heads"), (1, "attn_heads"), (2, "attn_heads")]),
        ("1.mlp", [(1, "mlp")]),
        ("0-1.attn", [(0, "attn"), (1, "attn")]),
        ("2", [(2, "attn_heads"), (2, "mlp")]),
        ("0,2", [(0, "attn_heads"), (0, "mlp"), (2, "attn_heads"), (2, "mlp")]),
        (" 2.mlp , 0.attn-heads, 2.mlp,", [(0, "attn_heads"), (2, "mlp")]),  # sorted, unique
        ("1.attn,1.attn_heads,1.heads", [(1, "attn_heads"), (1, "attn")]),
        ("mlp,attn-heads", [(i, c) for i in range(3) for c in ("attn_heads", "mlp")]),
        ("2.resid,0-1.resid", [(0, "resid"), (1, "resid"), (2, "resid")]),
        ("1.mlp,1.resid", [(1, "mlp"), (1, "resid")]),
    ],
)
def test_parse_sites_option(text, expected):
    assert parse_sites_option(text, n_layer=3) == expected


@pytest.mark.parametrize("text,fragment", [
    ("", "no site"),
    (",", "no site"),
    ("3.mlp", "out of range"),
    ("1-5", "out of range"),
    ("2-1.mlp", "out of range"),
    ("ffn", "unknown site component"),
    ("1.ffn", "unknown site component"),
    ("1:mlp", "bad --sites item"),
    ("-1.mlp", "bad --sites item"),
])
def test_parse_sites_option_errors(text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_sites_option(text, n_layer=3)


# ----------------------------------------------------------------------------------------- hooks


def test_site_names_and_codebook_shapes():
    model, _ = build([(0, "attn_heads"), (0, "mlp"), (1, "attn")], num_codes=16, k=2)
    assert list(model.sites) == ["0.attn.h0", "0.attn.h1", "0.attn.h2", "0.attn.h3", "0.mlp", "1.attn"]
    heads = model.sites["0.attn.h2"]
    assert heads.group == 2 and heads.spec.groups == 4 and heads.spec.dim == 8
    assert model.sites["1.attn"].spec.dim == 32 and model.sites["1.attn"].group == 0
    cb = model.codebook(heads.spec)
    assert tuple(cb.codes.shape) == (4, 16, 8) and cb.k == 2


@pytest.mark.parametrize("chosen", [[(1, "attn_heads")], [(0, "attn")], [(2, "mlp")], [(1, "resid")]])
def test_hooks_change_output_only_when_enabled(chosen):
    model, plain = build(chosen)
    idx = tokens()
    with torch.no_grad():
        reference, _ = plain(idx)
        model.set_enabled(False)
        bypassed, _ = model(idx)
        model.set_enabled(True)
        model.set_record(True)
        on, _ = model(idx)
    assert torch.equal(bypassed, reference)
    assert not torch.allclose(on, reference, atol=1e-3)
    (spec, cb), = model.items()
    assert cb.last is not None and cb.last.ids.shape == (3 * 20, spec.groups, 1)


def test_hook_site_reads_and_replaces_the_residual_stream():
    """`L.resid` is block L's output: read it, and a replacement is what the next block reads."""
    _, plain = build([(0, "mlp")])
    loc = BuiltinLocator(plain)
    idx = tokens()
    seen: list[torch.Tensor] = []
    h = hook_site(loc, "1.resid", lambda x: seen.append(x.clone()))
    with torch.no_grad():
        reference, _ = plain(idx)
        h.remove()
        x = plain.tok_emb(idx) + plain.pos_emb(torch.arange(idx.shape[1]))
        for block in plain.layers[:2]:
            x, _ = block(x, None)
    assert torch.allclose(seen[0], x, atol=1e-6)
    h = hook_site(loc, "2.resid", lambda x: torch.zeros_like(x))
    with torch.no_grad():
        zeroed, _ = plain(idx)
    h.remove()
    assert torch.allclose(zeroed, plain.head(plain.ln_f(torch.zeros_like(x))).expand_as(zeroed), atol=1e-6)
    assert not torch.allclose(zeroed, reference)
    with pytest.raises(UserError, match="layers 0-"):
        hook_site(loc, "9.resid", lambda x: None)


def test_hook_output_is_the_mean_of_the_selected_codes():
    model, _ = build([(1, "mlp")], k=2)
    (spec, cb), = model.items()
    seen = {}
    model.base.layers[1].mlp.register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
    model.set_record(True)
    with torch.no_grad():
        model(tokens())
    expected = cb.codes[0][cb.last.ids[:, 0]].mean(1).view(3, 20, 32)
    torch.testing.assert_close(seen["out"], expected)


def test_kv_cache_forward_equals_full_forward_with_codebooks_on():
    model, _ = build([(0, "attn_heads"), (1, "attn"), (2, "mlp")], k=2)
    idx = tokens(b=2, t=16, seed=2)
    model.set_record(True)
    with torch.no_grad():
        full, _ = model(idx)
        full_ids = {key: cb.last.ids.view(2, 16, *cb.last.ids.shape[1:])
                    for key, cb in model.codebooks.items()}
        prefix, past = model(idx[:, :10])
        steps = [prefix]
        for t in range(10, 16):
            logits, past = model(idx[:, t : t + 1], past=past)
            steps.append(logits)
            for key, cb in model.codebooks.items():
                assert torch.equal(cb.last.ids.view(2, -1, *cb.last.ids.shape[1:])[:, 0], full_ids[key][:, t])
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_left_padded_batch_equals_unpadded_rows():
    model, _ = build([(0, "attn_heads"), (1, "mlp")])
    rows = [tokens(1, 12, seed=3)[0], tokens(1, 7, seed=4)[0], tokens(1, 10, seed=5)[0]]
    width = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    start = torch.tensor([width - len(r) for r in rows])
    for i, r in enumerate(rows):
        padded[i, width - len(r) :] = r
    with torch.no_grad():
        batch, _ = model(padded, start=start)
        for i, r in enumerate(rows):
            alone, _ = model(r.unsqueeze(0))
            torch.testing.assert_close(batch[i, width - len(r) :], alone[0], rtol=1e-4, atol=1e-5)


def test_training_forward_collects_aux_losses():
    model, _ = build([(0, "attn_heads"), (2, "mlp")])
    model.train()
    logits, _ = model(tokens())
    aux = model.aux_loss()
    assert aux is not None and aux.item() > 0 and aux.requires_grad
    assert model.aux_loss() is None  # cleared after being collected
    (logits.sum() + aux).backward()
    assert all(cb.codes.grad is not None and cb.codes.grad.abs().sum() > 0 for cb in model.codebooks.values())


# --------------------------------------------------------------------------------------- refs


@pytest.fixture
def sites():
    model, _ = build([(0, "attn_heads"), (0, "mlp"), (1, "attn"), (2, "attn_heads"), (2, "attn")],
                     num_codes=64)
    return model.sites


@pytest.mark.parametrize("text,site,code", [
    ("0.mlp:3", "0.mlp", 3),
    (" 0.mlp : 63 ", "0.mlp", 63),
    ("0:5", "0.mlp", 5),  # bare layer with an MLP codebook -> its MLP site
    ("1:0", "1.attn", 0),  # bare layer with one site -> that site
    ("0.attn.h3:7", "0.attn.h3", 7),
    ("2.attn:1", "2.attn", 1),
])
def test_parse_code_ref(sites, text, site, code):
    got_site, got_code = parse_code_ref(text, sites)
    assert (got_site.name, got_code) == (site, code)


@pytest.mark.parametrize("text,fragment", [
    ("2:1", "ambiguous"),  # layer 2 has heads and attn, no MLP
    ("3:1", "layer 3 has no codebook"),  # no layer 3 in a 3-layer model (0-2)
    ("0.mlp:64", "out of range"),
    ("0.attn.h4:1", "unknown site"),
    ("3:", "bad code reference"),
    (":3", "bad code reference"),
    ("0.mlp", "bad code reference"),
    ("x:1", "unknown site"),
    ("3:-1", "layer 3 has no codebook"),
    ("1:-1", "bad code number"),
    ("0.mlp:-1", "bad code number"),
    ("0.mlp:1.5", "bad code number"),
    ("0.mlp:a", "bad code number"),
])
def test_parse_code_ref_errors(sites, text, fragment):
    with pytest.raises(UserError, match=fragment):
        parse_code_ref(text, sites)


def test_ambiguous_bare_layer_lists_candidates(sites):
    with pytest.raises(UserError) as err:
        resolve_site("2", sites)
    msg = str(err.value)
    assert "2.attn.h0" in msg and "2.attn" in msg and "\n" not in msg


def test_bare_layer_without_codebook(sites):
    model, _ = build([(0, "mlp"), (2, "mlp")])
    with pytest.raises(UserError, match="no codebook"):
        resolve_site("1", model.sites)
