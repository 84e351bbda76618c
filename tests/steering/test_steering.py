"""Interventions (force / add / ablate), per-row steering, positions, twins, FSM state steering."""

from __future__ import annotations

import pytest
import torch

from cbtool.formats.checkpoint import load_checkpoint
from cbtool.model.codebook import select_topk
from cbtool.model.generate import left_pad
from cbtool.model.sites import BuiltinLocator, CodebookModel
from cbtool.model.transformer import ModelConfig, Transformer
from cbtool.steering.fsm import best_codes_per_state, fsm_state_steering, patched_next_state, true_next_state
from cbtool.steering.interventions import (
    Intervention,
    SampleJob,
    generate_with_twins,
    parse_interventions,
    sample_steered,
    sample_uniforms,
    steering,
)
from cbtool.tasks.tokfsm import TokFSM
from cbtool.util.stats import jsd_bits, wilson_interval

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint_master):
    return load_checkpoint(tiny_checkpoint_master)


@pytest.fixture(scope="module")
def k3_model() -> CodebookModel:
    torch.manual_seed(0)
    base = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=16, d_mlp=32))
    return CodebookModel.build(base, BuiltinLocator(base), [(0, "attn_heads"), (1, "mlp")], 32, 3).eval()


def _tokens(fsm: TokFSM, n: int, seed: int = 0) -> torch.Tensor:
    return fsm.batch(n, torch.Generator().manual_seed(seed))[0][:, :20]


def _recorded(model: CodebookModel, fwd, idx: torch.Tensor, site: str) -> torch.Tensor:
    """(B, T, k) ids selected at `site` during one call of `fwd`."""
    s = model.sites[site]
    model.set_record(True)
    try:
        fwd(idx)
        ids = model.codebook(s.spec).last.ids
    finally:
        model.set_record(False)
    return ids[:, s.group].view(idx.shape[0], idx.shape[1], -1)


def test_force_per_row_leaves_other_rows_alone(ckpt):
    model, fsm = ckpt.model, TokFSM()
    idx = _tokens(fsm, 3)
    plain = _recorded(model, model, idx, "1.mlp")
    code = int((plain[0, :, 0].max() + 1) % model.sites["1.mlp"].num_codes)
    rows = [[Intervention(model.sites["1.mlp"], code)], [], [Intervention(model.sites["0.attn.h1"], 5)]]
    with steering(model, rows) as fwd:
        got = _recorded(model, fwd, idx, "1.mlp")
        heads = _recorded(model, fwd, idx, "0.attn.h1")
        logits, _ = fwd(idx)
    assert (got[0] == code).all()  # forced at every position of row 0
    assert torch.equal(got[1], plain[1])  # row 1 has no intervention
    assert (heads[2] == 5).all() and not (heads[:2] == 5).all()
    base_logits, _ = model(idx)
    assert torch.allclose(logits[1], base_logits[1], atol=1e-5)
    assert not torch.allclose(logits[0], base_logits[0], atol=1e-3)


def test_force_replaces_lowest_scoring_code_k3(k3_model):
    model = k3_model
    idx = torch.randint(1, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    plain = _recorded(model, model, idx, "1.mlp")
    forced = int(plain[0, 0, 0])  # already the best at (0, 0): must stay, selection unchanged there
    other = next(c for c in range(32) if c not in plain[0, 1].tolist())
    rows = [[Intervention(model.sites["1.mlp"], other), Intervention(model.sites["1.mlp"], forced)], []]
    with steering(model, rows) as fwd:
        got = _recorded(model, fwd, idx, "1.mlp")
    for t in range(idx.shape[1]):
        sel = got[0, t].tolist()
        assert sel[:2] == [other, forced]
        rest = [c for c in plain[0, t].tolist() if c not in (other, forced)]
        assert sel[2] == rest[0]  # the best remaining code keeps its slot; the lowest ones went
    assert torch.equal(got[1], plain[1])


def test_force_more_codes_than_k_is_refused(ckpt):
    from cbtool.errors import UserError

    model = ckpt.model
    ivs = parse_interventions(["1.mlp:1", "1.mlp:2"], model)
    with pytest.raises(UserError, match="k=1"), steering(model, [ivs]):
        pass


def test_ablate_takes_next_best(k3_model):
    model = k3_model
    site = model.sites["0.attn.h1"]
    idx = torch.randint(1, 11, (2, 6), generator=torch.Generator().manual_seed(2))
    plain = _recorded(model, model, idx, site.name)
    banned = int(plain[0, 2, 0])
    captured = []
    cb = model.codebook(site.spec)
    cb.capture = captured
    try:
        with steering(model, [[Intervention(site, banned, "ablate")], []]) as fwd:
            got = _recorded(model, fwd, idx, site.name)
    finally:
        cb.capture = None
    x = captured[-1]  # (B*T, G, d) input of the head codebook
    top4 = select_topk(x, cb.codes.detach().cpu(), 4).ids[:, site.group].view(2, 6, 4)
    assert not (got[0] == banned).any()
    for t in range(6):
        expect = [c for c in top4[0, t].tolist() if c != banned][:3]
        assert got[0, t].tolist() == expect
    assert torch.equal(got[1], plain[1])


def test_add_adds_scaled_code_vector_to_steered_rows(ckpt):
    model = ckpt.model
    site = model.sites["0.mlp"]
    cb = model.codebook(site.spec)
    outs = []
    h = cb.register_forward_hook(lambda _m, _i, o: outs.append(o.detach().clone()))
    try:
        idx = _tokens(TokFSM(), 2, seed=3)
        model(idx)
        with steering(model, [[Intervention(site, 7, "add", 2.5)], []]) as fwd:
            fwd(idx)
        assert cb.add_vector is None
    finally:
        h.remove()
    plain, steered = outs[0].view(2, 20, -1), outs[1].view(2, 20, -1)
    vec = 2.5 * cb.codes[0, 7].detach()
    assert torch.allclose(steered[0] - plain[0], vec.expand(20, -1), atol=1e-5)
    assert torch.allclose(steered[1], plain[1])


def test_context_manager_removes_interventions_on_error(ckpt):
    model = ckpt.model
    site = model.sites["1.mlp"]
    with pytest.raises(RuntimeError, match="boom"), steering(model, [[Intervention(site, 3)]]):
        assert model.codebook(site.spec).id_editor is not None
        raise RuntimeError("boom")
    assert all(cb.id_editor is None and cb.add_vector is None for _, cb in model.items())


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_positions_prompt_vs_generated(ckpt, positions):
    model = ckpt.model
    site = model.sites["1.mlp"]
    cb = model.codebook(site.spec)
    code = 11
    seen = []

    class Spy:
        def __init__(self, fwd):
            self.fwd = fwd

        def __call__(self, idx, past=None, start=None, mask=None):
            model.set_record(True)
            res = self.fwd(idx, past=past, start=start, mask=mask)
            seen.append((past is None, cb.last.ids[:, 0, 0].clone()))
            model.set_record(False)
            return res

    idx = _tokens(TokFSM(), 2, seed=4)[:, :8]
    with steering(model, [[Intervention(site, code)], [Intervention(site, code)]], positions) as fwd:
        sample_steered(Spy(fwd), idx, None, sample_uniforms([1, 2], 6), temperature=1.0)
    prefill = [ids for first, ids in seen if first]
    decode = [ids for first, ids in seen if not first]
    assert len(prefill) == 1 and len(decode) == 5
    if positions == "prompt":
        assert (prefill[0] == code).all() and not all(bool((d == code).all()) for d in decode)
    else:
        assert not (prefill[0] == code).all() and all(bool((d == code).all()) for d in decode)


def test_twins_and_batch_size_independence(ckpt):
    model = ckpt.model
    site = model.sites["1.mlp"]
    prompt = ckpt.task.encode("3719")
    jobs = [SampleJob(prompt, [Intervention(site, 5, "add", 20.0)], seed) for seed in range(6)]
    jobs.append(SampleJob(prompt, [], 99))  # no intervention: its twin must match it exactly
    s1, b1 = generate_with_twins(model, jobs, 10, batch_size=1)
    s4, b4 = generate_with_twins(model, jobs, 10, batch_size=4)
    assert s1 == s4 and b1 == b4
    assert s1[-1] == b1[-1]
    assert any(s != b for s, b in zip(s1[:-1], b1[:-1], strict=True))
    # baseline = plain sampling from the unsteered model with the same per-sample uniforms
    idx, start = left_pad([prompt] * 6)
    with steering(model, [[] for _ in range(6)]) as fwd:
        plain = sample_steered(fwd, idx, start, sample_uniforms(range(6), 10))
    assert plain.tolist() == b1[:6]


def test_left_padded_batch_matches_single_rows(ckpt):
    model = ckpt.model
    site = model.sites["0.mlp"]
    prompts = [ckpt.task.encode(p) for p in ("3", "371942", "55")]
    jobs = [SampleJob(p, [Intervention(site, 9)], i) for i, p in enumerate(prompts)]
    batched = generate_with_twins(model, jobs, 8, temperature=0.0, batch_size=3)
    single = generate_with_twins(model, jobs, 8, temperature=0.0, batch_size=1)
    assert batched == single


def test_wilson_interval():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_jsd_bits_bounds():
    fsm = TokFSM()
    a = true_next_state(fsm, torch.tensor([0, 1]))
    assert float(jsd_bits(a[:1], a[:1])[0]) == pytest.approx(0.0, abs=1e-12)
    overlap = len(set(fsm.neighbours[0].tolist()) & set(fsm.neighbours[1].tolist()))
    expect = 1.0 - overlap / 10  # uniform over 10 each: JSD = share of mass outside the overlap
    assert float(jsd_bits(a[:1], a[1:])[0]) == pytest.approx(expect, abs=1e-9)


def test_best_codes_per_state_are_precise(ckpt):
    model, fsm = ckpt.model, ckpt.task
    best = best_codes_per_state(model, fsm, num_seqs=32)
    bc = best["1.mlp"]
    assert bc.codes.shape == (fsm.spec.num_states, 2)
    # re-measure precision of one chosen code on the same data
    tokens, labels = fsm.batch(32, torch.Generator().manual_seed(424_242_421))
    ids = _recorded(model, model, tokens, "1.mlp")[..., 0]
    state = int(bc.hits[:, 1].argmax())
    code = int(bc.codes[state, 1])
    fires = ids == code
    digit2 = (torch.arange(tokens.shape[1]) % 2 == 0) & (torch.arange(tokens.shape[1]) > 0)
    hits = fires & (labels == state) & digit2
    assert int(hits.sum()) == int(bc.hits[state, 1])
    assert float(bc.precision[state, 1]) == pytest.approx(float(hits.sum() / fires.sum()), abs=1e-6)


def test_fsm_state_steering_table(ckpt):
    res = fsm_state_steering(ckpt.model, ckpt.task, pairs=12, num_seqs=16, context_states=3)
    rows = {r["sites"]: r for r in res["table"]}
    assert list(rows) == ["none", "attention", "mlp", "all"]
    assert rows["none"]["jsd_to_b_vs_none"] == 1.0 and rows["none"]["patched_sites"] == 0
    assert rows["mlp"]["patched_sites"] == 2 and rows["all"]["patched_sites"] == 6
    assert rows["all"]["jsd_to_a"] != rows["none"]["jsd_to_a"]  # the patch reaches the prediction
    for r in rows.values():
        assert 0.0 <= r["jsd_to_b"] <= 1.0 and 0.0 <= r["valid_for_b"] <= 1.0


def test_next_state_distribution_is_product_of_digit_distributions(ckpt):
    model, fsm = ckpt.model, ckpt.task
    tokens = _tokens(fsm, 2, seed=5)[:, :7]  # BOS + 3 states
    dist, new = patched_next_state(model, tokens, [[], []], [[], []], sample_uniforms([0, 1], 2), "cpu")
    p1 = torch.softmax(model(tokens)[0][:, -1, 1:11].double(), -1)
    for d1 in range(10):
        ext = torch.cat([tokens, torch.full((2, 1), d1 + 1)], dim=1)
        p2 = torch.softmax(model(ext)[0][:, -1, 1:11].double(), -1)
        assert torch.allclose(dist.view(2, 10, 10)[:, d1], p1[:, d1:d1 + 1] * p2, atol=1e-5)
    assert new.shape == (2, 2)
