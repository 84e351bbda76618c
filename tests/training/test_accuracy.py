"""First-transition accuracy (cbtool/tasks/tokfsm.py) and per-site codebook sizes (`train --site-codes`)."""

from __future__ import annotations

import json

import pytest
import torch

from cbtool.formats.checkpoint import load_checkpoint
from cbtool.model.sites import BuiltinLocator, CodebookModel
from cbtool.model.transformer import ModelConfig, Transformer
from cbtool.tasks.tokfsm import BOS, TokFSM, first_transition_accuracy, next_state_distribution
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _untrained() -> CodebookModel:
    torch.manual_seed(0)
    base = Transformer(ModelConfig(vocab_size=11, block_size=128, n_layer=2, n_head=2, d_model=32, d_mlp=64))
    return CodebookModel.build(base, BuiltinLocator(base), [(0, "mlp"), (1, "mlp")], 64, 1).eval()


@torch.no_grad()
def test_first_transition_accuracy_by_brute_force():
    """Every next state's probability from full forward passes (no cache), top-10 vs the FSM's edges."""
    model, fsm = _untrained(), TokFSM()
    with torch.no_grad():
        model.base.head.weight.mul_(30)  # a peaked, state-dependent distribution
    hits = 0
    dist = next_state_distribution(model, torch.tensor([[BOS, 4, 8]]), "cpu")[0]
    for s in range(100):
        probs = torch.zeros(100, dtype=torch.float64)
        for d1 in range(10):
            logits, _ = model(torch.tensor([[BOS, s // 10 + 1, s % 10 + 1, d1 + 1]]))
            p1 = torch.softmax(logits[0, -2, 1:11].double(), -1)[d1]
            probs[d1 * 10: d1 * 10 + 10] = p1 * torch.softmax(logits[0, -1, 1:11].double(), -1)
        if s == 37:
            assert torch.allclose(dist, probs, atol=1e-6)
        hits += int(fsm.adjacency[s, probs.topk(10).indices].sum())
    assert first_transition_accuracy(model, fsm, "cpu") == pytest.approx(hits / 1000)


def test_short_run_raises_first_transition_accuracy(tmp_path):
    """The direction, not the number: a short run beats the untrained model on the new metric, and
    train / eval report it with codebooks on and bypassed."""
    before = first_transition_accuracy(_untrained(), TokFSM(), "cpu")
    out = tmp_path / "ck"
    res = run_cli("train", "--preset", "tiny", "--base-steps", "150", "--steps", "10", "--checkpoint-every", "0",
                  "--site-codes", "0.mlp=128", "--out", out, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)["results"]
    assert results["on"]["first_transition_accuracy"] > before + 0.03
    assert results["bypassed"]["first_transition_accuracy"] > before + 0.03
    assert set(results["phase_seconds"]) == {"base", "kmeans", "codebook", "eval"}
    ckpt = load_checkpoint(out)
    assert {s.key: s.num_codes for s in ckpt.model.specs} == {"0.attn.heads": 64, "0.mlp": 128,
                                                               "1.attn.heads": 64, "1.mlp": 64}
    ev = run_cli("eval", out, "--samples", "8", "--device", "cpu")
    assert ev.exit_code == 0 and "first" in ev.stdout


@pytest.mark.parametrize("value", ["0.mlp", "0.mlp=x", "5.mlp=10", "attn=100", "0.mlp=0"])
def test_bad_site_codes_exit_2(tmp_path, value):
    res = run_cli("train", "--preset", "tiny", "--sites", "mlp", "--site-codes", value, "--out", tmp_path / "c",
                  "--device", "cpu")
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "--site-codes" in res.stderr, res.stderr
