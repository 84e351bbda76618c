"""The code store: dtypes, memory-mapped reading, atomic shards, claims, resume, checkpoint identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cbtool.errors import UserError
from cbtool.formats.store import Store, code_dtype, documents_to_arrays, shard_name
from cbtool.formats.store_writer import StoreWriter, write_store
from cbtool.model.sites import CodebookSpec, Site
from cbtool.tasks.tokfsm import fsm_document
from cbtool.util.files import sha256_file
from tests.helpers import run_cli


def test_code_dtype_is_smallest_unsigned():
    assert code_dtype(2) == np.uint8 and code_dtype(256) == np.uint8
    assert code_dtype(257) == np.uint16 and code_dtype(65536) == np.uint16
    assert code_dtype(65537) == np.uint32


def _shard(rng, n_docs: int, sites: list[Site]):
    docs = [
        fsm_document(np.concatenate([[0], rng.integers(1, 11, 20)]), np.arange(21) - 1) for _ in range(n_docs)
    ]
    arrays = documents_to_arrays(docs)
    for s in sites:
        arrays.codes[s.name] = rng.integers(0, s.num_codes, (len(arrays.tokens), s.spec.k))
    return arrays


def test_store_roundtrip_mmap_counts_and_dtypes(tmp_path):
    rng = np.random.default_rng(0)
    sites = [
        Site("0.mlp", CodebookSpec(0, "mlp", 1, 4, 300, 2), 0),
        Site("1.attn", CodebookSpec(1, "attn", 1, 4, 200, 2), 0),
    ]
    shards = [_shard(rng, 3, sites), _shard(rng, 2, sites)]
    store = write_store(tmp_path / "st", sites, shards, labels=["state"])
    assert store.num_tokens == 5 * 21 and store.num_docs == 5 and store.num_shards == 2
    man = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert man["complete"] and [s["tokens"] for s in man["shards"]] == [63, 42]
    for i, arrays in enumerate(shards):
        ids = store.codes(i, "0.mlp")
        assert isinstance(ids, np.memmap) and ids.dtype == np.uint16  # C=300 needs 16 bits
        assert store.codes(i, "1.attn").dtype == np.uint8
        np.testing.assert_array_equal(ids, arrays.codes["0.mlp"])
        np.testing.assert_array_equal(store.labels(i, "state"), arrays.labels["state"])
        assert store.text(i) == arrays.text
    expected = np.bincount(np.concatenate([a.codes["0.mlp"].ravel() for a in shards]), minlength=300)
    np.testing.assert_array_equal(store.counts("0.mlp"), expected)
    # every array file is a plain .npy that loads without pickle
    for f in (tmp_path / "st").glob("shard-*/*.npy"):
        np.load(f, allow_pickle=False)
    assert not list((tmp_path / "st").glob(".*tmp*"))


def test_failed_shard_write_leaves_nothing_and_store_reads_as_incomplete(tmp_path):
    rng = np.random.default_rng(1)
    sites = [Site("0.mlp", CodebookSpec(0, "mlp", 1, 4, 50, 1), 0)]
    plan = {
        "checkpoint": {"path": "", "sha256": None},
        "corpus": {"kind": "synthetic"},
        "shard_tokens": 10,
        "max_tokens": None,
        "sites": [
            {
                "name": "0.mlp",
                "layer": 0,
                "component": "mlp",
                "group": 0,
                "groups": 1,
                "dim": 4,
                "num_codes": 50,
                "k": 1,
                "dtype": "uint8",
            }
        ],
        "labels": [],
        "token_strings": None,
    }
    w = StoreWriter.open(tmp_path / "st", plan)
    good = _shard(rng, 2, sites)
    bad = _shard(rng, 2, sites)
    bad.codes["0.mlp"] = bad.codes["0.mlp"][:-1]  # wrong length: the write must fail
    with w.claim(0):
        w.write_shard(0, good)
    with pytest.raises(ValueError), w.claim(1):
        w.write_shard(1, bad)
    assert w.is_complete(0) and not w.is_complete(1)
    assert (tmp_path / "st" / ".writer.lock").is_file()  # the writer's claim on the store, until closed
    w.close()
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["manifest.json", shard_name(0)]
    assert not w.finalize(2)
    with pytest.raises(UserError, match="incomplete"):
        Store(tmp_path / "st")
    # a different plan on the same directory is refused; the same plan reopens it
    with pytest.raises(UserError, match="different shard_tokens"):
        StoreWriter.open(tmp_path / "st", {**plan, "shard_tokens": 11})
    assert StoreWriter.open(tmp_path / "st", plan).is_complete(0)


def test_claims_refuse_a_live_writer_and_take_over_a_dead_one(tmp_path):
    sites = [Site("0.mlp", CodebookSpec(0, "mlp", 1, 4, 50, 1), 0)]
    store = write_store(tmp_path / "st", sites, [_shard(np.random.default_rng(2), 1, sites)])
    w = StoreWriter(store.path, store.manifest)
    with w.claim(3):
        with pytest.raises(UserError, match="is being written by pid"):
            with w.claim(3):
                pass
    assert not (store.path / "shard-000003.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (store.path / "shard-000004.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    (store.path / ".shard-000004.tmp-old").mkdir()  # a crashed writer's leftovers
    with w.claim(4):
        assert json.loads((store.path / "shard-000004.lock").read_text())["pid"] == os.getpid()
        assert not (store.path / ".shard-000004.tmp-old").exists()


def _embed(ckpt, out, *extra):
    return run_cli(
        "embed",
        ckpt,
        "--out",
        out,
        "--num-seqs",
        40,
        "--shard-tokens",
        1500,
        "--device",
        "cpu",
        "--json",
        *extra,
    )


def test_embed_workers_resume_claims_and_checkpoint_identity(tiny_checkpoint, tmp_path):
    one = tmp_path / "one"
    res = _embed(tiny_checkpoint, one)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["complete"] and doc["tokens"] == 40 * 128 and doc["shards"] == 4 and doc["written"] == 4

    # two "workers" write disjoint shards; the store is complete only after both
    two = tmp_path / "two"
    r0 = _embed(tiny_checkpoint, two, "--worker", "0/2")
    assert r0.exit_code == 0 and not json.loads(r0.stdout)["complete"]
    with pytest.raises(UserError, match="incomplete"):
        Store(two)
    # a second writer of a shard held by a live process is refused with exit 2
    lock = two / "shard-000001.lock"
    import socket

    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    r_locked = _embed(tiny_checkpoint, two)
    assert r_locked.exit_code == 2 and "being written" in r_locked.stderr
    lock.unlink()
    # resume: only the missing shards are written, and the result equals the one-pass store
    r1 = _embed(tiny_checkpoint, two)
    assert r1.exit_code == 0, r1.output
    d1 = json.loads(r1.stdout)
    assert d1["complete"] and d1["written"] == 2 and d1["skipped"] == 2
    a, b = Store(one), Store(two)
    for s in range(a.num_shards):
        for site in a.sites:
            np.testing.assert_array_equal(a.codes(s, site), b.codes(s, site))
        np.testing.assert_array_equal(a.labels(s, "state"), b.labels(s, "state"))
    again = _embed(tiny_checkpoint, two)
    assert again.exit_code == 0 and json.loads(again.stdout)["written"] == 0

    # the manifest pins the checkpoint by hash; a changed checkpoint is refused by readers and embed
    man = json.loads((one / "manifest.json").read_text())
    assert man["checkpoint"]["sha256"] == sha256_file(tiny_checkpoint / "cbtool.json")
    meta = json.loads((tiny_checkpoint / "cbtool.json").read_text())
    meta["training"]["note"] = "changed"
    (tiny_checkpoint / "cbtool.json").write_text(json.dumps(meta))
    for cmd in (("find-codes", one, "--labels", "state"), ("dead-codes", one), ("show-code", one, "0.mlp:1")):
        r = run_cli(*cmd)
        assert r.exit_code == 2 and "has changed since" in r.stderr, (cmd, r.output)
    r = _embed(tiny_checkpoint, one)
    assert r.exit_code == 2 and "different checkpoint" in r.stderr
    assert _embed(tiny_checkpoint, one, "--overwrite").exit_code == 0
    assert run_cli("dead-codes", one).exit_code == 0
