"""Explain: every live code of 20 sites x 1000 codes over 1M tokens, all hypothesis families (`cbtool explain`).

A synthetic store (written to a temporary directory, read back memory-mapped): `--tokens` tokens of word-level
text (a Zipfian vocabulary of `--vocab` words, capitalised words, numbers, punctuation, line breaks; documents of
~500 tokens), `--sites` sites of C=`--codes`, k=1 (the default checkpoint's shape). Each site's codes depend on
the token (most firings), the previous token or the position in the document, with noise, so the best
hypotheses are spread over the families and over many distinct tokens, as in a trained dictionary.

Timed: `cbtool.explain` (cbtool/explanations/explainer.py) (every family, the census, each row rendered as a
find-codes query).
Baseline in the same run: one bincount over every stored id of every site (the least a pass over the codes
costs). Floor: explain <= 30 s. Also printed: the CPU time of explain (one thread), which on a shared machine
is closer to what an idle one would take than the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cbtool.explanations.explainer import explain
from cbtool.formats.store import documents_to_arrays
from cbtool.formats.store_writer import write_store
from cbtool.model.sites import CodebookSpec, Site
from cbtool.tasks.base import Document

FLOOR_S = 30.0


def _words(vocab: int, rng: np.random.Generator) -> list[str]:
    """Token strings that end in a space or line break and hold none inside: each occurs only as itself."""
    out = []
    for i in range(vocab):
        kind = i % 10
        if kind == 0:
            out.append(f"{i} ")
        elif kind == 1:
            out.append(f"W{i:x} ".capitalize())
        elif kind == 2:
            out.append(",;.!?"[i % 5] * (1 + i % 2) + " ")
        elif kind == 3 and i % 7 == 0:
            out.append(f"w{i}\n")
        else:
            out.append("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 2 + i % 6)) + f"{i % 97:02d}"[0] + " ")
    return list(dict.fromkeys(out))


def synthetic_store(path: Path, tokens: int, sites: int, codes: int, vocab: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    words = _words(vocab, rng)
    v = len(words)
    zipf = 1.0 / np.arange(1, v + 1)
    ids = rng.choice(v, size=tokens, p=zipf / zipf.sum())
    doc_len = 500
    docs = []
    for a in range(0, tokens, doc_len):
        t = ids[a : a + doc_len]
        lens = np.array([len(words[i]) for i in t])
        ends = np.cumsum(lens)
        docs.append(Document(t.astype(np.int64), "".join(words[i] for i in t), np.stack([ends - lens, ends], 1)))
    arrays = documents_to_arrays(docs)
    tok = arrays.tokens
    prev = np.r_[0, tok[:-1]]
    pos = np.concatenate([np.arange(len(d.tokens)) for d in docs])
    arrays.codes = {}
    site_list = []
    for s in range(sites):
        perm = rng.permutation(v * 7)
        by_token = perm[tok] % codes
        by_prev = perm[prev + v] % codes
        by_pos = (pos // 32 + s) % codes
        r = rng.random(len(tok))
        ids_s = np.where(r < 0.6, by_token, np.where(r < 0.75, by_prev, np.where(r < 0.85, by_pos,
                                                                                  rng.integers(0, codes, len(tok)))))
        name = f"{s // 2}.{'mlp' if s % 2 else 'attn'}"
        arrays.codes[name] = ids_s[:, None]
        site_list.append(Site(name, CodebookSpec(s // 2, "mlp" if s % 2 else "attn", 1, 8, codes, 1), 0))
    write_store(path, site_list, [arrays])
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks explain", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--sites", type=int, default=20)
    ap.add_argument("--codes", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=5000)
    ap.add_argument("--json", type=Path, default=None, help="Also write the results to this file.")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="cbtool-bench-explain-"))
    try:
        t0 = time.perf_counter()
        store_path = synthetic_store(tmp / "codes", args.tokens, args.sites, args.codes, args.vocab)
        build_s = time.perf_counter() - t0
        from cbtool.formats.store import Store

        store = Store(store_path)
        t0 = time.perf_counter()
        for site in store.sites:
            np.bincount(np.asarray(store.codes(0, site), dtype=np.int64).reshape(-1), minlength=args.codes)
        baseline_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        doc = explain(store)
        explain_s, explain_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        census = doc["census"]["all"]
        res = {
            "tokens": store.num_tokens, "sites": len(store.sites), "codes": args.codes, "k": 1,
            "live_codes": census["live_codes"], "explained_share": census["explained_share"],
            "by_family": census["by_family"], "explain_s": round(explain_s, 2),
            "explain_cpu_s": round(explain_cpu_s, 2),
            "baseline_bincount_s": round(baseline_s, 3),
            "store_build_s": round(build_s, 1), "floor_s": FLOOR_S, "load_average": os.getloadavg(),
            "ok": explain_s <= FLOOR_S,
        }
        print(json.dumps(res, indent=2))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0 if res["ok"] else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
