"""`cbtool eval --sae` (an SAE spliced into its base: loss spliced / bypassed / zeroed, fvu, L0, alive) and
`cbtool eval --sites` (a checkpoint's codebooks on at some sites only), through the real CLI on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")

from cbtool.analysis.sae_eval import sae_eval  # noqa: E402
from cbtool.formats.sae import load_sae, open_base  # noqa: E402
from cbtool.model.sites import hook_site  # noqa: E402
from cbtool.tasks.evaluate import mean_loss  # noqa: E402
from cbtool.tasks.text import TextTask, load_hf_tokenizer  # noqa: E402
from tests.embedding.test_sae_embed import D_MODEL, make_world  # noqa: E402
from tests.helpers import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("sae-eval"))


def exact_sae(d: Path, hook: str = "blocks.1.hook_resid_post") -> Path:
    """A TopK SAE that reconstructs every input exactly: latents +e_i and -e_i, k = d_in (x = relu(x) - relu(-x),
    and each coordinate fires at most one of its pair)."""
    d.mkdir(parents=True)
    eye = torch.eye(D_MODEL)
    save_file({"W_enc": torch.cat([eye, -eye], 1).contiguous(), "b_enc": torch.zeros(2 * D_MODEL),
               "W_dec": torch.cat([eye, -eye], 0).contiguous(), "b_dec": torch.zeros(D_MODEL)},
              str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"d_in": D_MODEL, "d_sae": 2 * D_MODEL, "architecture": "topk",
                                            "k": D_MODEL, "apply_b_dec_to_input": True,
                                            "normalize_activations": "none", "metadata": {"hook_name": hook}}))
    return d


def heldout(world) -> list[torch.Tensor]:
    task = TextTask(lambda: load_hf_tokenizer(world["gpt2"]), str(world["corpus"]), "text", 64, "hf")
    return list(task.heldout_blocks.split(16))


def test_exact_sae_loses_nothing(world, tmp_path):
    base = open_base(world["gpt2"])
    res = sae_eval(base, load_sae(exact_sae(tmp_path / "exact")), heldout(world), "cpu")
    assert res["spliced"]["loss"] == pytest.approx(res["bypassed"]["loss"], abs=1e-4)
    assert res["fvu"] < 1e-6 and res["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert res["ablated"]["loss"] != pytest.approx(res["bypassed"]["loss"], abs=1e-3)
    assert res["l0"] <= D_MODEL and res["site"] == "1.resid"


def test_spliced_and_zeroed_match_hand_hooks(world):
    base, sae, chunks = open_base(world["gpt2"]), load_sae(world["topk"]), heldout(world)
    res = sae_eval(base, sae, chunks, "cpu")

    def by_hand(fn) -> float:
        h = hook_site(base.locator, "1.resid", fn)
        try:
            return mean_loss(base.model, chunks, "cpu")
        finally:
            h.remove()

    def recon(x):
        flat = x.reshape(-1, x.shape[-1])
        ids, acts = sae.encode(flat)
        return sae.reconstruct(ids, acts).view_as(x)

    assert res["spliced"]["loss"] == pytest.approx(by_hand(recon), rel=1e-5)
    assert res["ablated"]["loss"] == pytest.approx(by_hand(torch.zeros_like), rel=1e-5)
    assert res["bypassed"]["loss"] == pytest.approx(mean_loss(base.model, chunks, "cpu"), rel=1e-6)
    zero, on, off = res["ablated"]["loss"], res["spliced"]["loss"], res["bypassed"]["loss"]
    assert res["loss_recovered"] == pytest.approx((zero - on) / (zero - off))
    assert res["l0"] == pytest.approx(4.0) and 0 < res["alive"] < 1  # k = 4; latent DEAD never fires
    # the hook is gone: the base model is the base model again
    assert mean_loss(base.model, chunks, "cpu") == pytest.approx(off, rel=1e-6)


def test_eval_sae_cli(world):
    res = run_cli("eval", "--sae", world["topk"], "--base-model", world["gpt2"], "--corpus", world["corpus"],
                  "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["site"] == "1.resid" and doc["k"] == 4 and doc["format"] == "saelens"
    assert doc["heldout_tokens"] > 0 and doc["spliced"]["loss"] > 0
    res = run_cli("eval", "--sae", world["topk"], "--base-model", world["gpt2"], "--corpus", world["corpus"],
                  "--device", "cpu")
    assert res.exit_code == 0 and "loss recovered" in res.stdout and "SAE spliced" in res.stdout, res.output


def test_eval_sae_on_a_checkpoint_base(tiny_checkpoint_master, tmp_path):
    meta = json.loads((tiny_checkpoint_master / "cbtool.json").read_text())
    d_model = int(meta["model"]["config"]["d_model"])
    sae = tmp_path / "sae"
    sae.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(d_model, 16, generator=g), "b_enc": torch.zeros(16),
               "W_dec": torch.randn(16, d_model, generator=g) / 4, "b_dec": torch.zeros(d_model)},
              str(sae / "sae_weights.safetensors"))
    (sae / "cfg.json").write_text(json.dumps({"d_in": d_model, "d_sae": 16, "architecture": "topk", "k": 2,
                                              "metadata": {"hook_name": "blocks.0.hook_mlp_out"}}))
    res = run_cli("eval", "--sae", sae, "--base-model", tiny_checkpoint_master, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["site"] == "0.mlp" and doc["base_model"]["kind"] == "cbtool" and doc["heldout_tokens"] > 0


def test_eval_sites_switches_only_those_codebooks(tiny_checkpoint_master):
    full = run_cli("eval", tiny_checkpoint_master, "--device", "cpu", "--samples", "16", "--json")
    assert full.exit_code == 0, full.output
    all_on = json.loads(full.stdout)
    sites = list(all_on["code_usage"])
    mlp = next(s for s in sites if s.endswith(".mlp"))
    assert len(sites) >= 2
    res = run_cli("eval", tiny_checkpoint_master, "--device", "cpu", "--samples", "16", "--json", "--sites", mlp)
    assert res.exit_code == 0, res.output
    one = json.loads(res.stdout)
    assert one["sites_on"] == [mlp] and list(one["code_usage"]) == [mlp]
    assert one["bypassed"]["loss"] == pytest.approx(all_on["bypassed"]["loss"], rel=1e-6)
    assert one["on"]["loss"] != pytest.approx(all_on["on"]["loss"], rel=1e-6)
    assert one["code_usage"][mlp] == pytest.approx(all_on["code_usage"][mlp])
    head = next(s for s in sites if ".attn.h" in s)  # one head of a per-head codebook: switched whole or not
    res = run_cli("eval", tiny_checkpoint_master, "--device", "cpu", "--samples", "16", "--sites", head)
    assert res.exit_code == 2 and "switched on or off whole" in res.output, res.output


@pytest.mark.parametrize("args, needle", [
    (("--sae", "{topk}"), "go together"),
    (("--base-model", "{gpt2}"), "go together"),
    (("--sae", "{topk}", "--base-model", "{gpt2}"), "needs --corpus"),
    (("--sae", "{topk}", "--base-model", "{gpt2}", "--corpus", "{corpus}", "--sites", "1.resid"), "--sites applies"),
    (("--sae", "{topk}", "--base-model", "{gpt2}", "--corpus", "{corpus}", "--site", "7.resid"), "7"),
    (("--sae", "{topk}", "--base-model", "{gpt2}", "--corpus", "{corpus}", "--blocks", "0"), "--blocks"),
    (("--sae", "{root}", "--base-model", "{gpt2}", "--corpus", "{corpus}"), "SAE"),
    (("--corpus", "{corpus}",), "applies to --sae"),
])
def test_bad_input_exit_2(world, args, needle):
    res = run_cli("eval", *[a.format(**world) for a in args], "--device", "cpu")
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 or needle in res.output.strip().splitlines()[-1]


def test_eval_sites_bad_pattern(tiny_checkpoint_master):
    res = run_cli("eval", tiny_checkpoint_master, "--sites", "9.nothing", "--device", "cpu")
    assert res.exit_code == 2 and "matches no site" in res.output, res.output
