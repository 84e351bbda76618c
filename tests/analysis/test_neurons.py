"""Codes vs neurons (cbtool.analysis.neurons): the matched-recall threshold against a brute-force reference, the
activations it reads, and `find-codes --baseline neurons` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cbtool.analysis.neurons import Query, collect, match_block, neuron_groups, neuron_name
from cbtool.formats.checkpoint import load_checkpoint
from cbtool.formats.store import Store
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force(acts: np.ndarray, feature: np.ndarray, hits: int) -> tuple[int, float, float]:
    """Every neuron, every threshold among its values: the largest threshold whose recall on the feature
    is at least hits/|F|; the neuron with the best precision there (first on ties)."""
    size = int(feature.sum())
    best = (-1, -1.0, 0.0)
    for j in range(acts.shape[1]):
        for t in sorted(set(acts[:, j].tolist()), reverse=True):
            sel = acts[:, j] >= t
            tp = int((sel & feature).sum())
            if tp >= hits:
                prec = tp / int(sel.sum())
                if prec > best[1]:
                    best = (j, prec, tp / size)
                break
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matched_recall_threshold_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, d = 120, 7
    acts = np.round(rng.normal(size=(n, d)), 1)  # rounding makes ties, the tricky case
    feature = rng.random(n) < 0.2
    feature[0] = True
    acts[feature, 3] += rng.random() * 2  # one neuron leans towards the feature
    size = int(feature.sum())
    queries = [Query(feature, h, 0.5) for h in sorted({1, 2, size // 2, size - 1, size} - {0})]
    got = match_block(torch.from_numpy(acts).float(), queries)
    for q, (col, prec, rec, thr, fires) in zip(queries, got, strict=True):
        ref_col, ref_prec, ref_rec = brute_force(acts.astype(np.float32), feature, q.hits)
        assert (col, prec, rec) == (ref_col, pytest.approx(ref_prec), pytest.approx(ref_rec)), q.hits
        assert rec >= q.hits / size
        assert fires == int((acts[:, col].astype(np.float32) >= thr).sum())


def test_neuron_names_cover_both_directions(tiny_checkpoint_master):
    model = load_checkpoint(tiny_checkpoint_master).model
    groups = neuron_groups(model)
    total = sum(g.size for g in groups)
    assert neuron_name(groups, 0) == "0.attn.heads[0]"
    assert neuron_name(groups, total) == "0.attn.heads[0] (low)"
    assert neuron_name(groups, total - 1).startswith(f"{model.base.config.n_layer - 1}.mlp[")


@pytest.fixture(scope="module")
def store(tiny_checkpoint_master, tmp_path_factory):
    out = tmp_path_factory.mktemp("neurons") / "codes"
    res = run_cli("embed", tiny_checkpoint_master, "--out", out, "--num-seqs", 24, "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out


def test_activations_are_the_raw_values_before_the_codebooks(tiny_checkpoint_master, store):
    """The MLP-output neurons are the MLP codebook's own input; one row per stored token."""
    ckpt = load_checkpoint(tiny_checkpoint_master)
    st = Store(store)
    acts = collect(ckpt.model, st, {"1.mlp", "0.mlp.hidden"}, "cpu", batch_size=5)
    assert acts["1.mlp"].shape == (st.num_tokens, ckpt.model.base.config.d_model)
    assert acts["0.mlp.hidden"].shape == (st.num_tokens, ckpt.model.base.config.d_mlp)
    cb = [cb for s, cb in ckpt.model.items() if s.key == "1.mlp"][0]
    cb.capture = []
    tokens = torch.from_numpy(np.asarray(st.tokens(0))[: int(np.asarray(st.doc_offsets(0))[1])].astype(np.int64))
    tokens = tokens.unsqueeze(0)
    with torch.no_grad():
        ckpt.model(tokens)
    raw = cb.capture[0][:, 0]
    cb.capture = None
    assert torch.allclose(acts["1.mlp"][: raw.shape[0]], raw, atol=1e-5)


def test_find_codes_baseline_neurons(store):
    res = run_cli("find-codes", store, "--labels", "state", "--label", "7", "--top", "3", "--baseline", "neurons",
                  "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    summary = doc["baseline"]
    assert summary["codes"] == len(doc["rows"]) == 3
    for r in doc["rows"]:
        assert r["neuron_recall"] >= r["recall"] - 1e-12 and 0 < r["neuron_precision"] <= 1
        assert r["neuron_fires"] >= r["hits"]
    assert summary["codes_beating_neuron"] == sum(r["precision"] > r["neuron_precision"] for r in doc["rows"])
    doc = json.loads(run_cli("find-codes", store, "--labels", "state", "--sites", "1.mlp", "--baseline", "neurons",
                             "--json", "--device", "cpu").stdout)
    site = doc["per_site"]["1.mlp"]
    assert site["codes"] == doc["baseline"]["codes"] == sum(r["code"] is not None for r in doc["rows"])
    assert all("neuron" in r for r in doc["rows"] if r["code"] is not None)  # the per-value rows get theirs too
    assert site["codes_beating_neuron"] == sum(r["precision"] > r["neuron_precision"] for r in doc["rows"] if r["code"])
    table = run_cli("find-codes", store, "--labels", "state", "--sites", "1.mlp", "--baseline", "neurons",
                    "--device", "cpu")
    assert table.exit_code == 0, table.output
    assert "more precise than their best neuron" in table.stdout
