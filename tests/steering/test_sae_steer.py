"""`cbtool intervene --sae`: SAE latents steered on a tiny random GPT-2 (folders from
tests/embedding/test_sae_embed.py): the edits equal x - act*W_dec, x + s*W_dec and x + (v - act)*W_dec at the
site, an inactive latent's ablation changes nothing, twins and rates through the real CLI, bad input exit 2."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")

from cbtool.formats.sae import load_sae, open_base  # noqa: E402
from cbtool.model.sites import hook_site  # noqa: E402
from cbtool.steering.sae import LatentIntervention, SAEModel  # noqa: E402
from tests.embedding.test_sae_embed import DEAD, make_world  # noqa: E402
from tests.helpers import run_cli  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("sae"))


def edited(world, ivs: list[LatentIntervention]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x unsteered, x steered, W_dec) at 1.resid for one prompt: row 0 steered, row 1 its twin."""
    base = open_base(world["gpt2"])
    sae = load_sae(world["topk"])
    model = SAEModel(base, sae)
    idx = torch.tensor([base.task.encode("The king spoke")] * 2)
    seen: list[torch.Tensor] = []
    with model.steering([ivs, []], "all") as fwd:
        h = hook_site(base.locator, "1.resid", lambda x: seen.append(x.detach().clone()))  # after the edit
        try:
            fwd(idx)
        finally:
            h.remove()
    return seen[0][1], seen[0][0], sae


def test_edit_formulas(world):
    x, _, sae = edited(world, [])
    ids, acts = sae.encode(x)
    tok, slot = 1, 0
    latent, act = int(ids[tok, slot]), acts[tok, slot]
    assert act > 0
    d = sae.W_dec[latent]
    x0, xa, _ = edited(world, [LatentIntervention("1.resid", latent, "ablate")])
    assert torch.allclose(xa[tok], x0[tok] - act * d, atol=1e-5)
    _, xs, _ = edited(world, [LatentIntervention("1.resid", latent, "add", strength=3.0)])
    assert torch.allclose(xs, x0 + 3.0 * d, atol=1e-5)
    _, xv, _ = edited(world, [LatentIntervention("1.resid", latent, "set", value=7.0)])
    assert torch.allclose(xv[tok], x0[tok] + (7.0 - act) * d, atol=1e-5)
    _, xd, _ = edited(world, [LatentIntervention("1.resid", DEAD, "ablate")])
    assert torch.equal(xd, edited(world, [])[1])  # an inactive latent: nothing to remove, bit for bit


def test_intervene_cli(world):
    common = ("--sae", world["topk"], "--base-model", world["gpt2"], "-p", "The king", "-n", "3",
              "--max-new-tokens", "6", "--device", "cpu")
    res = run_cli("intervene", *common, "--code", f"1.resid:{DEAD}", "--mode", "ablate", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["changed"] == 0.0 and doc["interventions"] == [{"code": f"1.resid:{DEAD}", "mode": "ablate"}]
    res = run_cli("intervene", *common, "--code", "1.resid:3", "--mode", "add", "--strength", "40", "--regex", ".",
                  "--jsonl")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 3 and any(r["steered"] != r["baseline"] for r in rows)
    assert {r["seed"] for r in rows} == {0, 1, 2}
    res = run_cli("intervene", *common, "--code", "1.resid:3", "--mode", "set", "--store", world["store"], "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["interventions"][0]["value"] > 0
    res = run_cli("intervene", *common, "--code", "1.resid:3", "--mode", "ablate", "--store", world["store"])
    assert res.exit_code == 0 and "1.resid:3: " in res.stdout, res.output


def test_bad_input_exit_2(world):
    common = ("--sae", world["topk"], "--base-model", world["gpt2"], "--device", "cpu", "-n", "1")
    for args, needle in (
        (("--code", "1.resid:3"), "unknown --mode 'force'"),
        (("--code", "1.resid:3", "--mode", "set"), "--mode set needs --value"),
        (("--code", "0.resid:3", "--mode", "add"), "reads site 1.resid"),
        (("--code", "1.resid:480", "--mode", "add"), "out of range"),
        (("--code", f"1.resid:{DEAD}", "--mode", "set", "--store", world["store"]), "never fires"),
    ):
        res = run_cli("intervene", *common, *args)
        assert res.exit_code == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, \
            (args, res.output)
    res = run_cli("intervene", "--sae", world["topk"], "--code", "1.resid:3", "--mode", "add")
    assert res.exit_code == 2 and "--base-model" in res.stderr
    res = run_cli("intervene", "--base-model", world["gpt2"], "--code", "1.resid:3")
    assert res.exit_code == 2 and "applies to --sae" in res.stderr
