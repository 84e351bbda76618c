"""find-codes on random stores: precision/recall against scikit-learn, regex -> token mapping,
label tables, external label files, --require."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from cbtool.analysis.features import regex_feature, tokens_overlapping
from cbtool.analysis.scoring import score_labels, score_mask
from cbtool.formats.store import Store, documents_to_arrays
from cbtool.formats.store_writer import write_store
from cbtool.model.sites import CodebookSpec, Site
from cbtool.tasks.base import Document
from cbtool.tasks.tokfsm import fsm_document
from tests.helpers import run_cli


def _sites(num_codes: int, k: int) -> list[Site]:
    mlp = CodebookSpec(0, "mlp", 1, 8, num_codes, k)
    heads = CodebookSpec(1, "attn_heads", 2, 4, num_codes, k)
    return [Site("0.mlp", mlp, 0), Site("1.attn.h0", heads, 0), Site("1.attn.h1", heads, 1)]


def random_store(
    path, seed: int = 0, num_codes: int = 37, k: int = 3, n_docs: int = 30, n_shards: int = 3
) -> tuple[Store, dict]:
    """Random digit documents with labels 0..5; codes random but biased towards the label."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(5, 60))
        toks = np.concatenate([[0], rng.integers(1, 11, n)])
        labels = np.concatenate([[-1], rng.integers(0, 6, n)])
        docs.append(fsm_document(toks, labels))
    sites = _sites(num_codes, k)
    cuts = np.array_split(np.arange(n_docs), n_shards)
    shards, all_codes = [], {s.name: [] for s in sites}
    for cut in cuts:
        arrays = documents_to_arrays([docs[i] for i in cut])
        n = len(arrays.tokens)
        for s in sites:
            ids = np.argsort(rng.random((n, num_codes)), axis=1)[:, :k]
            lab = arrays.labels["state"]
            biased = (lab >= 0) & (rng.random(n) < 0.6)
            slot0 = np.where(biased, lab * 3 + s.group, ids[:, 0])
            # keep the k ids distinct: if slot0 collides with another slot, keep the random row
            clash = (ids[:, 1:] == slot0[:, None]).any(1)
            ids[:, 0] = np.where(clash, ids[:, 0], slot0)
            arrays.codes[s.name] = ids
            all_codes[s.name].append(ids)
        shards.append(arrays)
    store = write_store(path, sites, shards, labels=["state"])
    full = {
        "codes": {n: np.concatenate(v) for n, v in all_codes.items()},
        "labels": np.concatenate([s.labels["state"] for s in shards]),
        "docs": docs,
    }
    return store, full


def _brute_regex(docs: list[Document], pattern: str, match_on: str) -> np.ndarray:
    """Reference implementation with explicit loops (what the vectorised code must equal)."""
    out = []
    for d in docs:
        mask = np.zeros(len(d.tokens), dtype=bool)
        for m in re.finditer(pattern, d.text):
            if m.end() == m.start():
                continue
            for i, (s, e) in enumerate(d.spans):
                if e > s and s < m.end() and e > m.start():
                    mask[i] = True
                    if match_on == "first":
                        break
        out.append(mask)
    return np.concatenate(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_match_sklearn_label_and_regex(tmp_path, seed):
    store, full = random_store(tmp_path / "s", seed=seed)
    labels = full["labels"]
    for value in (0, 4):
        y_true = labels == value
        masks = np.split(y_true, store.token_offsets[1:-1])
        for site, ids in full["codes"].items():
            sc = score_mask(store, site, masks)
            for c in range(store.sites[site].num_codes):
                y_pred = (ids == c).any(1)
                if y_pred.sum() == 0:
                    assert sc.fires[c] == 0 and sc.precision[c] == 0
                    continue
                assert sc.precision[c] == pytest.approx(precision_score(y_true, y_pred))
                assert sc.recall[c] == pytest.approx(recall_score(y_true, y_pred))
                assert sc.f1[c] == pytest.approx(f1_score(y_true, y_pred))
    # all label values at once equals one value at a time
    lab_index = [np.asarray(store.labels(s, "state")) for s in range(store.num_shards)]
    multi = score_labels(store, "1.attn.h1", lab_index, 6)
    single = score_mask(store, "1.attn.h1", [li == 4 for li in lab_index])
    np.testing.assert_allclose(multi.precision[4], single.precision)
    np.testing.assert_allclose(multi.recall[4], single.recall)
    # regex feature through the CLI, every row checked against sklearn
    pattern = "3[45]+"
    y_true = _brute_regex(full["docs"], pattern, "all")
    assert y_true.any()
    res = run_cli("find-codes", store.path, "--regex", pattern, "--top", "0", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["feature_tokens"] == int(y_true.sum())
    assert doc["rows"], "biased random codes must produce some rows"
    for row in doc["rows"]:
        site, code = row["code"].rsplit(":", 1)
        y_pred = (full["codes"][site] == int(code)).any(1)
        assert row["precision"] == pytest.approx(precision_score(y_true, y_pred))
        assert row["recall"] == pytest.approx(recall_score(y_true, y_pred))
        assert row["fires"] == int(y_pred.sum()) and row["hits"] == int((y_pred & y_true).sum())
    f1s = [r["f1"] for r in doc["rows"]]
    assert f1s == sorted(f1s, reverse=True)


@pytest.mark.parametrize("match_on", ["all", "first"])
@pytest.mark.parametrize("pattern", ["12", "[0-4]{3,}", "9", "^5", "7$", "x*"])
def test_regex_tokens_match_reference(tmp_path, pattern, match_on):
    store, full = random_store(tmp_path / "s", seed=3)
    got = np.concatenate(regex_feature(store, pattern, match_on))
    np.testing.assert_array_equal(got, _brute_regex(full["docs"], pattern, match_on))


def test_regex_over_words_with_gaps_and_multichar_tokens():
    # "the cat sat on the mat" tokenised as words (spaces belong to no token) + a special token
    text = "the cat sat on the mat"
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]
    spans = np.array([(0, 0), *words])
    pat = re.compile(r"at s|the")
    starts = np.array([m.start() for m in pat.finditer(text)])
    ends = np.array([m.end() for m in pat.finditer(text)])
    all_mask = tokens_overlapping(spans, starts, ends, "all")
    first_mask = tokens_overlapping(spans, starts, ends, "first")
    # tokens: <s> the cat sat on the mat ; "at s" covers cat+sat, "the" x2
    assert all_mask.tolist() == [False, True, True, True, False, True, False]
    assert first_mask.tolist() == [False, True, True, False, False, True, False]


def test_label_table_best_codes_and_external_label_files(tmp_path):
    store, full = random_store(tmp_path / "s", seed=5)
    res = run_cli("find-codes", store.path, "--labels", "state", "--sort", "f1", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["mode"] == "label-table" and [r["label"] for r in doc["rows"]] == list(range(6))
    labels = full["labels"]
    for row in doc["rows"]:
        y_true = labels == row["label"]
        best = max(
            f1_score(y_true, (ids == c).any(1))
            for ids in full["codes"].values()
            for c in range(37)
            if (ids == c).any()
        )
        assert row["f1"] == pytest.approx(best)
        site, code = row["code"].rsplit(":", 1)
        assert row["precision"] == pytest.approx(
            precision_score(y_true, (full["codes"][site] == int(code)).any(1))
        )
    assert doc["summary"]["values_with_code"] == 6
    assert set(doc["per_site"]) == {"0.mlp", "1.attn.h0", "1.attn.h1"}

    # the same labels from an external .npy and from a text file give the same table
    np.save(tmp_path / "lab.npy", labels)
    (tmp_path / "lab.txt").write_text("\n".join("" if v < 0 else str(v) for v in labels) + "\n")
    for f in ("lab.npy", "lab.txt"):
        r2 = run_cli("find-codes", store.path, "--labels", tmp_path / f, "--json")
        assert r2.exit_code == 0, r2.output
        assert json.loads(r2.stdout)["rows"] == doc["rows"]
    # string labels work and --label selects one value
    names = np.where(labels < 0, "", np.char.add("s", labels.astype(str)))
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    r3 = run_cli(
        "find-codes", store.path, "--labels", tmp_path / "names.txt", "--label", "s2", "--json", "--top", "0"
    )
    assert r3.exit_code == 0, r3.output
    r4 = run_cli("find-codes", store.path, "--labels", "state", "--label", "2", "--json", "--top", "0")
    assert [r["code"] for r in json.loads(r3.stdout)["rows"]] == [
        r["code"] for r in json.loads(r4.stdout)["rows"]
    ]


def test_bad_label_files_and_regex_exit_2(tmp_path):
    store, full = random_store(tmp_path / "s", seed=6)
    n = store.num_tokens
    np.save(tmp_path / "short.npy", np.zeros(n - 1, dtype=np.int64))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}] * n, dtype=object), allow_pickle=True)
    (tmp_path / "latin1.txt").write_bytes(("\xe9\n" * n).encode("latin-1"))
    (tmp_path / "long.txt").write_text("1\n" * (n + 3))
    cases = [
        (("--labels", tmp_path / "short.npy"), f"has {n - 1} labels but the store has {n} tokens"),
        (("--labels", tmp_path / "obj.npy"), "without pickle"),
        (("--labels", tmp_path / "latin1.txt"), "not UTF-8"),
        (("--labels", tmp_path / "long.txt"), f"has {n + 3} lines"),
        (("--labels", "nosuch"), "neither a label of the store"),
        (("--labels", "state", "--label", "77"), "does not occur"),
        (("--regex", "a(b"), "invalid regex"),
        (("--regex", "1", "--sites", "*.nothing"), "matches no site"),
        (("--regex", "1", "--labels", "state"), "exactly one feature"),
        (("--regex", "1", "--json", "--jsonl"), "one of --json and --jsonl"),
        (("--regex", "1", "--min-precision", "2"), "--min-precision"),
    ]
    for args, needle in cases:
        res = run_cli("find-codes", store.path, *args)
        assert res.exit_code == 2, (args, res.output)
        assert needle in res.stderr and "Traceback" not in res.output
        assert res.stderr.count("\n") == 1


def test_require_exit_codes_and_jsonl(tmp_path):
    store, _ = random_store(tmp_path / "s", seed=7)
    ok = run_cli(
        "find-codes",
        store.path,
        "--labels",
        "state",
        "--label",
        "1",
        "--min-precision",
        "0.2",
        "--require",
        "--jsonl",
        "--top",
        "3",
    )
    assert ok.exit_code == 0, ok.output
    rows = [json.loads(line) for line in ok.stdout.splitlines()]
    assert len(rows) == 3 and all(r["precision"] >= 0.2 for r in rows)
    bad = run_cli(
        "find-codes",
        store.path,
        "--labels",
        "state",
        "--label",
        "1",
        "--min-precision",
        "1.0",
        "--min-count",
        "1000",
        "--require",
    )
    assert bad.exit_code == 1 and "no code has precision >= 1.0" in bad.stderr
    table_bad = run_cli("find-codes", store.path, "--labels", "state", "--min-recall", "1.0", "--require")
    assert table_bad.exit_code == 1
    assert run_cli("find-codes", store.path, "--labels", "state", "--require").exit_code == 0
