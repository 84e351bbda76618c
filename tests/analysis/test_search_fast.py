"""The fast regex-feature path of `find-codes` (cbtool/analysis/features.py: one timed search per document, the
tokens of a match found by binary search on the spans) against a brute-force count, and the record of
sha256 checks that lets later readers skip re-hashing unchanged files (cbtool/formats/verified.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import cbtool.formats.store as store_module
from cbtool.analysis.search import find_codes
from cbtool.formats.store import Store, documents_to_arrays, shard_name
from cbtool.formats.store_writer import write_store
from cbtool.formats.verified import RECORD
from cbtool.model.sites import CodebookSpec, Site
from cbtool.tasks.base import Document
from tests.analysis.test_find_codes import _brute_regex
from tests.helpers import run_cli

C, K = 23, 3
SITES = [Site("0.mlp", CodebookSpec(0, "mlp", 1, 8, C, K), 0)]


def _document(rng: np.random.Generator, overlapping: bool) -> Document:
    """Random text over a small alphabet cut into tokens of 1-4 characters, with gaps no token covers and empty
    (special) tokens; `overlapping` adds tokens that cover part of the previous one (spans out of text order)."""
    text = "".join(rng.choice(list("abc d"), int(rng.integers(0, 40))))
    spans, at = [], 0
    if rng.random() < 0.5:
        spans.append((0, 0))
    while at < len(text):
        width = int(rng.integers(1, 5))
        end = min(at + width, len(text))
        spans.append((at, end))
        if overlapping and end - at > 1 and rng.random() < 0.3:
            spans.append((at + 1, end - 1 if end - at > 2 else end))
        if rng.random() < 0.1:
            spans.append((end, end))
        at = end + int(rng.random() < 0.2)
    if not spans:
        spans = [(0, 0)]
    arr = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    return Document(np.arange(len(arr)) % 7, text, arr)


def _brute_counts(docs: list[Document], codes: np.ndarray, pattern: str, match_on: str):
    """hits and fires of every code and |F|, by loops over matches and tokens."""
    feat = _brute_regex(docs, pattern, match_on)
    hits, fires = np.zeros(C, np.int64), np.zeros(C, np.int64)
    for row, f in zip(codes.tolist(), feat.tolist(), strict=True):
        for c in row:
            fires[c] += 1
            hits[c] += f
    return hits, fires, int(feat.sum())


@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_regex_counts_equal_brute_force(tmp_path, seed, overlapping):
    rng = np.random.default_rng(seed)
    docs = [_document(rng, overlapping) for _ in range(60)]
    shards, codes = [], []
    for cut in np.array_split(np.arange(len(docs)), 4):
        arrays = documents_to_arrays([docs[i] for i in cut])
        ids = np.argsort(rng.random((len(arrays.tokens), C)), axis=1)[:, :K]
        arrays.codes["0.mlp"] = ids
        shards.append(arrays)
        codes.append(ids)
    store = write_store(tmp_path / "s", SITES, shards)
    all_codes = np.concatenate(codes)
    ordered = all(np.all(np.diff(a.spans, axis=0) >= 0) for a in shards)
    assert ordered != overlapping  # both the binary-search path and the any-order path are exercised
    for pattern in ("a", "b+", "c d", "(?<=a)b", "^a|d$", "ab*c?", "x", " "):
        for match_on in ("all", "first"):
            hits, fires, size = _brute_counts(docs, all_codes, pattern, match_on)
            doc = find_codes(store, regex=pattern, match_on=match_on, top=0, examples=0)
            assert doc["feature_tokens"] == size, (pattern, match_on)
            got = {r["code_id"]: (r["hits"], r["fires"]) for r in doc["rows"]}
            assert got == {c: (int(hits[c]), int(fires[c])) for c in np.flatnonzero(hits)}, (pattern, match_on)


def _store(tmp_path) -> Store:
    rng = np.random.default_rng(5)
    docs = [_document(rng, False) for _ in range(20)]
    shards = []
    for cut in np.array_split(np.arange(len(docs)), 2):
        arrays = documents_to_arrays([docs[i] for i in cut])
        arrays.codes["0.mlp"] = np.argsort(rng.random((len(arrays.tokens), C)), axis=1)[:, :K]
        shards.append(arrays)
    return write_store(tmp_path / "s", SITES, shards)


def test_a_checked_file_is_not_hashed_again_until_it_changes(tmp_path, monkeypatch):
    path = _store(tmp_path).path
    hashed: list[str] = []
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda f: hashed.append(f.name) or real(f))
    first = find_codes(Store(path), regex="a", top=0, examples=0)
    assert {"codes.0.mlp.npy", "spans.npy", "text.npy"} <= set(hashed)
    assert (path / shard_name(0) / RECORD).is_file() and (path / shard_name(1) / RECORD).is_file()
    hashed.clear()
    assert find_codes(Store(path), regex="a", top=0, examples=0) == first  # a new reader: nothing re-hashed
    assert hashed == []
    # rewriting a file, even with its old mtime put back, changes its identity: it is hashed again, and refused
    codes = path / shard_name(1) / "codes.0.mlp.npy"
    before = codes.stat()
    data = bytearray(codes.read_bytes())
    data[-1] ^= 1
    codes.write_bytes(bytes(data))
    os.utime(codes, ns=(before.st_atime_ns, before.st_mtime_ns))
    res = run_cli("find-codes", path, "--regex", "a")
    assert res.exit_code == 2 and "sha256" in res.stderr and "codes.0.mlp.npy" in res.stderr
    # a damaged record is only a cache: ignored, and the files are checked again
    codes.write_bytes(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    (path / shard_name(0) / RECORD).write_text("{not json")
    hashed.clear()
    assert find_codes(Store(path), regex="a", top=0, examples=0) == first
    assert "codes.0.mlp.npy" in hashed
    assert json.loads((path / shard_name(0) / RECORD).read_text())["files"]


def test_a_catastrophic_regex_is_stopped_on_the_fast_path(tmp_path, monkeypatch):
    monkeypatch.setenv("CBTOOL_REGEX_TIMEOUT", "0.2")
    rng = np.random.default_rng(0)
    arrays = documents_to_arrays([Document(np.zeros(40, np.int64), "1" * 40, np.stack([np.arange(40),
                                                                                        np.arange(1, 41)], 1))])
    arrays.codes["0.mlp"] = np.argsort(rng.random((40, C)), axis=1)[:, :K]
    path = write_store(tmp_path / "s", SITES, [arrays]).path
    res = run_cli("find-codes", path, "--regex", r"(\d|\d)*\D")
    assert res.exit_code == 2 and "ran for over 0.2 s" in res.stderr
