"""State patching (cbtool.steering.patching): the JSD definition on hand-checkable toys, and the CLI table."""

from __future__ import annotations

import json

import pytest
import torch

from cbtool.model.sites import BuiltinLocator, CodebookModel
from cbtool.model.transformer import ModelConfig, Transformer
from cbtool.steering.patching import (
    DEFAULT_ROWS,
    pair_jsd,
    parse_rows,
    prefixed_walks,
    state_patching,
    state_prompts,
    walk_tokens,
)
from cbtool.tasks.tokfsm import FSMSpec, TokFSM
from cbtool.util.stats import jsd_bits
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy(code_scale: float) -> tuple[CodebookModel, TokFSM]:
    """One layer, codebooks on the heads and the MLP. With a huge `code_scale` the MLP code dominates
    the residual stream after the final LayerNorm, so the next-token distribution is a function of the
    last position's MLP code alone: forcing b's code must reproduce b's distribution."""
    torch.manual_seed(0)
    base = Transformer(ModelConfig(vocab_size=11, block_size=128, n_layer=1, n_head=2, d_model=16, d_mlp=32))
    model = CodebookModel.build(base, BuiltinLocator(base), [(0, "attn_heads"), (0, "mlp")], num_codes=8, k=1)
    with torch.no_grad():
        model.codebook(model.specs[1]).codes.mul_(code_scale)
        base.head.weight.mul_(50)  # distinct, far from uniform next-token distributions per code
    return model.eval().requires_grad_(False), TokFSM(FSMSpec(num_states=100, out_degree=10, seed=3))


def test_none_row_is_the_mean_pairwise_jsd_of_the_states_own_distributions():
    model, fsm = _toy(1.0)
    logits, _ = model(state_prompts(fsm))
    dist = torch.softmax(logits[:, -1].double(), -1)
    pairs = [float(jsd_bits(dist[a:a + 1], dist[b:b + 1])) for a in range(100) for b in range(100) if a != b]
    res = state_patching(model, fsm, "cpu", parse_rows("none,mlp", model), prefix_states=5)
    none = res["table"][0]
    assert none["row"] == "none" and none["codebooks"] == []
    assert none["jsd_bare"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-9)
    assert res["pairs"] == 9900


def test_patched_distribution_equal_to_bs_gives_zero():
    model, fsm = _toy(1e5)
    res = state_patching(model, fsm, "cpu", parse_rows("none,mlp,all", model), prefix_states=10)
    rows = {r["row"]: r for r in res["table"]}
    for name in ("mlp", "all"):
        assert rows[name]["jsd_bare"] < 1e-9 and rows[name]["jsd_prefix"] < 1e-9
    assert rows["none"]["jsd_bare"] > 0.05 and rows["none"]["jsd_prefix"] > 0.05  # the codes do differ
    assert rows["none"]["normalised_bare"] == 1.0 and rows["mlp"]["normalised_prefix"] < 1e-8


def test_pair_jsd_excludes_a_equals_b_and_forces_only_the_last_token():
    """Hand check of one row: a model whose patched inputs all equal b's reference except a == b."""
    model, fsm = _toy(1e5)
    tokens, start = state_prompts(fsm), torch.zeros(100, dtype=torch.long)
    logits, _ = model(tokens)
    ref = torch.softmax(logits[:, -1].double(), -1)
    model.set_record(True)
    model(tokens)
    codes = {s.key: cb.last.ids.view(100, 3, s.groups, 1)[:, -1] for s, cb in model.items()}
    model.set_record(False)
    row = parse_rows("mlp", model)[0]
    assert pair_jsd(model, tokens, start, torch.arange(100), ref, codes, row, "cpu") < 1e-9
    # a different reference makes every pair count: the mean over a != b of JSD(ref[b] patched, other[b])
    other = ref.roll(1, 0)
    expect = sum(float(jsd_bits(ref[b:b + 1], other[b:b + 1])) * 99 for b in range(100)) / 9900
    got = pair_jsd(model, tokens, start, torch.arange(100), other, codes, row, "cpu")
    assert got == pytest.approx(expect, rel=1e-6)


def test_prefixed_walks_end_in_each_state_follow_edges_and_fit():
    fsm = TokFSM(FSMSpec(seed=3))
    walks = prefixed_walks(fsm, 62, torch.Generator().manual_seed(1))
    assert [int(w[-1]) for w in walks] == list(range(100))
    assert all(bool(fsm.adjacency[w[:-1], w[1:]].all()) for w in walks)
    lengths = [len(w) - 1 for w in walks]
    assert min(lengths) >= 0 and max(lengths) <= 62 and len(set(lengths)) > 20  # random lengths, not fixed
    tokens, start = walk_tokens(walks)
    assert tokens.shape[1] <= 127
    for w, row, s in zip(walks, tokens, start, strict=True):
        assert int(row[s]) == 0 and (row[s + 1:] - 1).view(-1, 2).mul(torch.tensor([10, 1])).sum(1).tolist() \
            == w.tolist()


def test_left_padding_does_not_change_the_last_distribution():
    model, fsm = _toy(1.0)
    walks = prefixed_walks(fsm, 20, torch.Generator().manual_seed(0))
    tokens, start = walk_tokens(walks)
    padded, _ = model(tokens, start=start)
    for i in (0, 17, 63):
        alone, _ = model(tokens[i:i + 1, int(start[i]):])
        assert torch.allclose(padded[i, -1], alone[0, -1], atol=1e-5)


def test_cli_table_json(tiny_checkpoint_master):
    res = run_cli("intervene", tiny_checkpoint_master, "--fsm-eval", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "intervene-fsm-patching" and doc["prefix_states"] == 62
    assert [r["row"] for r in doc["table"]] == list(DEFAULT_ROWS)
    assert max(r["normalised_prefix"] for r in doc["table"]) == 1.0
    view = run_cli("intervene", tiny_checkpoint_master, "--fsm-eval", "--prefix-states", "0", "--device", "cpu")
    assert view.exit_code == 0 and "1.mlp" in view.stdout and "state patching" in view.stdout
