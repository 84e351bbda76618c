"""`cbtool embed --sae`: a tiny random GPT-2 and tiny SAE folders (SAELens and sparsify, written here with
safetensors), embedded through the real CLI; the stored ids and activations equal `load_sae(...).encode` of the
activations captured by hand; the analysis commands read the store; bad input exits 2 with one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
pytest.importorskip("tokenizers", reason="the `hf` extra (tokenizers) is not installed")

import transformers  # noqa: E402

from cbtool.formats.sae import load_sae  # noqa: E402
from cbtool.formats.store import Store  # noqa: E402
from cbtool.tasks.corpora import Source  # noqa: E402
from cbtool.tasks.text import train_bpe  # noqa: E402
from tests.helpers import run_cli  # noqa: E402

TEXT = ("In January the snow lay deep; in February the rivers froze. Thou art fair, and thy voice is sweet. "
        "The king spoke to his lords, and they answered him with one voice. ") * 12
D_MODEL, D_SAE = 32, 48
DEAD = 47  # a latent that never fires: zero encoder column, negative bias


def gpt2_dir(root: Path) -> Path:
    tok = train_bpe([Source("t", TEXT)], 300)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=64, n_embd=D_MODEL, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    d = root / "gpt2"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token="<|endoftext|>").save_pretrained(d)
    return d


def weights(d_in: int = D_MODEL, seed: int = 1, bias: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w_enc = torch.randn(d_in, D_SAE, generator=g)
    b_enc = torch.full((D_SAE,), bias)
    w_enc[:, DEAD], b_enc[DEAD] = 0.0, -1.0
    return w_enc, b_enc, (torch.randn(D_SAE, d_in, generator=g) / 4)


def saelens_dir(d: Path, hook: str = "blocks.1.hook_resid_post", arch: str = "topk", d_in: int = D_MODEL,
                bias: float = 0.0) -> Path:
    d.mkdir(parents=True)
    w_enc, b_enc, w_dec = weights(d_in, bias=bias)
    save_file({"W_enc": w_enc, "W_dec": w_dec, "b_dec": torch.zeros(d_in), "b_enc": b_enc},
              str(d / "sae_weights.safetensors"))
    cfg = {"d_in": d_in, "d_sae": D_SAE, "architecture": arch, "normalize_activations": "none",
           "apply_b_dec_to_input": True, "metadata": {"hook_name": hook}}
    if arch == "topk":
        cfg["k"] = 4
    (d / "cfg.json").write_text(json.dumps(cfg))
    return d


def sparsify_dir(d: Path, k: int = 3) -> Path:
    d.mkdir(parents=True)
    w_enc, b_enc, w_dec = weights(seed=2)
    save_file({"encoder.weight": w_enc.T.contiguous(), "encoder.bias": b_enc, "W_dec": w_dec,
               "b_dec": torch.zeros(D_MODEL)}, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": D_SAE, "k": k, "d_in": D_MODEL}))
    return d


def make_world(root: Path) -> dict[str, Path]:
    """A corpus, a tiny GPT-2, three SAE folders and a store embedded through the topk one."""
    (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
    w = {"root": root, "corpus": root / "corpus.txt", "gpt2": gpt2_dir(root),
         "topk": saelens_dir(root / "topk"), "relu": saelens_dir(root / "relu", "blocks.0.hook_mlp_out", "standard",
                                                                 bias=0.05),
         "sparsify": sparsify_dir(root / "run" / "transformer.h.0")}
    w["store"] = root / "codes"
    res = run_cli("embed", "--sae", w["topk"], "--base-model", w["gpt2"], "--corpus", w["corpus"], "--out",
                  w["store"], "--shard-tokens", "300", "--device", "cpu")
    assert res.exit_code == 0, res.output
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return make_world(tmp_path_factory.mktemp("sae"))


def captured(gpt2: Path, module: str, docs: list[np.ndarray]) -> torch.Tensor:
    """The activations at `module` (a dotted path in the HF model) of every document, read by a hook set here."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2).eval()
    got: list[torch.Tensor] = []
    target = model.get_submodule(module)
    handle = target.register_forward_hook(lambda _m, _a, out: got.append((out[0] if isinstance(out, tuple)
                                                                           else out)[0].detach()))
    with torch.no_grad():
        for toks in docs:
            model(torch.tensor(toks.astype(np.int64))[None])
    handle.remove()
    return torch.cat(got)


def captured_input(gpt2: Path, module: str, docs: list[np.ndarray]) -> torch.Tensor:
    """The input of `module` for every document (a forward pre-hook set here)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2).eval()
    got: list[torch.Tensor] = []
    handle = model.get_submodule(module).register_forward_pre_hook(lambda _m, args: got.append(args[0][0].detach()))
    with torch.no_grad():
        for toks in docs:
            model(torch.tensor(toks.astype(np.int64))[None])
    handle.remove()
    return torch.cat(got)


def store_docs(store: Store) -> list[np.ndarray]:
    out = []
    for s in range(store.num_shards):
        toks, offs = np.asarray(store.tokens(s)), np.asarray(store.doc_offsets(s))
        out += [toks[a:b] for a, b in zip(offs[:-1], offs[1:], strict=True)]
    return out


def stored(store: Store, site: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([np.asarray(store.codes(s, site)) for s in range(store.num_shards)])
    acts = np.concatenate([np.asarray(store.acts(s, site)) for s in range(store.num_shards)])
    return ids.astype(np.int64), acts


def check_against_encode(store: Store, sae_dir: Path, module: str, gpt2: Path, k_max: int | None = None) -> None:
    site = next(iter(store.sites))
    ids, acts = stored(store, site)
    sae = load_sae(sae_dir, k_max)
    want_ids, want_acts = sae.encode(captured(gpt2, module, store_docs(store)))
    want_acts = want_acts.half().numpy()
    assert acts.dtype == np.float16 and ids.shape == want_acts.shape == (store.num_tokens, sae.k)
    np.testing.assert_allclose(acts.astype(np.float32), want_acts.astype(np.float32), rtol=2e-3, atol=1e-3)
    fired = acts > 0
    assert np.array_equal(ids[fired], want_ids.numpy()[fired])
    assert (ids[~fired] == D_SAE).all()  # a slot that did not fire holds the padding code
    counts = store.counts(site)
    assert np.array_equal(counts, np.bincount(ids[fired], minlength=D_SAE + 1)) and counts[DEAD] == counts[D_SAE] == 0


def test_topk_store_equals_encode(world):
    store = Store(world["store"])
    assert list(store.sites) == ["1.resid"] and store.num_shards > 1
    man = store.manifest
    assert man["sae"]["format"] == "saelens" and man["sae"]["k"] == 4 and man["sae"]["k_fixed"] is True
    assert set(man["sae"]["files"]) == {"cfg.json", "sae_weights.safetensors"}
    assert man["sae"]["truncation"]["dropped_latent_share"] == 0.0 and man["base_model"]["kind"] == "hf"
    assert man["sites"][0]["dtype"] == "uint8" and man["sites"][0]["acts"] == "float16"
    check_against_encode(store, world["topk"], "transformer.h.1", world["gpt2"])
    args = ("embed", "--base-model", world["gpt2"], "--corpus", world["corpus"], "--out", world["store"],
            "--shard-tokens", "300", "--device", "cpu")
    res = run_cli(*args, "--sae", world["topk"])  # the same again: complete, nothing written
    assert res.exit_code == 0 and "is complete; nothing to do" in res.stderr, res.output
    res = run_cli(*args, "--sae", world["root"] / "run")  # another SAE into the same store: refused
    assert res.exit_code == 2 and "was written with a different" in res.stderr, res.output


def test_sparsify_and_relu_k_max(world, tmp_path):
    res = run_cli("embed", "--sae", world["root"] / "run", "--base-model", world["gpt2"], "--corpus",
                  world["corpus"], "--out", tmp_path / "sp", "--device", "cpu")
    assert res.exit_code == 0, res.output
    store = Store(tmp_path / "sp")
    assert list(store.sites) == ["0.resid"] and store.manifest["sae"]["format"] == "sparsify"
    check_against_encode(store, world["sparsify"], "transformer.h.0", world["gpt2"])

    res = run_cli("embed", "--sae", world["relu"], "--base-model", world["gpt2"], "--corpus", world["corpus"],
                  "--out", tmp_path / "relu", "--k-max", "2", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    store = Store(tmp_path / "relu")
    tr = store.manifest["sae"]["truncation"]
    assert store.manifest["sae"]["k"] == 2 and list(store.sites) == ["0.mlp"]
    assert tr["tokens"] == store.num_tokens and tr["mean_l0"] > 2 and 0 < tr["dropped_latent_share"] < 1
    check_against_encode(store, world["relu"], "transformer.h.0.mlp", world["gpt2"], k_max=2)
    # --site reads another site of the same width
    res = run_cli("embed", "--sae", world["relu"], "--base-model", world["gpt2"], "--corpus", world["corpus"],
                  "--out", tmp_path / "moved", "--site", "1.attn", "--device", "cpu")
    assert res.exit_code == 0 and list(Store(tmp_path / "moved").sites) == ["1.attn"]
    # one head's input to the attention output projection (hook_z with a head index): 8 wide
    head = saelens_dir(tmp_path / "head", "blocks.1.attn.hook_z", "standard", d_in=D_MODEL // 4, bias=0.05)
    cfg = json.loads((head / "cfg.json").read_text())
    cfg["metadata"]["hook_head_index"] = 2
    (head / "cfg.json").write_text(json.dumps(cfg))
    res = run_cli("embed", "--sae", head, "--base-model", world["gpt2"], "--corpus", world["corpus"],
                  "--out", tmp_path / "head-codes", "--device", "cpu")
    assert res.exit_code == 0, res.output
    store = Store(tmp_path / "head-codes")
    assert list(store.sites) == ["1.attn.h2"] and store.manifest["sites"][0]["group"] == 2
    ids, acts = stored(store, "1.attn.h2")
    x = captured_input(world["gpt2"], "transformer.h.1.attn.c_proj", store_docs(store))[:, 16:24]
    want_ids, want_acts = load_sae(head).encode(x)
    assert np.allclose(acts.astype(np.float32), want_acts.half().float().numpy(), atol=1e-3)
    assert np.array_equal(ids[acts > 0], want_ids.numpy()[acts > 0])


def test_analysis_commands_read_the_store(world, tmp_path):
    st = world["store"]
    res = run_cli("find-codes", st, "--regex", "king", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"]
    res = run_cli("show-code", st, "1.resid:3", "--examples", "5", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    store = Store(st)
    assert doc["fires"] == int(store.counts("1.resid")[3])
    acts = [e["activation"] for e in doc["examples"]]
    ids, a = stored(store, "1.resid")
    top = np.sort(a[(ids == 3) & (a > 0)].astype(np.float32))[::-1][:5]
    assert acts == sorted(acts, reverse=True) and np.allclose(acts, top)
    assert "strongest activations first" in run_cli("show-code", st, "1.resid:3").stdout
    res = run_cli("show-code", st, "1.resid:3", "--similar", "3", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["similar"]["cosine"], res.output
    for args in (("dead-codes", st), ("info", st), ("explain", st)):
        res = run_cli(*args)
        assert res.exit_code == 0, (args, res.output)
    usage = json.loads(run_cli("dead-codes", st, "--json").stdout)
    assert usage["sites"][0]["codes"] == D_SAE and DEAD in usage["sites"][0]["dead_codes"]
    assert f"{D_SAE} latents at 1.resid" in run_cli("info", st).stdout
    res = run_cli("report", st, "--out", tmp_path / "r.html")
    assert res.exit_code == 0 and "nearest codes by cosine are not shown" not in res.output, res.output


def test_builtin_checkpoint_base(tiny_checkpoint_master, tmp_path):
    meta = json.loads((tiny_checkpoint_master / "cbtool.json").read_text())
    d_model = int(meta["model"]["config"]["d_model"])
    sae = saelens_dir(tmp_path / "sae", "blocks.0.hook_resid_post", d_in=d_model)
    res = run_cli("embed", "--sae", sae, "--base-model", tiny_checkpoint_master, "--num-seqs", "8", "--out",
                  tmp_path / "codes", "--device", "cpu")
    assert res.exit_code == 0, res.output
    store = Store(tmp_path / "codes")
    assert list(store.sites) == ["0.resid"] and store.label_names == ["state"]
    assert store.manifest["base_model"]["kind"] == "cbtool"


def test_bad_input_exit_2(world, tmp_path):
    def one_line(*args, needle):
        res = run_cli("embed", *args, "--out", tmp_path / "x", "--device", "cpu")
        assert res.exit_code == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            res.output

    base = ("--base-model", world["gpt2"], "--corpus", world["corpus"])
    one_line("--sae", saelens_dir(tmp_path / "w16", d_in=16), *base, needle="16-wide")
    one_line("--sae", saelens_dir(tmp_path / "hook", "blocks.0.hook_bogus"), *base, needle="no cbtool site")
    (tmp_path / "empty").mkdir()
    one_line("--sae", tmp_path / "empty", *base, needle="neither an SAELens SAE")
    one_line("--sae", world["topk"], "--corpus", world["corpus"], needle="--base-model")
    one_line("--sae", world["topk"], *base, "--k-max", "8", needle="k_max")
    one_line("--sae", world["topk"], *base, "--site", "7.resid", needle="layers 0-1")
    one_line("--sae", world["topk"], *base, "--site", "1.nowhere", needle="unknown site")
    one_line("--sae", world["topk"], "--base-model", world["gpt2"], needle="--corpus")
    one_line("--site", "1.resid", needle="applies to --sae")
    bad = saelens_dir(tmp_path / "trunc")
    (bad / "sae_weights.safetensors").write_bytes(b"not safetensors")
    one_line("--sae", bad, *base, needle="safetensors")


def test_document_level_never_lists_the_padding_code(world, tmp_path):
    """Tokens with fewer active latents than --k-max pad their slots with code d_sae; it is in every document's
    slots but never fires, so document-level find-codes does not score it."""
    out = tmp_path / "relu-codes"
    res = run_cli("embed", "--sae", world["relu"], "--base-model", world["gpt2"], "--corpus", world["corpus"],
                  "--k-max", "40", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    store = Store(out)
    ids, _ = stored(store, "0.mlp")
    assert (ids == D_SAE).any()  # padding is there
    res = run_cli("find-codes", out, "--regex", "king|snow", "--level", "document", "--min-count", "1", "--top", "0",
                  "--json")
    assert res.exit_code in (0, 1), res.output
    codes = [r["code"] for r in json.loads(res.stdout)["rows"]]
    assert codes and f"0.mlp:{D_SAE}" not in codes
