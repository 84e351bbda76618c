"""Property tests (hypothesis) for the code-reference parser, the regex -> token mapping and the
precision/recall maths."""

from __future__ import annotations

import re

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cbtool.analysis.features import match_ranges, tokens_overlapping
from cbtool.analysis.scoring import SiteScores, score_labels, score_mask
from cbtool.errors import UserError
from cbtool.formats.store import documents_to_arrays
from cbtool.formats.store_writer import write_store
from cbtool.model.refs import parse_code_ref, resolve_site
from cbtool.model.sites import CodebookSpec, Site
from cbtool.tasks.base import Document

SETTINGS = settings(max_examples=60, deadline=None)


# -- code references -----------------------------------------------------------------------------------

@st.composite
def site_tables(draw) -> dict[str, Site]:
    """Random site layouts: per layer some of mlp, attn, per-head codebooks."""
    sites: dict[str, Site] = {}
    for layer in range(draw(st.integers(1, 4))):
        c = draw(st.integers(1, 5000))
        if draw(st.booleans()):
            sites[f"{layer}.mlp"] = Site(f"{layer}.mlp", CodebookSpec(layer, "mlp", 1, 4, c, 1), 0)
        if draw(st.booleans()):
            sites[f"{layer}.attn"] = Site(f"{layer}.attn", CodebookSpec(layer, "attn", 1, 4, c, 1), 0)
        heads = draw(st.integers(0, 3))
        if heads:
            spec = CodebookSpec(layer, "attn_heads", heads, 4, c, 1)
            for h in range(heads):
                sites[f"{layer}.attn.h{h}"] = Site(f"{layer}.attn.h{h}", spec, h)
    assume(sites)
    return sites


@SETTINGS
@given(site_tables(), st.data())
def test_canonical_refs_round_trip(sites, data):
    name = data.draw(st.sampled_from(sorted(sites)))
    code = data.draw(st.integers(0, sites[name].num_codes - 1))
    pad = data.draw(st.sampled_from(["", " ", "\t"]))
    site, got = parse_code_ref(f"{pad}{name}:{pad}{code}{pad}", sites)
    assert (site.name, got) == (name, code)
    assert parse_code_ref(f"{site.name}:{got}", sites) == (site, got)  # canonical form is a fixed point
    # out of range and negative codes are refused
    for bad in (f"{name}:{sites[name].num_codes}", f"{name}:-{code + 1}", f"{name}:{code}x", f"{name}:"):
        try:
            parse_code_ref(bad, sites)
        except UserError:
            continue
        raise AssertionError(f"{bad!r} was accepted")


@SETTINGS
@given(site_tables(), st.data())
def test_bare_layer_means_mlp_else_the_only_site_else_refused(sites, data):
    layer = data.draw(st.integers(0, 5))
    at_layer = [s for s in sites.values() if s.spec.layer == layer]
    mlp = [s for s in at_layer if s.spec.component == "mlp"]
    try:
        got = resolve_site(str(layer), sites)
    except UserError as e:
        assert not mlp and len(at_layer) != 1
        if at_layer:
            assert "ambiguous" in str(e) and all(s.name in str(e) for s in at_layer)
        return
    assert got == (mlp[0] if mlp else at_layer[0])


@settings(max_examples=300, deadline=None)
@given(site_tables(), st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789.:-xhmlpat \t\n+", max_size=30),
    st.builds(lambda a, b: f"{a}:{b}", st.text(alphabet="0123456789.mlpath", max_size=12),
              st.integers(-10**30, 10**30).map(str)),
    st.integers(0, 10**6).map(lambda n: "9" * n if n > 4000 else str(n)).map(lambda d: f"0.mlp:{d}"),
))
def test_parser_never_raises_anything_but_user_error(sites, text):
    try:
        site, code = parse_code_ref(text, sites)
    except UserError as e:
        assert str(e)
        return
    assert site.name in sites and 0 <= code < site.num_codes
    assert re.fullmatch(r"\s*[^:\s]+\s*:\s*[0-9]+\s*", text)


def test_huge_numbers_are_refused_cleanly():
    sites = {"0.mlp": Site("0.mlp", CodebookSpec(0, "mlp", 1, 4, 10, 1), 0)}
    for text in ("0.mlp:" + "9" * 5000, "9" * 5000 + ":1", "0.mlp:" + "0" * 5000 + "7"):
        try:
            site, code = parse_code_ref(text, sites)
        except UserError:
            continue
        assert (site.name, code) == ("0.mlp", 7)


# -- regex -> tokens -----------------------------------------------------------------------------------

@st.composite
def tokenised_docs(draw) -> tuple[list[Document], str]:
    """Documents over a small alphabet cut into tokens with gaps (characters no token covers) and
    specials (empty spans), like text tokenizers that drop whitespace or add BOS."""
    docs = []
    for _ in range(draw(st.integers(1, 4))):
        text = draw(st.text(alphabet="ab c", max_size=30))
        cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=12))) | {0, len(text)})
        spans = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            if draw(st.booleans()) and b - a > 1:
                a += 1  # a gap of one character no token covers
            spans.append((a, b))
            if draw(st.integers(0, 5)) == 0:
                spans.append((b, b))  # a special token
        if not spans:
            spans = [(0, 0)]
        docs.append(Document(np.arange(len(spans), dtype=np.int64), text, np.asarray(spans, np.int64).reshape(-1, 2)))
    pattern = draw(st.sampled_from(["a", "b+", "a b", "c|ab", " ", "a*", "(?<=a)b", "ba?c", "x"]))
    return docs, pattern


def _covered(spans: np.ndarray, a: int, b: int) -> np.ndarray:
    """Tokens with a character in [a, b) (specials, with empty spans, have none)."""
    return (spans[:, 0] < b) & (spans[:, 1] > a) & (spans[:, 1] > spans[:, 0])


@SETTINGS
@given(tokenised_docs())
def test_regex_tokens_cover_every_matched_character(case):
    docs, pattern = case
    arr = documents_to_arrays(docs)
    starts, ends = match_ranges(re.compile(pattern), arr.text, arr.doc_chars)
    all_mask = tokens_overlapping(arr.spans, starts, ends, "all")
    first_mask = tokens_overlapping(arr.spans, starts, ends, "first")
    # reference: per document, per non-empty match
    expected_all = np.zeros(len(arr.tokens), bool)
    expected_first = np.zeros(len(arr.tokens), bool)
    n_matches = 0
    for d, doc in enumerate(docs):
        base_t = arr.doc_offsets[d]
        for m in re.finditer(pattern, doc.text):
            if m.end() == m.start():
                continue
            n_matches += 1
            hit = np.flatnonzero(_covered(doc.spans, m.start(), m.end()))
            expected_all[base_t + hit] = True
            if len(hit):
                expected_first[base_t + hit[0]] = True
            # every matched character that some token covers lies in a selected token
            for ch in range(m.start(), m.end()):
                owners = np.flatnonzero((doc.spans[:, 0] <= ch) & (doc.spans[:, 1] > ch))
                assert all_mask[base_t + owners].all()
    assert len(starts) == n_matches
    np.testing.assert_array_equal(all_mask, expected_all)  # and no token without a matched character
    np.testing.assert_array_equal(first_mask, expected_first)
    assert first_mask.sum() <= n_matches and not (first_mask & ~all_mask).any()


# -- precision / recall --------------------------------------------------------------------------------

@st.composite
def stores(draw) -> tuple:
    n = draw(st.integers(1, 60))
    c = draw(st.integers(1, 12))
    k = draw(st.integers(1, min(3, c)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    codes = np.stack([rng.permutation(c)[:k] for _ in range(n)])  # distinct ids per token, like a top-k
    labels = rng.integers(-1, 4, n)
    mask = rng.random(n) < draw(st.floats(0, 1))
    return n, c, k, codes, labels, mask


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_precision_recall_match_numpy(tmp_path_factory, data):
    n, c, k, codes, labels, mask = data.draw(stores())
    cut = data.draw(st.integers(0, n))
    pieces = [(0, cut), (cut, n)] if 0 < cut < n else [(0, n)]
    text = "".join("x" for _ in range(n))
    shards = []
    for a, b in pieces:
        doc = Document(np.zeros(b - a, np.int64), text[a:b], np.stack([np.arange(b - a), np.arange(1, b - a + 1)], 1),
                       labels[a:b])
        arrays = documents_to_arrays([doc])
        arrays.codes["0.mlp"] = codes[a:b]
        shards.append(arrays)
    site = Site("0.mlp", CodebookSpec(0, "mlp", 1, 4, c, k), 0)
    store = write_store(tmp_path_factory.mktemp("prop") / "s", [site], shards, labels=["state"])
    masks = [mask[a:b] for a, b in pieces]
    sc = score_mask(store, "0.mlp", masks)
    fires = np.array([(codes == i).any(1).sum() for i in range(c)])
    hits = np.array([((codes == i).any(1) & mask).sum() for i in range(c)])
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(fires > 0, hits / fires, 0.0)
        rec = np.where(mask.sum() > 0, hits / max(mask.sum(), 1), 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    np.testing.assert_array_equal(sc.fires, fires)
    np.testing.assert_array_equal(sc.hits, hits)
    np.testing.assert_allclose(sc.precision, prec)
    np.testing.assert_allclose(sc.recall, rec)
    np.testing.assert_allclose(sc.f1, f1)
    assert ((sc.precision >= 0) & (sc.precision <= 1) & (sc.recall >= 0) & (sc.recall <= 1)).all()
    # label mode: every value at once equals the mask computation for that value
    values = np.unique(labels[labels >= 0])
    index = [np.where(labels[a:b] >= 0, np.searchsorted(values, labels[a:b]), -1) for a, b in pieces]
    lab = score_labels(store, "0.mlp", index, len(values))
    for v_i, v in enumerate(values):
        one = score_mask(store, "0.mlp", [labels[a:b] == v for a, b in pieces])
        np.testing.assert_array_equal(lab.hits[v_i], one.hits)
        np.testing.assert_allclose(lab.precision[v_i], one.precision)
        np.testing.assert_allclose(lab.recall[v_i], one.recall)


@SETTINGS
@given(st.lists(st.integers(0, 50), min_size=1, max_size=20), st.data())
def test_sitescores_maths(fires_list, data):
    fires = np.asarray(fires_list)
    hits = np.asarray([data.draw(st.integers(0, f)) for f in fires_list])
    size = data.draw(st.integers(int(hits.max()), 200))
    sc = SiteScores("s", hits, fires, size)
    for i in range(len(fires)):
        p = hits[i] / fires[i] if fires[i] else 0.0
        r = hits[i] / size if size else 0.0
        assert sc.precision[i] == p and sc.recall[i] == r
        assert np.isclose(sc.f1[i], 2 * p * r / (p + r) if p + r else 0.0)
