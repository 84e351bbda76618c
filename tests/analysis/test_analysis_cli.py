"""End to end on a tiny trained checkpoint: embed -> find-codes -> dead-codes -> show-code."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cbtool.formats.checkpoint import load_checkpoint
from cbtool.formats.store import Store, documents_to_arrays
from cbtool.formats.store_writer import write_store
from cbtool.model.sites import CodebookSpec, Site
from cbtool.tasks.tokfsm import HELD_OUT_SEED, TokFSM, fsm_documents
from tests.helpers import run_cli

NUM_SEQS = 48


@pytest.fixture(scope="module")
def store_path(tiny_checkpoint_master, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "codes"
    res = run_cli(
        "embed",
        tiny_checkpoint_master,
        "--out",
        out,
        "--num-seqs",
        NUM_SEQS,
        "--batch-size",
        16,
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    assert "tokens" in res.stdout and "embedded" in res.stderr
    return out


def test_embed_stores_the_models_own_topk_on_held_out_sequences(store_path, tiny_checkpoint_master):
    store = Store(store_path)
    ckpt = load_checkpoint(tiny_checkpoint_master)
    assert list(store.sites) == list(ckpt.model.sites)  # every site by default, per-head sites included
    assert store.num_tokens == NUM_SEQS * 128 and store.label_names == ["state"]
    docs = list(fsm_documents(ckpt.task, NUM_SEQS, HELD_OUT_SEED))
    ref = documents_to_arrays(docs)
    np.testing.assert_array_equal(store.tokens(0), ref.tokens)
    np.testing.assert_array_equal(store.labels(0, "state"), ref.labels["state"])
    # held out: none of the first training batches' sequences is in the store
    train_tokens, _ = ckpt.task.step_batch(8, 1, 0)
    stored = {tuple(d.tokens.tolist()) for d in docs}
    assert not any(tuple(t.tolist()) in stored for t in train_tokens)
    # codes equal a direct forward pass with recording on
    model = ckpt.model
    model.set_record(True)
    with torch.no_grad():
        model(torch.from_numpy(np.stack([d.tokens for d in docs[:5]])))
    for name, site in model.sites.items():
        ids = model.codebook(site.spec).last.ids.reshape(5 * 128, site.spec.groups, site.spec.k)[
            :, site.group
        ]
        np.testing.assert_array_equal(store.codes(0, name)[: 5 * 128], ids.numpy())
    model.set_record(False)


def test_find_codes_refs_are_accepted_by_show_code(store_path):
    res = run_cli("find-codes", store_path, "--labels", "state", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["summary"]["values"] == len(doc["rows"]) >= 90
    head = run_cli(
        "find-codes", store_path, "--regex", "1(2|3)", "--sites", "*.attn.h1", "--json", "--top", "3"
    )
    assert head.exit_code == 0, head.output
    hrows = json.loads(head.stdout)["rows"]
    assert hrows and all(r["code"].split(":")[0].endswith(".attn.h1") for r in hrows)
    store = Store(store_path)
    for row in [doc["rows"][0], hrows[0]]:
        ref = row["code"]
        site, code = ref.split(":")
        shown = run_cli("show-code", store_path, ref, "--json", "--examples", 4, "--context", 3)
        assert shown.exit_code == 0, shown.output
        s = json.loads(shown.stdout)
        assert s["code"] == ref and s["fires"] == row["fires"]
        fired = np.concatenate(
            [(np.asarray(store.codes(i, site)) == int(code)).any(1) for i in range(store.num_shards)]
        )
        assert s["fires"] == int(fired.sum())
        assert len(s["examples"]) == min(4, s["fires"])
        for ex in s["examples"]:
            assert fired[ex["position"]]
            assert len(ex["left"]) <= 3 + 4 and len(ex["right"]) <= 3  # digits, maybe "<bos>" on the left
        assert sum(t["count"] for t in s["top_tokens"]) == s["fires"]
    text = run_cli("show-code", store_path, hrows[0]["code"])
    assert text.exit_code == 0 and hrows[0]["code"] in text.stdout


def test_show_code_resolves_bare_layers_and_refuses_bad_refs(store_path):
    a = run_cli("show-code", store_path, "1:3", "--json")
    b = run_cli("show-code", store_path, "1.mlp:3", "--json")
    assert a.exit_code == b.exit_code == 0 and json.loads(a.stdout) == json.loads(b.stdout)
    for ref, needle in (
        ("7.mlp:1", "unknown site"),
        ("1.mlp:64", "out of range"),
        ("1.mlp", "SITE:CODE"),
        ("1.attn.h9:0", "unknown site"),
    ):
        r = run_cli("show-code", store_path, ref)
        assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output


def test_dead_codes_counts_match_the_store_and_max_dead_frac_gates(store_path, tmp_path):
    res = run_cli("dead-codes", store_path, "--json", "--sites", "*.mlp")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    store = Store(store_path)
    assert [r["site"] for r in doc["sites"]] == ["0.mlp", "1.mlp"]
    for r in doc["sites"]:
        ids = np.concatenate([np.asarray(store.codes(i, r["site"])).ravel() for i in range(store.num_shards)])
        counts = np.bincount(ids, minlength=64)
        assert (
            r["dead"] == int((counts == 0).sum()) and r["dead_codes"] == np.flatnonzero(counts == 0).tolist()
        )
        p = counts[counts > 0] / counts.sum()
        assert r["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()))
        assert r["most_used"][0]["fires"] == counts.max()
    # a synthetic store with known dead codes: 10 tokens, C=100 -> at least 90 dead
    rng = np.random.default_rng(0)
    docs = list(fsm_documents(TokFSM(), 1, 5))
    arrays = documents_to_arrays(docs)
    arrays.codes["0.mlp"] = rng.integers(0, 10, (len(arrays.tokens), 1))
    write_store(tmp_path / "syn", [Site("0.mlp", CodebookSpec(0, "mlp", 1, 4, 100, 1), 0)], [arrays])
    fail = run_cli("dead-codes", tmp_path / "syn", "--max-dead-frac", "0.5")
    assert fail.exit_code == 1 and "dead codes" in fail.stderr and "0.mlp" in fail.stdout
    assert run_cli("dead-codes", tmp_path / "syn", "--max-dead-frac", "0.95").exit_code == 0


def test_embed_bad_input_exit_2(tiny_checkpoint_master, tmp_path):
    cases = [
        (("--num-seqs", 0), "empty corpus"),
        (("--sites", "*.nothing"), "matches no site"),
        (("--corpus", tmp_path), "text corpora need a checkpoint with a text tokenizer"),
        (("--corpus", tmp_path / "missing.txt"), "does not exist"),
        (("--worker", "2/2"), "bad --worker"),
    ]
    for args, needle in cases:
        r = run_cli("embed", tiny_checkpoint_master, "--out", tmp_path / "x", "--device", "cpu", *args)
        assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "x").exists()
    r = run_cli("find-codes", tmp_path / "nostore", "--labels", "state")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_embed_site_filter_and_max_tokens(tiny_checkpoint_master, tmp_path):
    r = run_cli(
        "embed",
        tiny_checkpoint_master,
        "--out",
        tmp_path / "m",
        "--sites",
        "*.mlp,0.attn.h1",
        "--num-seqs",
        10,
        "--max-tokens",
        1000,
        "--device",
        "cpu",
        "--json",
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["sites"] == ["0.attn.h1", "0.mlp", "1.mlp"] and doc["tokens"] == 1000
    store = Store(tmp_path / "m")
    assert store.codes(0, "0.attn.h1").shape == (1000, 1) and len(store.text(0)) == 1000 - 8  # 8 BOS


def test_info_describes_a_store_and_notices_a_changed_checkpoint(tiny_checkpoint, tmp_path):
    store = tmp_path / "codes"
    res = run_cli("embed", tiny_checkpoint, "--out", store, "--num-seqs", "8", "--device", "cpu")
    assert res.exit_code == 0, res.stderr
    res = run_cli("info", store, "--json")
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["kind"] == "store_info" and doc["complete"] is True
    assert doc["tokens"] == 8 * 128 and doc["checkpoint_status"] == "unchanged"
    assert {e["name"] for e in doc["sites"]} >= {"0.mlp", "1.attn.h1"}
    meta = tiny_checkpoint / "cbtool.json"
    meta.write_text(meta.read_text().replace('"finished": true', '"finished": false'))
    doc = json.loads(run_cli("info", store, "--json").stdout)
    assert doc["checkpoint_status"] == "CHANGED since embedding"
    table = run_cli("info", store)
    assert table.exit_code == 0 and "CHANGED" in table.stdout and "1,024" in table.stdout
