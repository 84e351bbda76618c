"""cbtool/formats/sae.py: SAELens and sparsify SAE folders read into SparseDictionary, encodes checked by hand and
against the libraries' own encoders, and every kind of bad folder refused with one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cbtool.errors import UserError
from cbtool.formats.sae import (
    DEFAULT_K_MAX,
    check_d_in,
    load_sae,
    select_top,
    site_for_hook,
    truncation_stats,
)

D_IN, D_SAE = 4, 6
# latent i < 4 reads x_i, latent 4 reads x0 + x1, latent 5 reads -x0; decoder rows = encoder columns
W_ENC = torch.tensor([[1, 0, 0, 0, 1, -1],
                      [0, 1, 0, 0, 1, 0],
                      [0, 0, 1, 0, 0, 0],
                      [0, 0, 0, 1, 0, 0]], dtype=torch.float32)
X = torch.tensor([[3.0, 1.0, -2.0, 0.5]])  # pre-activations [3, 1, -2, 0.5, 4, -3]
X_NEG = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])  # pre-activations [-1, -1, -1, -1, -2, 1]


def write_saelens(d: Path, arch: str = "topk", k: int | None = 3, legacy: bool = False, cfg_extra: dict | None = None,
                  tensors: dict | None = None, hook: str = "blocks.2.hook_resid_post", head: int | None = None,
                  b_dec: torch.Tensor | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    w = {"W_enc": W_ENC.clone(), "W_dec": W_ENC.T.contiguous(),
         "b_dec": torch.zeros(D_IN) if b_dec is None else b_dec, "b_enc": torch.zeros(D_SAE)}
    if arch == "jumprelu":
        w["threshold"] = torch.full((D_SAE,), 2.5)
    if arch == "gated":
        del w["b_enc"]
        w["b_gate"] = torch.tensor([0, 0, 0, 0, -5.0, 0])
        w["r_mag"] = torch.full((D_SAE,), math.log(2.0))
        w["b_mag"] = torch.zeros(D_SAE)
    w.update(tensors or {})
    save_file({n: t for n, t in w.items() if t is not None}, str(d / "sae_weights.safetensors"))
    if legacy:
        cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "torch.float32", "hook_point": hook,
               "hook_point_head_index": head, "activation_fn_str": "topk" if arch == "topk" else "relu",
               "apply_b_dec_to_input": True, "normalize_activations": False, "model_name": "gpt2-small"}
        if arch == "topk":
            cfg["activation_fn_kwargs"] = {"k": k}
    else:
        cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
               "normalize_activations": "none", "reshape_activations": "none", "architecture": arch,
               "metadata": {"sae_lens_version": "6.5.0", "model_name": "tiny", "hook_name": hook,
                            "hook_head_index": head, "prepend_bos": True}}
        if arch == "topk":
            cfg.update(k=k, rescale_acts_by_decoder_norm=False)
    cfg.update(cfg_extra or {})
    cfg = {key: v for key, v in cfg.items() if v is not ...}  # ... removes a key
    (d / "cfg.json").write_text(json.dumps(cfg))
    return d


def write_sparsify(d: Path, activation: str = "topk", k: int = 3, cfg_extra: dict | None = None,
                   tensors: dict | None = None, b_dec: torch.Tensor | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    w = {"encoder.weight": W_ENC.T.contiguous(), "encoder.bias": torch.zeros(D_SAE),
         "W_dec": W_ENC.T.contiguous(), "b_dec": torch.zeros(D_IN) if b_dec is None else b_dec}
    w.update(tensors or {})
    save_file({n: t for n, t in w.items() if t is not None}, str(d / "sae.safetensors"))
    cfg = {"activation": activation, "expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN}
    cfg.update(cfg_extra or {})
    (d / "cfg.json").write_text(json.dumps(cfg))
    return d


def enc(sae, x):
    ids, acts = sae.encode(x)
    assert ids.dtype == torch.int64 and acts.dtype == torch.float32
    return ids.tolist(), acts.tolist()


# -- hand-computed encodes --------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [False, True])
def test_saelens_topk(tmp_path, legacy):
    sae = load_sae(write_saelens(tmp_path / "s", "topk", k=3, legacy=legacy))
    assert (sae.format, sae.architecture, sae.k, sae.k_fixed) == ("saelens", "topk", 3, True)
    assert enc(sae, X) == ([[4, 0, 1]], [[4.0, 3.0, 1.0]])
    # one positive latent: the other two slots are 0 and take the smallest unused ids
    assert enc(sae, X_NEG) == ([[5, 0, 1]], [[1.0, 0.0, 0.0]])
    ids, acts = sae.encode(X)
    assert sae.reconstruct(ids, acts).tolist() == [[7.0, 5.0, 0.0, 0.0]]
    assert torch.equal(sae.code_vectors, W_ENC.T)
    assert truncation_stats(sae, torch.cat([X, X_NEG]))["dropped_latent_share"] == 0.0
    if legacy:
        assert sae.hook == "blocks.2.hook_resid_post" and sae.model_name == "gpt2-small"


def test_saelens_b_dec_applied_to_input(tmp_path):
    b_dec = torch.tensor([1.0, 0.0, 0.0, 0.0])
    sae = load_sae(write_saelens(tmp_path / "s", "topk", k=3, b_dec=b_dec))
    assert enc(sae, X + b_dec) == ([[4, 0, 1]], [[4.0, 3.0, 1.0]])
    ids, acts = sae.encode(X + b_dec)
    assert sae.reconstruct(ids, acts).tolist() == [[8.0, 5.0, 0.0, 0.0]]
    off = load_sae(write_saelens(tmp_path / "t", "topk", k=3, b_dec=b_dec,
                                 cfg_extra={"apply_b_dec_to_input": False}))
    assert enc(off, X + b_dec) == ([[4, 0, 1]], [[5.0, 4.0, 1.0]])


def test_saelens_standard_k_max_and_dropped_share(tmp_path):
    d = write_saelens(tmp_path / "s", "standard", k=None)
    sae = load_sae(d, k_max=2)
    assert (sae.k, sae.k_fixed) == (2, False)
    assert enc(sae, X) == ([[4, 0]], [[4.0, 3.0]])  # nonzero: 4, 3, 1, 0.5
    stats = truncation_stats(sae, X)
    assert stats["mean_l0"] == 4 and stats["max_l0"] == 4
    assert stats["dropped_latent_share"] == 0.5
    assert stats["dropped_mass_share"] == pytest.approx(1.5 / 8.5)
    assert stats["tokens_truncated_share"] == 1.0
    stats = truncation_stats(sae, torch.cat([X, X_NEG]))  # X_NEG: one nonzero, nothing dropped
    assert stats["dropped_latent_share"] == pytest.approx(2 / 5)
    assert stats["tokens_truncated_share"] == 0.5
    assert load_sae(d).k == min(DEFAULT_K_MAX, D_SAE)
    assert torch.equal(sae.latent_acts(X), torch.tensor([[3.0, 1.0, 0.0, 0.5, 4.0, 0.0]]))


def test_saelens_jumprelu(tmp_path):
    sae = load_sae(write_saelens(tmp_path / "s", "jumprelu", k=None), k_max=3)
    assert enc(sae, X) == ([[4, 0, 1]], [[4.0, 3.0, 0.0]])  # threshold 2.5 keeps 4 and 3 only
    assert truncation_stats(sae, X)["mean_l0"] == 2


def test_saelens_gated(tmp_path):
    sae = load_sae(write_saelens(tmp_path / "s", "gated", k=None), k_max=3)
    # gate: latent 4 is shut by b_gate = -5; magnitudes 2 * relu(pre)
    assert enc(sae, X) == ([[0, 1, 3]], [[6.0, 2.0, 1.0]])


def test_saelens_rescale_by_decoder_norm_is_folded(tmp_path):
    w_dec = W_ENC.T.contiguous() * torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0, 1.0])[:, None]
    sae = load_sae(write_saelens(tmp_path / "s", "topk", k=3, tensors={"W_dec": w_dec},
                                 cfg_extra={"rescale_acts_by_decoder_norm": True}))
    ids, acts = sae.encode(X)
    # pre-activations times decoder norms: [3, 2, 0, .5, 4 * sqrt 2, 0]
    assert ids.tolist() == [[4, 0, 1]]
    assert torch.allclose(acts, torch.tensor([[4 * math.sqrt(2), 3.0, 2.0]]))
    # SAELens decodes acts / norm @ W_dec: latent 4 gives 4 (1, 1), latent 0 3 e0, latent 1 (2 / 2) * 2 e1
    assert torch.allclose(sae.reconstruct(ids, acts), torch.tensor([[7.0, 6.0, 0.0, 0.0]]))
    assert sae.identity()["folded"] == ["rescale_acts_by_decoder_norm"]


def test_saelens_legacy_scaling_factor_is_folded(tmp_path):
    scale = torch.tensor([2.0, 1, 1, 1, 1, 1])
    sae = load_sae(write_saelens(tmp_path / "s", "standard", legacy=True, tensors={"scaling_factor": scale}),
                   k_max=2)
    ids, acts = sae.encode(X)
    assert sae.reconstruct(ids, acts).tolist() == [[10.0, 4.0, 0.0, 0.0]]  # 4 (1, 1) + 2 * 3 e0


def test_saelens_hook_z_heads(tmp_path):
    sae = load_sae(write_saelens(tmp_path / "a", hook="blocks.3.attn.hook_z", head=1))
    assert sae.site == "3.attn.h1" and sae.head_index == 1
    assert load_sae(write_saelens(tmp_path / "b", hook="blocks.3.attn.hook_z")).site == "3.attn.heads"


def test_sparsify_topk_and_groupmax(tmp_path):
    sae = load_sae(write_sparsify(tmp_path / "layers.2"))
    assert (sae.format, sae.architecture, sae.k, sae.site, sae.hook) == ("sparsify", "topk", 3, "2.resid", "layers.2")
    assert enc(sae, X) == ([[4, 0, 1]], [[4.0, 3.0, 1.0]])
    assert enc(sae, X_NEG) == ([[5, 0, 1]], [[1.0, 0.0, 0.0]])
    b_dec = torch.tensor([0.0, 0.0, 0.0, 1.0])
    shifted = load_sae(write_sparsify(tmp_path / "x" / "layers.2.mlp", b_dec=b_dec))
    assert shifted.site == "2.mlp"
    assert enc(shifted, X + b_dec) == ([[4, 0, 1]], [[4.0, 3.0, 1.0]])
    ids, acts = shifted.encode(X + b_dec)
    assert shifted.reconstruct(ids, acts).tolist() == [[7.0, 5.0, 0.0, 1.0]]
    # groupmax, k = 2 groups of 3 latents: [3, 1, 0 | .5, 4, 0]
    gm = load_sae(write_sparsify(tmp_path / "g" / "layers.2", activation="groupmax", k=2))
    assert enc(gm, X) == ([[4, 0]], [[4.0, 3.0]])


def test_sparsify_skip_connection(tmp_path):
    w_skip = torch.eye(D_IN) * 0.5
    sae = load_sae(write_sparsify(tmp_path / "layers.1", cfg_extra={"skip_connection": True},
                                  tensors={"W_skip": w_skip}))
    ids, acts = sae.encode(X)
    assert sae.reconstruct(ids, acts, X).tolist() == [[8.5, 5.5, -1.0, 0.25]]
    with pytest.raises(ValueError):
        sae.reconstruct(ids, acts)


def test_sparsify_run_dir(tmp_path):
    run = tmp_path / "run"
    write_sparsify(run / "layers.5.mlp")
    (run / "config.json").write_text("{}")  # sparsify's training config beside the hookpoints
    sae = load_sae(run)
    assert sae.path == run / "layers.5.mlp" and sae.site == "5.mlp"
    write_sparsify(run / "layers.6.mlp")
    with pytest.raises(UserError) as e:
        load_sae(run)
    msg = str(e.value)
    assert "\n" not in msg and "holds 2 SAEs" in msg and str(run / "layers.6.mlp") in msg
    assert load_sae(run / "layers.6.mlp").site == "6.mlp"


def test_k_max(tmp_path):
    with pytest.raises(UserError, match="selects exactly k = 3"):
        load_sae(write_saelens(tmp_path / "s", "topk", k=3), k_max=5)
    assert load_sae(tmp_path / "s", k_max=3).k == 3
    with pytest.raises(UserError, match="k_max"):
        load_sae(write_saelens(tmp_path / "t", "standard"), k_max=0)


def test_identity(tmp_path):
    d = write_saelens(tmp_path / "s", "topk", k=3)
    ident = load_sae(d).identity()
    assert set(ident["files"]) == {"cfg.json", "sae_weights.safetensors"}
    assert all(len(h) == 64 for h in ident["files"].values())
    assert {k: ident[k] for k in ("format", "architecture", "d_in", "d_sae", "k", "hook", "site")} == {
        "format": "saelens", "architecture": "topk", "d_in": 4, "d_sae": 6, "k": 3,
        "hook": "blocks.2.hook_resid_post", "site": "2.resid"}
    json.dumps(ident)


def test_select_top_order():
    scores = torch.tensor([[0.0, 2.0, 5.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    ids, acts = select_top(scores, 4)
    assert ids.tolist() == [[2, 1, 3, 0], [0, 1, 2, 3]]
    assert acts.tolist() == [[5.0, 2.0, 2.0, 0.0], [0.0] * 4]


def test_encode_chunks_and_empty(tmp_path, monkeypatch):
    import cbtool.formats.sae as mod

    sae = load_sae(write_saelens(tmp_path / "s", "topk", k=3))
    x = torch.randn(37, D_IN)
    whole = sae.encode(x)
    monkeypatch.setattr(mod, "CHUNK_ELEMENTS", 5 * D_SAE)
    parts = sae.encode(x)
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])
    ids, acts = sae.encode(torch.zeros(0, D_IN))
    assert ids.shape == (0, 3) and acts.shape == (0, 3)
    with pytest.raises(ValueError):
        sae.encode(torch.zeros(2, D_IN + 1))


def test_check_d_in(tmp_path):
    sae = load_sae(write_saelens(tmp_path / "s", "topk", k=3))
    check_d_in(sae, 4)
    check_d_in(sae, 16, "1.attn.h0", n_head=4)
    with pytest.raises(UserError, match="reads 4-wide activations but site 2.resid of this model is 8 wide"):
        check_d_in(sae, 8)
    with pytest.raises(UserError):
        check_d_in(sae, 16, "1.attn.h0", n_head=2)


# -- hook names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hook,head,site", [
    ("blocks.10.hook_mlp_out", None, "10.mlp"),
    ("blocks.10.hook_resid_post", None, "10.resid"),
    ("blocks.10.hook_resid_pre", None, "9.resid"),
    ("blocks.1.hook_resid_pre", None, "0.resid"),
    ("blocks.10.hook_attn_out", None, "10.attn"),
    ("blocks.10.attn.hook_z", 3, "10.attn.h3"),
    ("blocks.10.attn.hook_z", None, "10.attn.heads"),
    ("layers.10", None, "10.resid"),
    ("model.layers.10", None, "10.resid"),
    ("gpt_neox.layers.10", None, "10.resid"),
    ("transformer.h.10", None, "10.resid"),
    ("h.10", None, "10.resid"),
    ("layers.10.mlp", None, "10.mlp"),
    ("model.layers.10.mlp", None, "10.mlp"),
    ("transformer.h.10.mlp", None, "10.mlp"),
    ("model.layers.10.self_attn", None, "10.attn"),
    ("gpt_neox.layers.10.attention", None, "10.attn"),
    ("transformer.h.10.attn", None, "10.attn"),
])
def test_site_for_hook(hook, head, site):
    assert site_for_hook(hook, head) == site


@pytest.mark.parametrize("hook,head,text", [
    ("blocks.0.hook_resid_pre", None, "embedding"),
    ("blocks.3.hook_resid_mid", None, "known forms"),
    ("blocks.3.mlp.hook_post", None, "known forms"),
    ("layers.3.mlp.act", None, "known forms"),
    ("hook_embed", None, "known forms"),
    ("blocks.3.hook_mlp_out", 2, "only applies"),
    ("layers.3", 1, "only applies"),
    ("blocks.3.attn.hook_z", -1, "nonnegative"),
])
def test_site_for_hook_refuses(hook, head, text):
    with pytest.raises(UserError) as e:
        site_for_hook(hook, head)
    assert text in str(e.value) and "\n" not in str(e.value)


# -- bad folders ------------------------------------------------------------------------------------------

def _nan_w_enc():
    w = W_ENC.clone()
    w[0, 0] = float("nan")
    return w


def _weights_dir(d: Path) -> Path:
    write_saelens(d)
    (d / "sae_weights.safetensors").unlink()
    (d / "sae_weights.safetensors").mkdir()
    return d


def _inf_b_dec():
    return torch.tensor([0.0, float("inf"), 0, 0])


BAD = {
    "missing": (lambda d: d / "nope", "does not exist"),
    "file": (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", "not a directory"),
    "empty": (lambda d: (d / "e").mkdir() or d / "e", "neither an SAELens SAE"),
    "cfg-only": (lambda d: (d / "c").mkdir() or (d / "c" / "cfg.json").write_text("{}") and d / "c", "neither"),
    "no-cfg": (lambda d: (write_saelens(d / "s") / "cfg.json").unlink() or d / "s", "has no cfg.json"),
    "bad-json": (lambda d: (write_saelens(d / "s") / "cfg.json").write_text("{d_in: 4") and d / "s", "not valid JSON"),
    "json-nan": (lambda d: (write_saelens(d / "s") / "cfg.json").write_text('{"d_in": NaN}') and d / "s",
                 "not valid JSON"),
    "json-list": (lambda d: (write_saelens(d / "s") / "cfg.json").write_text("[1]") and d / "s", "not a JSON object"),
    "no-d_in": (lambda d: write_saelens(d / "s", cfg_extra={"d_in": None}), "'d_in' must be an integer"),
    "bad-d_sae": (lambda d: write_saelens(d / "s", cfg_extra={"d_sae": "6"}), "'d_sae' must be an integer"),
    "no-k": (lambda d: write_saelens(d / "s", cfg_extra={"k": ...}), "missing key 'k'"),
    "null-k": (lambda d: write_saelens(d / "s", cfg_extra={"k": None}), "'k' must be an integer"),
    "no-d_sae": (lambda d: write_saelens(d / "s", cfg_extra={"d_sae": ...}), "missing key 'd_sae'"),
    "k-too-big": (lambda d: write_saelens(d / "s", k=7), "exceeds the number of latents"),
    "no-hook": (lambda d: write_saelens(d / "s", hook=""), "no hook name"),
    "unknown-hook": (lambda d: write_saelens(d / "s", hook="blocks.1.hook_resid_mid"), "known forms"),
    "missing-tensor": (lambda d: write_saelens(d / "s", tensors={"W_dec": None}), "missing tensor 'W_dec'"),
    "missing-threshold": (lambda d: write_saelens(d / "s", "jumprelu", tensors={"threshold": None}),
                          "missing tensor 'threshold'"),
    "missing-gate": (lambda d: write_saelens(d / "s", "gated", tensors={"r_mag": None}), "missing tensor 'r_mag'"),
    "shape": (lambda d: write_saelens(d / "s", cfg_extra={"d_sae": 5}, k=3), "has shape [4, 6] but cfg.json implies"),
    "shape-transposed": (lambda d: write_saelens(d / "s", tensors={"W_enc": W_ENC.T.contiguous()}),
                         "tensor 'W_enc' has shape [6, 4]"),
    "nan": (lambda d: write_saelens(d / "s", tensors={"W_enc": _nan_w_enc()}), "NaN or infinite"),
    "inf": (lambda d: write_saelens(d / "s", tensors={"b_dec": _inf_b_dec()}), "NaN or infinite"),
    "int-tensor": (lambda d: write_saelens(d / "s", tensors={"b_enc": torch.zeros(D_SAE, dtype=torch.int32)}),
                   "not a float type"),
    "int-dtype-cfg": (lambda d: write_saelens(d / "s", cfg_extra={"dtype": "int8"}), "not a float type"),
    "not-safetensors": (lambda d: (write_saelens(d / "s") / "sae_weights.safetensors").write_bytes(b"\x80\x04junk")
                        and d / "s", "cannot read"),
    "weights-dir": (lambda d: _weights_dir(d / "w"), "not a regular file"),
    "architecture": (lambda d: write_saelens(d / "s", "matching_pursuit"), "architecture 'matching_pursuit'"),
    "activation-fn": (lambda d: write_saelens(d / "s", "standard", cfg_extra={"activation_fn": "tanh-relu"}),
                      "activation function 'tanh-relu'"),
    "saelens-transcoder": (lambda d: write_saelens(d / "s", "transcoder"), "transcoder"),
    "norm-layer": (lambda d: write_saelens(d / "s", cfg_extra={"normalize_activations": "layer_norm"}),
                   "normalize_activations 'layer_norm' is not supported"),
    "norm-average": (lambda d: write_saelens(d / "s", cfg_extra={"normalize_activations": "expected_average_only_in"}),
                     "scaling factor is not stored"),
    "norm-legacy-true": (lambda d: write_saelens(d / "s", legacy=True, cfg_extra={"normalize_activations": True}),
                         "expected_average_only_in"),
    "norm-unknown": (lambda d: write_saelens(d / "s", cfg_extra={"normalize_activations": "zscore"}),
                     "unknown normalisation"),
    "bool-flag": (lambda d: write_saelens(d / "s", cfg_extra={"apply_b_dec_to_input": "yes"}), "true or false"),
    "sparsify-transcoder": (lambda d: write_sparsify(d / "layers.1", cfg_extra={"transcode": True}), "transcoder"),
    "sparsify-activation": (lambda d: write_sparsify(d / "layers.1", activation="relu"), "activation 'relu'"),
    "sparsify-groupmax": (lambda d: write_sparsify(d / "layers.1", activation="groupmax", k=4), "divisible"),
    "sparsify-shape": (lambda d: write_sparsify(d / "layers.1", tensors={"W_dec": W_ENC.clone()}),
                       "tensor 'W_dec' has shape [4, 6]"),
    "sparsify-skip": (lambda d: write_sparsify(d / "layers.1", cfg_extra={"skip_connection": True}),
                      "missing tensor 'W_skip'"),
    "sparsify-no-decoder": (lambda d: write_sparsify(d / "layers.1", tensors={"W_dec": None}),
                            "missing tensor 'W_dec'"),
    "sparsify-hookpoint": (lambda d: write_sparsify(d / "embed_tokens"), "known forms"),
    "sparsify-expansion": (lambda d: write_sparsify(d / "layers.1", cfg_extra={"num_latents": 0,
                                                                               "expansion_factor": 2}),
                           "has shape [6, 4] but cfg.json implies [8, 4]"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_folders(tmp_path, case):
    make, text = BAD[case]
    target = make(tmp_path)
    with pytest.raises(UserError) as e:
        load_sae(target)
    msg = str(e.value)
    assert "\n" not in msg and text in msg, msg
    assert str(tmp_path) in msg  # names the file or folder


# -- the libraries' own encoders --------------------------------------------------------------------------

def _dense(sae, x):
    ids, acts = sae.encode(x)
    return torch.zeros(x.shape[0], sae.d_sae).scatter_(1, ids, acts)


@pytest.mark.parametrize("arch", ["standard", "topk", "topk-rescale", "jumprelu", "gated"])
def test_matches_saelens(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    d_in, d_sae, k = 16, 64, 8
    meta = SAEMetadata(model_name="tiny", hook_name="blocks.1.hook_mlp_out", hook_head_index=None)
    if arch.startswith("topk"):
        cfg = sae_lens.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=meta,
                                     rescale_acts_by_decoder_norm=arch == "topk-rescale")
        ref = sae_lens.TopKSAE(cfg)
    else:
        cls = {"standard": sae_lens.StandardSAE, "jumprelu": sae_lens.JumpReLUSAE, "gated": sae_lens.GatedSAE}[arch]
        cfg_cls = {"standard": sae_lens.StandardSAEConfig, "jumprelu": sae_lens.JumpReLUSAEConfig,
                   "gated": sae_lens.GatedSAEConfig}[arch]
        ref = cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=meta))
    with torch.no_grad():  # random biases and thresholds, so that every path matters
        for name, p in ref.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.copy_(torch.randn_like(p) * 0.3)
            if name == "threshold":
                p.copy_(torch.rand_like(p) * 0.5)
            if name == "W_dec" and arch == "topk-rescale":
                p.mul_(torch.rand(d_sae, 1) + 0.5)
    ref.save_model(tmp_path / "s")
    ref = sae_lens.SAE.load_from_disk(tmp_path / "s")

    x = torch.randn(200, d_in)
    with torch.no_grad():
        want = ref.encode(x)
        want_out = ref.decode(want)
    ours = load_sae(tmp_path / "s", k_max=None if arch.startswith("topk") else d_sae)
    assert ours.site == "1.mlp"
    assert torch.allclose(_dense(ours, x), want, atol=1e-5)
    ids, acts = ours.encode(x)
    assert torch.allclose(ours.reconstruct(ids, acts), want_out, atol=1e-5)
    if not arch.startswith("topk"):  # with a k_max cap: the k_max largest of SAELens's activations
        capped = load_sae(tmp_path / "s", k_max=4)
        ids, acts = capped.encode(x)
        assert torch.allclose(acts, want.topk(4, dim=1).values, atol=1e-5)
        l0 = (want > 0).sum(1)
        share = (l0 - 4).clamp(min=0).sum() / l0.sum()
        assert truncation_stats(capped, x)["dropped_latent_share"] == pytest.approx(float(share))


@pytest.mark.parametrize("variant", ["topk", "groupmax", "skip"])
def test_matches_sparsify(tmp_path, variant):
    sparsify = pytest.importorskip("sparsify")

    torch.manual_seed(0)
    d_in, d_sae, k = 16, 64, 8
    cfg = sparsify.SparseCoderConfig(activation="groupmax" if variant == "groupmax" else "topk", k=k,
                                     num_latents=d_sae, skip_connection=variant == "skip")
    ref = sparsify.SparseCoder(d_in, cfg)
    with torch.no_grad():
        ref.encoder.bias.copy_(torch.randn(d_sae) * 0.3)
        ref.b_dec.copy_(torch.randn(d_in) * 0.3)
        if ref.W_skip is not None:
            ref.W_skip.copy_(torch.randn(d_in, d_in) * 0.1)
    ref.save_to_disk(tmp_path / "run" / "layers.3.mlp")
    ref = sparsify.SparseCoder.load_from_disk(tmp_path / "run" / "layers.3.mlp")

    x = torch.randn(200, d_in)
    with torch.no_grad():
        top_acts, top_indices, _ = ref.encode(x)
        want = torch.zeros(200, d_sae).scatter_(1, top_indices, top_acts)
        want_out = ref(x).sae_out
    ours = load_sae(tmp_path / "run")
    assert (ours.site, ours.k, ours.architecture) == ("3.mlp", k, cfg.activation)
    assert torch.allclose(_dense(ours, x), want, atol=1e-5)
    ids, acts = ours.encode(x)
    assert torch.allclose(ours.reconstruct(ids, acts, x), want_out, atol=1e-5)
