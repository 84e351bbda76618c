"""Search at scale: a synthetic store (1 site, k=8, C=16384) searched by one process and by 2 gloo ranks.

`python -m benchmarks search_scale --tokens 100000000 --dir /big/disk` writes the store shard by shard
(never all in memory), then times `find_codes(regex=...)` (regex feature -> per-token mask -> bincount of the
masked tokens' ids -> precision/recall of all 16,384 codes), each run in a fresh process, reporting wall time,
tokens/s and peak resident set (VmHWM):

1. verify: the first search of the store, which checks every file it reads against its sha256 and records
   that it did (cbtool/formats/verified.py; the records are deleted first, so this is always the checking run);
2. search: a fresh process on the checked store -- the issue's figure (target: >= 50M tokens/s, <= 1 GiB) --
   and the same query repeated in that process (the store's arrays already mapped);
3. 2 ranks (torch.distributed, gloo; RANK/WORLD_SIZE as torchrun sets them) must give the same document. On a
   2-core machine 2 ranks give no speed-up: both cores are already busy with one rank's numpy plus the OS;
   the point is equality, and the split is what scales across machines.

The load average before and after is printed: a figure taken while other jobs run is not a speed measurement.

Synthetic store: token i is the character chr(ord('a') + t % 26) of a random token t (so the text has one
character per token and a regex selects whole tokens), documents of 1,000 tokens, top-8 ids distinct per
token (r, r + 2048, ..., r + 7 * 2048 mod C), random.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cbtool.formats.store import ShardArrays, site_entry
from cbtool.formats.store_writer import StoreWriter
from cbtool.formats.verified import RECORD
from cbtool.model.sites import CodebookSpec, Site

C, K, DOC = 16384, 8, 1000
QUERY = "q[a-e]"  # ~0.7% of tokens
SEARCH = """
import json, resource, sys, time
from cbtool.util import distributed
from cbtool import find_codes, open_store
distributed.init()
store = open_store(sys.argv[1])
t0 = time.perf_counter()
doc = find_codes(store, regex=sys.argv[2], top=0, examples=0)
first = time.perf_counter() - t0
t0 = time.perf_counter()
find_codes(store, regex=sys.argv[2], top=0, examples=0)
again = time.perf_counter() - t0
if distributed.world().is_main:
    # VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork + exec)
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
    rss = int(hwm[0].split()[1]) / 2**20 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"first_s": first, "again_s": again, "peak_rss_gib": rss, "doc": doc}))
"""


def write_store(path: Path, tokens: int, shard_tokens: int, seed: int = 0) -> None:
    site = Site("0.mlp", CodebookSpec(0, "mlp", 1, 64, C, K), 0)
    plan = {"checkpoint": {"path": "", "sha256": None}, "corpus": {"kind": "synthetic", "tokens": tokens},
            "shard_tokens": shard_tokens, "max_tokens": None, "sites": [site_entry(site)], "labels": [],
            "token_strings": None}
    writer = StoreWriter.open(path, plan, overwrite=True)
    rng = np.random.default_rng(seed)
    shards = -(-tokens // shard_tokens)
    for i in range(shards):
        n = min(shard_tokens, tokens - i * shard_tokens)
        tok = rng.integers(0, 26, n, dtype=np.uint8)
        text = (tok + ord("a")).tobytes().decode("ascii")
        docs = np.arange(0, n + DOC, DOC).clip(max=n)
        docs = np.unique(docs)
        spans = np.stack([np.arange(n), np.arange(1, n + 1)], 1)
        r = rng.integers(0, C, n, dtype=np.int64)
        ids = (r[:, None] + np.arange(K)[None, :] * (C // K)) % C
        arrays = ShardArrays(tok, docs, text, docs.copy(), spans, {}, {"0.mlp": ids})
        with writer.claim(i):
            writer.write_shard(i, arrays)
    writer.finalize(shards)


def search(path: Path, ranks: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", SEARCH, str(path), QUERY]
    if ranks == 1:
        return json.loads(subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
                                         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    return json.loads(outs[0])


def _rate(tokens: int, seconds: float) -> str:
    return f"{seconds:.2f} s ({tokens / seconds / 1e6:.1f}M tokens/s)"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks search_scale", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--shard-tokens", type=int, default=4_000_000)
    ap.add_argument("--dir", type=Path, default=Path("cbtool-run/bench-search"))
    ap.add_argument("--reuse", action="store_true", help="Search the store already at --dir.")
    ap.add_argument("--no-ranks", action="store_true", help="Skip the 2-rank run.")
    a = ap.parse_args(argv)
    store = a.dir / f"store-{a.tokens}"
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    if not a.reuse:
        t0 = time.perf_counter()
        write_store(store, a.tokens, a.shard_tokens)
        print(f"wrote {a.tokens:,} tokens to {store} in {time.perf_counter() - t0:.0f} s", flush=True)
    for record in store.glob(f"shard-*/{RECORD}"):
        record.unlink()
    check = search(store, 1)
    one = search(store, 1)
    n = a.tokens
    print(f"1 process, verify: first search {_rate(n, check['first_s'])} (sha256 of every file read), "
          f"peak RSS {check['peak_rss_gib']:.2f} GiB", flush=True)
    print(f"1 process, search: fresh process {_rate(n, one['first_s'])}, repeated {_rate(n, one['again_s'])}, "
          f"peak RSS {one['peak_rss_gib']:.2f} GiB", flush=True)
    same = check["doc"] == one["doc"]
    if not a.no_ranks:
        two = search(store, 2)
        same &= two["doc"] == one["doc"]
        print(f"2 ranks:   first search {two['first_s']:.2f} s, repeated {two['again_s']:.2f} s "
              f"(rank 0's RSS {two['peak_rss_gib']:.2f} GiB); same document: {two['doc'] == one['doc']}")
    print(f"feature: {one['doc']['feature_tokens']:,} tokens; {one['doc']['matching_codes']} codes score")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0 if same else 1
