"""Analysis: regex + scoring over a 10M-token store, label search, embed throughput vs its roofline.

Three measurements (speed floors), each printed with a baseline measured in the same run:

- scoring: a synthetic store of `--tokens` tokens (one site, k=8, C=16384, TokFSM-like digit text,
  1M-token shards) is written to disk and read back memory-mapped. Timed: `regex_feature` (regex over the
  decoded text of every document + token mapping) + `score_mask` (bincount of the feature tokens' ids).
  Baseline: one bincount over every stored id (the least a full pass over the codes costs). Floor: <= 3 s.
- labels: all 100 TokFSM state values at once over `--label-tokens` tokens (label_feature + score_labels
  + best code per value), for one site with k=8, C=16384 and for 20 sites with k=1, C=1000 (the default
  checkpoint's shape). Baseline: the same bincount over the ids. Floor: <= 1 s.
- embed: `run_embed` (documents, forward with codebooks on, top-k ids to numpy, shard write) vs the same
  model's plain forward (codebooks bypassed) over the same tokens plus the time of its similarity matmuls
  alone (a bmm per codebook module and batch, the roofline of selection). min over repeats, interleaved.
  Floor: baseline / embed >= 0.85.

The machine may be shared; repeats are interleaved so ratios compare runs under the same load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cbtool.analysis.features import label_feature, regex_feature
from cbtool.analysis.scoring import score_labels, score_mask
from cbtool.embedding import run_embed
from cbtool.formats.checkpoint import load_checkpoint, save_checkpoint
from cbtool.formats.store import ShardArrays, Store, site_entry
from cbtool.formats.store_writer import StoreWriter
from cbtool.model.sites import BuiltinLocator, CodebookModel, CodebookSpec, Site
from cbtool.model.transformer import ModelConfig, Transformer
from cbtool.tasks.tokfsm import HELD_OUT_SEED, TokFSM, fsm_documents

SCORING_FLOOR_S, LABEL_FLOOR_S, EMBED_FLOOR = 3.0, 1.0, 0.85


def _synthetic_shard(rng: np.random.Generator, n_docs: int, sites: list[Site], states: bool) -> ShardArrays:
    """TokFSM-shaped documents (BOS + 127 digits, state labels) with random distinct top-k ids."""
    fsm_states = rng.integers(0, 100, (n_docs, 64))
    digits = np.stack([fsm_states // 10, fsm_states % 10], axis=2).reshape(n_docs, -1)[:, :127]
    tokens = np.concatenate([np.zeros((n_docs, 1), np.int64), digits + 1], axis=1).reshape(-1)
    labels = np.concatenate([np.full((n_docs, 1), -1), fsm_states.repeat(2, axis=1)[:, :127]], 1).reshape(-1)
    text = "".join(map(str, digits.reshape(-1).tolist()))
    char_end = np.cumsum(tokens > 0)
    spans = np.stack([char_end - (tokens > 0), char_end], axis=1)
    doc_offsets = np.arange(n_docs + 1, dtype=np.int64) * 128
    doc_chars = np.arange(n_docs + 1, dtype=np.int64) * 127
    n = len(tokens)
    codes = {}
    for s in sites:
        c, k = s.num_codes, s.spec.k
        base = rng.integers(0, c, n)
        # distinct ids per token; the first slot follows the state half of the time (a real signal)
        base = np.where(rng.random(n) < 0.5, (labels.clip(0) * 37) % c, base)
        codes[s.name] = (base[:, None] + np.arange(k)[None, :] * (c // k)) % c
    return ShardArrays(
        tokens, doc_offsets, text, doc_chars, spans, {"state": labels} if states else {}, codes
    )


def build_store(path: Path, n_tokens: int, sites: list[Site], seed: int = 0) -> Store:
    rng = np.random.default_rng(seed)
    per_shard = 7813  # docs: ~1M tokens per shard
    n_docs = max(1, n_tokens // 128)
    plan_sites = [site_entry(s) for s in sites]
    plan = {
        "checkpoint": {"path": "", "sha256": None},
        "corpus": {"kind": "synthetic"},
        "shard_tokens": per_shard * 128,
        "max_tokens": None,
        "sites": plan_sites,
        "labels": ["state"],
        "token_strings": TokFSM.token_strings(),
    }
    w = StoreWriter.open(path, plan, overwrite=True)
    index = 0
    for lo in range(0, n_docs, per_shard):
        arrays = _synthetic_shard(rng, min(per_shard, n_docs - lo), sites, True)
        with w.claim(index):
            w.write_shard(index, arrays)
        index += 1
    w.finalize(index)
    return Store(path)


def _min_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _bincount_all(store: Store, site: str) -> None:
    c = store.sites[site].num_codes
    for s in range(store.num_shards):
        np.bincount(np.asarray(store.codes(s, site)).reshape(-1), minlength=c)


def bench_scoring(tmp: Path, n_tokens: int, repeats: int) -> dict:
    site = Site("0.mlp", CodebookSpec(0, "mlp", 1, 64, 16384, 8), 0)
    t = time.perf_counter()
    store = build_store(tmp / "scoring", n_tokens, [site])
    build_s = time.perf_counter() - t
    disk = sum(f.stat().st_size for f in (tmp / "scoring").rglob("*") if f.is_file())

    def run() -> None:
        masks = regex_feature(store, "42|7[0-3]", "all")
        score_mask(store, "0.mlp", masks)

    base = _min_time(lambda: _bincount_all(store, "0.mlp"), repeats)
    took = _min_time(run, repeats)
    return {
        "tokens": store.num_tokens,
        "sites": 1,
        "k": 8,
        "C": 16384,
        "store_bytes": disk,
        "build_s": round(build_s, 2),
        "regex_plus_scoring_s": round(took, 3),
        "bincount_baseline_s": round(base, 3),
        "ratio_vs_baseline": round(took / base, 2),
        "floor_s": SCORING_FLOOR_S,
        "meets_floor": took <= SCORING_FLOOR_S,
    }


def bench_labels(tmp: Path, n_tokens: int, repeats: int) -> list[dict]:
    from cbtool.analysis.search import best_per_row

    out = []
    shapes = {
        "1 site, k=8, C=16384": [Site("0.mlp", CodebookSpec(0, "mlp", 1, 64, 16384, 8), 0)],
        "20 sites, k=1, C=1000": [
            Site(f"{i}.mlp", CodebookSpec(i, "mlp", 1, 64, 1000, 1), 0) for i in range(20)
        ],
    }
    for i, (name, sites) in enumerate(shapes.items()):
        store = build_store(tmp / f"labels{i}", n_tokens, sites, seed=1)

        def run(store=store, sites=sites) -> int:
            feat = label_feature(store, "state")
            for s in sites:
                sc = score_labels(store, s.name, feat.index, len(feat.values))
                best_per_row(sc.f1, sc.precision, sc.fires)
            return len(feat.values)

        values = run()
        base = _min_time(
            lambda store=store, sites=sites: [_bincount_all(store, s.name) for s in sites], repeats
        )
        took = _min_time(run, repeats)
        out.append(
            {
                "shape": name,
                "tokens": store.num_tokens,
                "label_values": values,
                "label_search_s": round(took, 3),
                "bincount_baseline_s": round(base, 3),
                "ratio_vs_baseline": round(took / base, 2),
                "floor_s": LABEL_FLOOR_S,
                "meets_floor": took <= LABEL_FLOOR_S,
            }
        )
    return out


def _default_checkpoint(tmp: Path, source: Path | None) -> Path:
    if source is not None and (source / "cbtool.json").is_file():
        dst = tmp / "ckpt"
        shutil.copytree(source, dst)
        return dst
    torch.manual_seed(0)
    base = Transformer(ModelConfig())
    model = CodebookModel.build(
        base,
        BuiltinLocator(base),
        [(i, c) for i in range(4) for c in ("attn_heads", "mlp")],
        num_codes=1000,
        k=1,
    )
    task = TokFSM()
    meta = {
        "model": {"kind": "builtin", "config": base.config.to_dict()},
        "tokenizer": {"kind": "tokfsm", "vocab_size": 11},
        "task": task.spec.to_dict(),
    }
    save_checkpoint(tmp / "ckpt", model, meta)
    return tmp / "ckpt"


@torch.inference_mode()
def bench_embed(tmp: Path, num_seqs: int, batch: int, repeats: int, checkpoint: Path | None) -> dict:
    ckpt = load_checkpoint(_default_checkpoint(tmp, checkpoint))
    model = ckpt.model
    sites = list(model.sites)
    docs = list(fsm_documents(ckpt.task, num_seqs, HELD_OUT_SEED))
    x = torch.from_numpy(np.stack([d.tokens for d in docs]))
    n_tokens = x.numel()
    normed = {
        s.key: F.normalize(model.codebook(s).codes.float(), dim=-1).transpose(1, 2).contiguous()
        for s in model.specs
    }
    xs = {s.key: F.normalize(torch.randn(s.groups, batch * x.shape[1], s.dim), dim=-1) for s in model.specs}

    def forward_plain() -> None:
        model.set_enabled(False)
        for b in x.split(batch):
            model(b)
        model.set_enabled(True)

    def matmuls() -> None:
        for b in x.split(batch):
            n = b.numel()
            for key, cn in normed.items():
                torch.bmm(xs[key][:, :n], cn)

    def embed() -> None:
        store = tmp / "embed-store"
        plan = {
            "checkpoint": {"path": "", "sha256": None},
            "corpus": {"kind": "bench"},
            "shard_tokens": 10**9,
            "max_tokens": None,
            "sites": [site_entry(model.sites[n]) for n in sites],
            "labels": ["state"],
            "token_strings": None,
        }
        w = StoreWriter.open(store, plan, overwrite=True)
        run_embed(
            ckpt,
            w,
            iter(fsm_documents(ckpt.task, num_seqs, HELD_OUT_SEED)),
            sites,
            10**9,
            None,
            batch,
            torch.device("cpu"),
        )

    times = {"forward": [], "matmul": [], "embed": []}
    for _ in range(repeats):  # interleaved
        for name, fn in (("forward", forward_plain), ("matmul", matmuls), ("embed", embed)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    fwd, mm, emb = (min(times[k]) for k in ("forward", "matmul", "embed"))
    ratio = (fwd + mm) / emb
    return {
        "tokens": n_tokens,
        "sites": len(sites),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "plain_forward_s": round(fwd, 3),
        "similarity_matmul_s": round(mm, 3),
        "embed_s": round(emb, 3),
        "embed_tokens_per_s": round(n_tokens / emb),
        "roofline_over_embed": round(ratio, 3),
        "floor": EMBED_FLOOR,
        "meets_floor": ratio >= EMBED_FLOOR,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks analysis", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10_000_000, help="Store size for the scoring benchmark.")
    ap.add_argument("--label-tokens", type=int, default=1_000_000)
    ap.add_argument("--embed-seqs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="Checkpoint for the embed benchmark (default: an untrained default-size model).",
    )
    ap.add_argument("--only", choices=("scoring", "labels", "embed"), action="append")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    parts = args.only or ["scoring", "labels", "embed"]
    tmp = Path(tempfile.mkdtemp(prefix="cbtool-bench-analysis-"))
    results: dict = {}
    try:
        if "scoring" in parts:
            results["scoring"] = bench_scoring(tmp, args.tokens, args.repeats)
            shutil.rmtree(tmp / "scoring", ignore_errors=True)
        if "labels" in parts:
            results["labels"] = bench_labels(tmp, args.label_tokens, args.repeats)
        if "embed" in parts:
            results["embed"] = bench_embed(tmp, args.embed_seqs, args.batch, args.repeats, args.checkpoint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for name, res in results.items():
            for row in res if isinstance(res, list) else [res]:
                print(f"[{name}] " + "  ".join(f"{k}={v}" for k, v in row.items()))
    ok = all(r["meets_floor"] for res in results.values() for r in (res if isinstance(res, list) else [res]))
    return 0 if ok else 1
