"""`cbtool explain`: every hypothesis family against a brute-force reference on a random store, and every
explanation reproduced by `find-codes` (cbtool/explanations/explainer.py,
cbtool/explanations/hypotheses.py, cbtool/explanations/automaton.py)."""

from __future__ import annotations

import itertools
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cbtool
from cbtool.explanations.automaton import recover_automaton
from cbtool.explanations.explainer import explain
from cbtool.explanations.hypotheses import (
    CHAR_CLASSES,
    TokenView,
    best_key_sets,
    best_masks,
    position_buckets,
    position_regex,
)
from cbtool.formats.store import Store, documents_to_arrays
from cbtool.formats.store_writer import write_store
from cbtool.model.sites import CodebookSpec, Site
from cbtool.tasks.base import Document
from cbtool.tasks.tokfsm import FSMSpec, TokFSM
from tests.helpers import run_cli

FIXTURE_STORE = Path(__file__).resolve().parents[2] / "fixtures" / "store"
# token 0 is a BOS with no characters; "ab" is one token whose string also occurs as "a" + "b" (not faithful)
VOCAB = ["", "a", "b", "ab", "C", "Cd", "7", "42", " ", ",", "\n", "e"]
# every string occurs in the text only where its token is: every hypothesis is scored by the search's counts
FAITHFUL_VOCAB = ["", "x", "y", "7", "42", " ", ",", "\n", "e", "Q"]
MAX_SET = 3


def random_store(path: Path, seed: int = 0, docs: int = 12, vocab: list[str] = VOCAB, split: bool = False,
                 shards: int = 1) -> Store:
    """Documents of random tokens (BOS first) with labels, and codes that depend on the token, the previous
    token and the position, with noise; site 1.mlp has k = 2. `split`: 0.mlp's code 13 fires on a part of
    token 1's occurrences (after token 2 or 3, and a fifth of the others). `shards`: the same documents and
    codes written as that many shards."""
    VOCAB = vocab  # noqa: N806 - the module's vocabulary unless given
    rng = np.random.default_rng(seed)
    documents = []
    for _ in range(docs):
        n = int(rng.integers(5, 40))
        toks = np.r_[0, rng.integers(1, len(VOCAB), n)]
        starts = np.cumsum([0] + [len(VOCAB[t]) for t in toks])
        text = "".join(VOCAB[t] for t in toks)
        labels = np.where(rng.random(n + 1) < 0.1, -1, toks % 5)
        documents.append(Document(toks.astype(np.int64), text, np.stack([starts[:-1], starts[1:]], 1), labels))
    arrays = documents_to_arrays(documents)
    tok = arrays.tokens
    prev = np.r_[0, tok[:-1]]
    pos = np.concatenate([np.arange(len(d.tokens)) for d in documents])
    c0 = np.where(rng.random(len(tok)) < 0.8, (tok * 3 + prev) % 13, rng.integers(0, 13, len(tok)))
    if split:
        c0 = np.where((tok == 1) & (np.isin(prev, [2, 3]) | (rng.random(len(tok)) < 0.2)), 13, c0)
    c1a = np.where(rng.random(len(tok)) < 0.7, np.minimum(pos // 4, 8), rng.integers(0, 9, len(tok)))
    c1b = (c1a + 1 + rng.integers(0, 8, len(tok))) % 9
    arrays.codes = {"0.mlp": c0[:, None], "1.mlp": np.stack([c1a, c1b], 1)}
    sites = [Site("0.mlp", CodebookSpec(0, "mlp", 1, 4, 13 + split, 1), 0),
             Site("1.mlp", CodebookSpec(1, "mlp", 1, 4, 9, 2), 0)]
    parts, at = [], 0
    for group in np.array_split(np.arange(len(documents)), shards):
        part = documents_to_arrays([documents[i] for i in group])
        n = len(part.tokens)
        part.codes = {name: c[at : at + n] for name, c in arrays.codes.items()}
        parts.append(part)
        at += n
    return write_store(path, sites, parts, labels=["state"], token_strings=VOCAB)


# -- brute-force references (loops over positions, straight from the definitions) --------------------------
def _positions(store: Store):
    tokens = np.asarray(store.tokens(0)).tolist()
    spans = np.asarray(store.spans(0)).tolist()
    offs = np.asarray(store.doc_offsets(0)).tolist()
    doc = [d for d in range(len(offs) - 1) for _ in range(offs[d], offs[d + 1])]
    return tokens, spans, doc


def _reference_keys(store: Store, family: str) -> list:
    """Per position: the family's key (a hashable) or None; `+parity`: (key, characters to the end % 2)."""
    if family.endswith("+parity"):
        doc_end = np.asarray(store.doc_chars(0)).tolist()[1:]
        _, spans, doc = _positions(store)
        return [None if k is None else (k, (doc_end[doc[i]] - spans[i][1]) % 2)
                for i, k in enumerate(_reference_keys(store, family[: -len("+parity")]))]
    tokens, spans, doc = _positions(store)
    out = []
    for i, t in enumerate(tokens):
        if family == "label":
            lab = int(store.labels(0, "state")[i])
            out.append(lab if lab >= 0 else None)
            continue
        nonempty = [j for j in range(i) if spans[j][1] > spans[j][0] and doc[j] == doc[i]]
        if spans[i][1] == spans[i][0]:
            out.append(None)
            continue
        ctx = {"token": 0, "prev-token": 1, "bigram": 1, "trigram": 2}[family]
        if len(nonempty) < ctx:
            out.append(None)
            continue
        before = tuple(tokens[j] for j in nonempty[len(nonempty) - ctx:])
        out.append({"token": t, "prev-token": before[:1] and before[0], "bigram": (*before, t),
                    "trigram": (*before, t)}[family])
    return out


def _reference_prefixes(codes: np.ndarray, keys: list, num_codes: int, max_set: int) -> dict[int, list[tuple]]:
    """code -> [(hits, size, members)] of its key prefixes <= max_set: keys by h/s desc, hits desc, key asc."""
    values = sorted({k for k in keys if k is not None})
    size = {v: keys.count(v) for v in values}
    out = {}
    for c in range(num_codes):
        hits = {v: sum(1 for k, row in zip(keys, codes.tolist(), strict=True) if k == v and c in row) for v in values}
        ranked = sorted((v for v in values if hits[v]), key=lambda v: (-hits[v] / size[v], -hits[v], v))
        out[c] = [(sum(hits[v] for v in ranked[:m]), sum(size[v] for v in ranked[:m]), tuple(ranked[:m]))
                  for m in range(1, min(max_set, len(ranked)) + 1)]
    return out


def _reference_best(codes: np.ndarray, keys: list, num_codes: int, max_set: int,
                    min_precision: float = 0.0, max_size: float = np.inf) -> dict[int, tuple]:
    """code -> (f1, hits, size, members): its best prefix with precision >= min_precision and at most
    max_size positions (first on ties)."""
    fires = [sum(c in row for row in codes.tolist()) for c in range(num_codes)]
    out = {}
    for c, prefixes in _reference_prefixes(codes, keys, num_codes, max_set).items():
        best = (0.0, 0, 0, ())
        for h, s, members in prefixes:
            f1 = 2 * h / (fires[c] + s)
            if f1 > best[0] and h / fires[c] >= min_precision and s <= max_size:
                best = (f1, h, s, members)
        out[c] = best
    return out


def _reference_regex_mask(store: Store, pattern: str) -> np.ndarray:
    """Tokens overlapping a match inside their document (a loop over tokens and matches)."""
    text = store.text(0)
    doc_chars = np.asarray(store.doc_chars(0)).tolist()
    ranges = [(a + m.start(), a + m.end()) for a, b in zip(doc_chars[:-1], doc_chars[1:], strict=True)
              for m in re.finditer(pattern, text[a:b]) if m.end() > m.start()]
    return np.array([any(s < e and s < me and ms < e for ms, me in ranges)
                     for s, e in np.asarray(store.spans(0)).tolist()])


@pytest.fixture(scope="module")
def rstore(tmp_path_factory) -> Store:
    return random_store(tmp_path_factory.mktemp("explain") / "codes")


@pytest.mark.parametrize("family", ["token", "prev-token", "bigram", "trigram", "label", "token+parity",
                                    "bigram+parity", "trigram+parity"])
@pytest.mark.parametrize("site", ["0.mlp", "1.mlp"])
@pytest.mark.parametrize("min_precision", [0.0, 0.6])
@pytest.mark.parametrize("max_share", [None, 0.05])
def test_keyed_family_matches_brute_force(rstore, family, site, min_precision, max_share):
    view = TokenView(rstore)
    keys, grams = view.keys(family, "state" if family == "label" else None)
    codes = np.asarray(rstore.codes(0, site))
    max_set = 1 if family == "label" else MAX_SET
    max_size = np.inf if max_share is None else max_share * rstore.num_tokens
    got = best_key_sets(codes, keys, rstore.counts(site), max_set, min_precision, max_size)
    ref = _reference_best(codes, _reference_keys(rstore, family), rstore.sites[site].num_codes, max_set,
                          min_precision, max_size)
    if family == "label":
        decode = cbtool.analysis.features.label_feature(rstore, "state").values.__getitem__
    elif grams is not None:
        decode = lambda m: tuple(int(t) for t in grams[m])  # noqa: E731
    else:
        decode = int
    if family.endswith("+parity"):
        decode = lambda m, base=decode: (base(m // 2), m % 2)  # noqa: E731
    for c, (f1, h, s, members) in ref.items():
        assert got.f1[c] == pytest.approx(f1, abs=1e-12), (family, site, c)
        assert (got.hits[c], got.size[c]) == (h, s)
        assert tuple(decode(int(m)) for m in got.members[c] if m >= 0) == members


@pytest.mark.parametrize("family", ["char-class", "position"])
def test_masked_family_matches_brute_force(rstore, family):
    view = TokenView(rstore)
    patterns = list(CHAR_CLASSES.values()) if family == "char-class" else \
        [position_regex(a, b) for a, b in position_buckets(view.max_doc_chars())]
    masks = [view.regex_mask(p) for p in patterns]
    for p, m in zip(patterns, masks, strict=True):
        assert np.array_equal(m, _reference_regex_mask(rstore, p)), p
    for site, min_precision in itertools.product(rstore.sites, (0.0, 0.5)):
        codes = np.asarray(rstore.codes(0, site))
        got = best_masks(codes, masks, rstore.counts(site), min_precision)
        for c in range(rstore.sites[site].num_codes):
            fires = int((codes == c).any(1).sum())
            hits = [int((codes[m] == c).any(1).sum()) for m in masks]
            f1s = [2 * h / (fires + int(m.sum())) if h >= min_precision * fires else 0.0
                   for h, m in zip(hits, masks, strict=True)]
            assert got.f1[c] == pytest.approx(max(f1s), abs=1e-12)
            assert got.mask[c] == (int(np.argmax(f1s)) if max(f1s) > 0 else -1)


def test_best_prefix_is_the_best_set_of_all():
    """Without a size limit, the keys taken in order of h/s give the best F1 over every subset of keys."""
    rng = np.random.default_rng(3)
    keys = rng.integers(0, 6, 300)
    codes = np.where(rng.random(300) < 0.5, keys % 3, rng.integers(0, 3, 300))[:, None]
    fires = np.bincount(codes[:, 0], minlength=3)
    got = best_key_sets(codes, keys, fires, 6)
    for c in range(3):
        best = max(2 * sum(int(((keys == v) & (codes[:, 0] == c)).sum()) for v in sub)
                   / (fires[c] + sum(int((keys == v).sum()) for v in sub))
                   for m in range(1, 7) for sub in itertools.combinations(range(6), m))
        assert got.f1[c] == pytest.approx(best, abs=1e-12)


def _same_as_find_codes(store: Store, rows: list[dict]) -> int:
    checked = 0
    for r in rows:
        if r["query"] is None:
            continue
        doc = cbtool.find_codes(store, sites=r["site"], top=0, examples=0, **r["query"])
        found = {x["code"]: x for x in doc["rows"]}[r["code"]]
        assert (found["precision"], found["recall"], found["f1"], found["hits"], found["fires"]) == \
            (r["precision"], r["recall"], r["f1"], r["hits"], r["fires"]), r
        assert doc.get("feature_tokens", r["feature_tokens"]) == r["feature_tokens"]
        checked += 1
    return checked


def test_find_codes_reproduces_every_explanation(rstore):
    doc = explain(rstore, min_count=1, max_set=MAX_SET)
    assert len(doc["rows"]) == sum(int((rstore.counts(s) >= 1).sum()) for s in rstore.sites)
    assert _same_as_find_codes(rstore, doc["rows"]) == len(doc["rows"])
    families = {r["family"] for r in doc["rows"]}
    assert {"token", "position"} <= families, families
    # "a" is not faithful (it also occurs inside "ab"): its hypotheses are scored by the regex itself
    assert not TokenView(rstore).faithful(1) and TokenView(rstore).faithful(6)
    census = doc["census"]["all"]
    explained = [r for r in doc["rows"] if r["precision"] >= 0.8]
    assert census["explained"] == len(explained)
    assert census["firing_mass_share"] == pytest.approx(
        sum(r["fires"] for r in explained) / sum(r["fires"] for r in doc["rows"]))


def test_kept_hypothesis_follows_the_precise_rule_by_brute_force(tmp_path):
    """On a store whose token strings are all faithful (every hypothesis scored by its counts), each code's kept
    hypothesis is the best-F1 one among all candidates (every key prefix of every keyed family, every mask) of
    precision >= p and F1 >= min_f1_share x the best F1, else the best-F1 one; the census counts both rules."""
    store = random_store(tmp_path / "codes", seed=4, docs=16, vocab=FAITHFUL_VOCAB, split=True)
    p, share = 0.8, 0.6
    doc = explain(store, min_count=1, max_set=MAX_SET, min_precision=p, min_f1_share=share)
    view = TokenView(store)
    assert view.tiled and all(view.faithful(t) for t in range(1, len(FAITHFUL_VOCAB)))
    masks = [_reference_regex_mask(store, rx) for rx in CHAR_CLASSES.values()] + \
        [_reference_regex_mask(store, position_regex(a, b)) for a, b in position_buckets(view.max_doc_chars())]
    preferred = 0
    for site in store.sites:
        codes = np.asarray(store.codes(0, site))
        n = store.sites[site].num_codes
        cands: dict[int, list[tuple[int, int]]] = {c: [] for c in range(n)}  # (hits, size)
        for family in cbtool.explanations.explainer.KEYED:
            keys = _reference_keys(store, family)
            for c, prefixes in _reference_prefixes(codes, keys, n, 1 if family == "label" else MAX_SET).items():
                cands[c] += [(h, s) for h, s, _ in prefixes]
        for m in masks:
            for c in range(n):
                cands[c].append((int((codes[m] == c).any(1).sum()), int(m.sum())))
        for r in (r for r in doc["rows"] if r["site"] == site):
            fires = r["fires"]
            scored = [(2 * h / (fires + s), h / fires) for h, s in cands[r["code_id"]] if h]
            best_f1, best_p = max(scored, key=lambda x: (x[0], x[1]))
            assert r["best_f1"] == pytest.approx(best_f1, abs=1e-12)
            precise = [f for f, q in scored if q >= p and f >= share * best_f1]
            if max(q for f, q in scored if f == pytest.approx(best_f1, abs=1e-12)) >= p:
                assert r["f1"] == pytest.approx(best_f1, abs=1e-12) and r["precision"] >= p
            elif precise:
                assert r["f1"] == pytest.approx(max(precise), abs=1e-12) and r["precision"] >= p, r
                preferred += 1
            else:
                assert r["f1"] == pytest.approx(best_f1, abs=1e-12) and r["precision"] < p, r
    assert preferred > 0  # the rule mattered on this store
    rows = doc["rows"]
    census = doc["census"]["all"]
    assert census["explained"] == sum(r["precision"] >= p for r in rows)
    assert census["best_f1_explained_share"] == sum(r["best_f1_precision"] >= p for r in rows) / len(rows)
    assert census["best_f1_explained_share"] < census["explained_share"]
    assert _same_as_find_codes(store, rows) == len(rows)
    only_best = explain(store, min_count=1, max_set=MAX_SET, min_precision=p, min_f1_share=1.0)
    assert all(r["f1"] == r["best_f1"] for r in only_best["rows"])
    assert only_best["census"]["all"]["explained_share"] == census["best_f1_explained_share"]


def test_no_hypothesis_covers_more_than_max_coverage(rstore):
    """A hypothesis true of more than `max_coverage` of the tokens explains nothing: no kept (or best-F1)
    hypothesis covers more, the rows change where one did, and find-codes still reproduces every row."""
    n = rstore.num_tokens
    wide = explain(rstore, min_count=1, max_coverage=1.0)["rows"]
    assert any(r["feature_tokens"] > 0.3 * n for r in wide)  # the limit below bites on this store
    doc = explain(rstore, min_count=1, max_coverage=0.3)
    assert doc["max_coverage"] == 0.3 and all(r["feature_tokens"] <= 0.3 * n for r in doc["rows"])
    assert _same_as_find_codes(rstore, doc["rows"]) == sum(r["query"] is not None for r in doc["rows"])
    default = explain(rstore, min_count=1)
    assert default["max_coverage"] == 0.5 and all(r["feature_tokens"] <= 0.5 * n for r in default["rows"])


def test_each_family_alone_is_reproduced(rstore):
    for family in cbtool.explanations.explainer.FAMILIES:
        doc = explain(rstore, min_count=2, families=family)
        assert {r["family"] for r in doc["rows"]} <= {family, None}
        _same_as_find_codes(rstore, doc["rows"])


def test_explain_cli_census_gate_and_find_codes_cli(rstore):
    res = run_cli("explain", rstore.path, "--json", "--min-count", "3")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["kind"] == "explain" and set(doc["census"]) == {"0.mlp", "1.mlp", "all"}
    row = max(doc["rows"], key=lambda r: r["fires"])
    q = row["query"]
    args = ["--regex", q["regex"]] if "regex" in q else ["--labels", q["labels"], "--label", q["label"]]
    fc = json.loads(run_cli("find-codes", rstore.path, *args, "--sites", row["site"], "--top", "0", "--json").stdout)
    found = {x["code"]: x for x in fc["rows"]}[row["code"]]
    assert (found["precision"], found["recall"], found["f1"]) == (row["precision"], row["recall"], row["f1"])
    low = run_cli("explain", rstore.path, "--require-explained", "1.0", "--min-precision", "1.0")
    assert low.exit_code == 1 and "explain less than" in low.stderr
    assert run_cli("explain", rstore.path, "--require-explained", "0").exit_code == 0
    lines = run_cli("explain", rstore.path, "--jsonl", "--sites", "1.mlp").stdout.splitlines()
    assert lines and all(json.loads(x)["site"] == "1.mlp" for x in lines)
    for bad in (["--families", "colour"], ["--max-set", "0"], ["--min-f1-share", "1.5"], ["--require-explained", "2"],
                ["--max-coverage", "0"], ["--max-coverage", "1.5"],
                ["--json", "--jsonl"], ["--fsm"]):
        res = run_cli("explain", rstore.path, *bad)
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, (bad, res.output)


def test_table_query_column_pastes_into_a_shell(rstore):
    """The table's find-codes column, split by a shell, gives back each row's query exactly (it printed Python
    reprs, with doubled backslashes, before)."""
    import shlex

    from cbtool.explanations.explainer import shell_query

    rows = [r for r in explain(rstore, min_count=1)["rows"] if r["query"]]
    assert any("\\" in r["query"].get("regex", "") for r in rows)  # backslashes to keep
    for r in rows:
        q = r["query"]
        want = ["--labels", q["labels"], "--label", q["label"]] if "labels" in q else ["--regex", q["regex"]]
        assert shlex.split(shell_query(q)) == want
    assert shlex.split(shell_query({"regex": "it's \\d"})) == ["--regex", "it's \\d"]


def test_api_names_are_the_functions():
    import cbtool.explanations.explainer  # noqa: F401 - the submodule must not hide the API function

    assert cbtool.explain is explain and callable(cbtool.recover_automaton)


def test_explain_on_the_tokfsm_fixture_store():
    store = cbtool.open_store(FIXTURE_STORE)
    doc = explain(store, min_count=5)
    # codes that fire only on BOS (no characters) have no hypothesis a regex or label can express
    assert _same_as_find_codes(store, doc["rows"]) == sum(r["query"] is not None for r in doc["rows"]) > 50
    res = run_cli("explain", FIXTURE_STORE, "--fsm", "--sites", "*.mlp", "--top", "3")
    assert res.exit_code == 0 and "automaton recovered" in res.stdout


def _fsm_store(path: Path, noise: float) -> Store:
    """TokFSM sequences whose single site's code is the state at its second digit (with `noise` random codes)."""
    fsm = TokFSM(FSMSpec(num_states=20, out_degree=3, seq_len=33, seed=5))
    import torch

    tokens, labels = fsm.batch(1000, torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    docs = []
    for t, lab in zip(tokens.numpy(), labels.numpy(), strict=True):
        text = "".join(str(x - 1) for x in t[1:])
        spans = np.r_[[[0, 0]], np.stack([np.arange(len(t) - 1), np.arange(1, len(t))], 1)]
        docs.append(Document(t.astype(np.int64), text, spans, lab.astype(np.int64)))
    arrays = documents_to_arrays(docs)
    lab = arrays.labels["state"]
    code = np.where(lab >= 0, lab * 2 + (np.arange(len(lab)) % 2), 40)  # two codes per state
    code = np.where(rng.random(len(code)) < noise, rng.integers(0, 41, len(code)), code)
    arrays.codes = {"0.mlp": code[:, None]}
    corpus = {"kind": "tokfsm", "num_states": 20, "out_degree": 3, "seq_len": 33, "seed": 5}
    return write_store(path, [Site("0.mlp", CodebookSpec(0, "mlp", 1, 4, 41, 1), 0)], [arrays], labels=["state"],
                       corpus=corpus)


def test_automaton_recovered_from_state_codes(tmp_path):
    clean = recover_automaton(_fsm_store(tmp_path / "clean", 0.0), "0.mlp", min_edge_count=1)
    assert clean["true_edges"] == 60 and clean["edge_precision"] == 1.0 and clean["edge_recall"] == 1.0
    noisy = recover_automaton(_fsm_store(tmp_path / "noisy", 0.3), "0.mlp", min_edge_count=1)
    assert noisy["edge_precision"] < 0.9 and noisy["majority_purity"] < 1.0
    res = run_cli("explain", tmp_path / "clean", "--fsm", "--json")
    assert json.loads(res.stdout)["automaton"][0]["edge_recall"] == 1.0


def test_similar_codes_by_jaccard_and_cosine(rstore):
    from cbtool.analysis.similar import similar_codes

    codes = {s: np.asarray(rstore.codes(0, s)) for s in rstore.sites}
    fire_sets = {(s, c): {i for i, row in enumerate(codes[s].tolist()) if c in row}
                 for s in rstore.sites for c in range(rstore.sites[s].num_codes)}
    a = fire_sets[("0.mlp", 4)]
    ref = sorted(((-len(a & b) / len(a | b), list(rstore.sites).index(s), c) for (s, c), b in fire_sets.items()
                  if (s, c) != ("0.mlp", 4) and a & b))[:5]
    sim = similar_codes(rstore, "0.mlp:4", 5)
    assert [(r["site"], r["code_id"]) for r in sim["jaccard"]] == [(list(rstore.sites)[r], c) for _, r, c in ref]
    assert [r["jaccard"] for r in sim["jaccard"]] == pytest.approx([-j for j, _, _ in ref])
    assert sim["cosine"] is None and "checkpoint" in sim["cosine_unavailable"]
    res = run_cli("show-code", FIXTURE_STORE, "0.mlp:12", "--similar", "3", "--json")
    doc = json.loads(res.stdout)["similar"]
    assert len(doc["cosine"]) == 3 and doc["cosine"][0]["cosine"] >= doc["cosine"][-1]["cosine"]
    assert all(r["code"] != "0.mlp:12" for r in doc["cosine"] + doc["jaccard"])
    assert run_cli("show-code", FIXTURE_STORE, "0.mlp:12", "--similar", "-1").exit_code == 2


def test_cosine_neighbours_read_the_code_vectors_without_building_the_model(monkeypatch):
    """The cosines are those of the checkpoint's code vectors, read without loading its model (on a pretrained
    base that load took 13 of show-code --similar's 16 s)."""
    from cbtool.analysis.similar import cosine_neighbours
    from cbtool.formats import checkpoint

    store = cbtool.open_store(FIXTURE_STORE)
    site = store.sites["0.mlp"]
    vectors = cbtool.load_checkpoint(store.checkpoint_path).model.codebook(site.spec).codes[site.group].detach()
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    cos = (unit @ unit[12]).numpy()
    cos[12] = -np.inf
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("the model was built"))
    got = cosine_neighbours(store, "0.mlp", 12, 4)
    assert [r["code_id"] for r in got] == np.argsort(-cos, kind="stable")[:4].tolist()
    assert [r["cosine"] for r in got] == pytest.approx(np.sort(cos)[::-1][:4].tolist(), abs=1e-12)


def test_find_codes_at_document_level(rstore):
    doc = cbtool.find_codes(rstore, regex="42,", level="document", top=0, sites="1.mlp")
    offs = np.asarray(rstore.doc_offsets(0)).tolist()
    dc = np.asarray(rstore.doc_chars(0)).tolist()
    text = rstore.text(0)
    codes = np.asarray(rstore.codes(0, "1.mlp"))
    match = [re.search("42,", text[a:b]) is not None for a, b in zip(dc[:-1], dc[1:], strict=True)]
    assert doc["feature_documents"] == sum(match) > 0
    for row in doc["rows"]:
        appears = [bool((codes[offs[d]:offs[d + 1]] == row["code_id"]).any()) for d in range(len(match))]
        hits = sum(a and m for a, m in zip(appears, match, strict=True))
        assert (row["fires"], row["hits"]) == (sum(appears), hits)
        assert row["precision"] == hits / sum(appears) and row["recall"] == hits / sum(match)
    res = run_cli("find-codes", rstore.path, "--regex", "42,", "--level", "document", "--top", "3")
    assert res.exit_code == 0 and "documents matching" in res.stdout
    for bad in (["--labels", "state", "--level", "document"], ["--regex", "a", "--level", "line"]):
        assert run_cli("find-codes", rstore.path, *bad).exit_code == 2


def test_literal_matcher_gives_the_regex_engines_ranges():
    """cbtool/explanations/literal_match.py against `finditer` per document (cbtool/analysis/features.py) on random
    texts with overlapping, bordered and nested literals, lookbehinds across document starts and parity lookaheads;
    and
    the tokens its ranges select (`features.overlapping_positions`, what explain uses) against `tokens_overlapping`
    of the engine's ranges."""
    from cbtool.analysis.features import match_ranges, overlapping_positions, tokens_overlapping
    from cbtool.explanations.explainer import PARITY_LOOKAHEAD
    from cbtool.explanations.literal_match import Alternative, LiteralText
    from cbtool.util.regexes import UserRegex

    rng = np.random.default_rng(7)
    pieces = ["a", "b", "ab", "aa", "ba", "\n", "é"]
    for trial in range(300):
        text = "".join(rng.choice(list("ab\né"), int(rng.integers(0, 40))))
        cuts = np.sort(rng.integers(0, len(text) + 1, int(rng.integers(0, 4))))
        doc_chars = np.r_[0, cuts, len(text)]
        alts = [Alternative(str(rng.choice(["", *pieces])) if rng.random() < 0.5 else "",
                            str(rng.choice(["", *pieces])), None if rng.random() < 0.6 else int(rng.integers(0, 2)))
                for _ in range(int(rng.integers(1, 4)))]
        pattern = "(?:" + "|".join((f"(?<={re.escape(a.before)})" if a.before else "")
                                   + (re.escape(a.body) if a.body else r"[\s\S]")
                                   + ("" if a.parity is None else PARITY_LOOKAHEAD[a.parity]) for a in alts) + ")"
        want = match_ranges(UserRegex(pattern), text, doc_chars)
        lt = LiteralText(text, doc_chars)
        got = lt.ranges(alts)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (trial, text, pattern)
        bounds = np.sort(np.r_[0, rng.integers(0, len(text) + 1, int(rng.integers(0, 12))), len(text)])
        spans = np.stack([bounds[:-1], bounds[1:]], 1)  # tokens tiling the text, some empty
        assert np.array_equal(overlapping_positions(spans[:, 0], spans[:, 1], *got),
                              np.flatnonzero(tokens_overlapping(spans, *want, "all")))


@pytest.mark.parametrize("max_set", [1, 2, 4, 8])
def test_leading_pairs_in_rounds_equal_the_full_sort(max_set):
    """key_prefixes with `max_set` (pairs picked in rounds) gives each code's first `max_set` pairs of the full
    search order, with many ties of h / s and of h."""
    from cbtool.explanations.hypotheses import key_prefixes

    rng = np.random.default_rng(max_set)
    for _ in range(20):
        n = int(rng.integers(1, 400))
        keys = np.where(rng.random(n) < 0.1, -1, rng.integers(0, int(rng.integers(1, 30)), n))
        codes = rng.integers(0, 6, (n, 1))
        fires = np.bincount(codes[:, 0], minlength=6)
        full, few = key_prefixes(codes, keys, fires), key_prefixes(codes, keys, fires, max_set)
        keep = full.rank < max_set
        for field in ("code", "key", "rank", "cum_h", "cum_s", "f1"):
            assert np.array_equal(getattr(full, field)[keep], getattr(few, field)), field


def test_explain_is_the_same_over_shards(rstore, tmp_path):
    """The same documents and codes written as 3 shards: every row and the census equal the one-shard store's
    (per-shard token offsets, literal matching and faithfulness), and find-codes reproduces every row."""
    sharded = random_store(tmp_path / "codes", shards=3)
    assert sharded.num_shards == 3 and sharded.num_tokens == rstore.num_tokens
    one, three = (explain(s, min_count=1, max_set=MAX_SET) for s in (rstore, sharded))
    assert three["rows"] == one["rows"] and three["census"] == one["census"]
    assert _same_as_find_codes(sharded, three["rows"]) == len(three["rows"])


def test_explain_transfer_on_the_same_store_keeps_every_explanation(rstore, tmp_path):
    """benchmarks/explain_transfer.py scores each explained row's query on another store: on the store the rows
    were fit on it gives back their own numbers; on other documents (another seed) it scores the same codes."""
    from benchmarks.explain_transfer import transfer

    rows = explain(rstore, min_count=3)["rows"]
    same = transfer(rows, rstore, per_site=50, min_precision=0.5, min_count=3)
    assert all(res["sampled"] > 0 for res in same.values())
    for site, res in same.items():
        fit = [r for r in rows if r["site"] == site and r["precision"] >= 0.5]
        assert res["explained_on_fit"] == res["sampled"] == res["live_on_other"] == res["still_explained"] == len(fit)
        assert res["median_precision_other"] == res["median_precision_fit"]
        assert res["median_recall_other"] == res["median_recall_fit"]
    other = transfer(rows, random_store(tmp_path / "other", seed=1, docs=20), per_site=50, min_precision=0.5,
                     min_count=3)
    assert set(other) == set(same) and all(r["live_on_other"] <= r["sampled"] for r in other.values())


def test_explain_reports_progress_in_a_log(rstore, monkeypatch):
    """A long explain says how far it is: plain `explain:` lines on a stderr that is not a terminal, ending at
    every live code of the chosen sites."""
    monkeypatch.setenv("CBTOOL_PROGRESS_SECONDS", "0.01")
    hypothesis = cbtool.explanations.explainer._best_hypothesis

    def slow(*args, **kwargs):  # a code that takes longer than the heartbeat, as on a large store
        time.sleep(0.005)
        return hypothesis(*args, **kwargs)

    monkeypatch.setattr(cbtool.explanations.explainer, "_best_hypothesis", slow)
    res = run_cli("explain", rstore.path, "--min-count", "1", "--json")
    assert res.exit_code == 0, res.output
    live = sum(int((rstore.counts(s) >= 1).sum()) for s in rstore.sites)
    lines = [line for line in res.stderr.splitlines() if line.startswith("explain:")]
    assert lines, res.stderr
    assert re.match(rf"explain: [\d,]+/{live} codes", lines[-1]), lines
    assert json.loads(res.stdout)["census"]["all"]["live_codes"] == live
