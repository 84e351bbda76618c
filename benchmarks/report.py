"""Report: `cbtool report` on a store of the default shape (204,800 tokens, 20 sites, C=1000, k=1) in <= 10 s.

The store is synthetic by default (benchmarks.analysis.build_store: TokFSM-shaped documents with state labels,
the 4-layer default's 20 sites, random codes with a state signal, so every code fires and gets a card: the
largest report this shape can give). `--store DIR` measures a real store instead (e.g. `cbtool embed
--num-seqs 1600` of the default checkpoint), with its checkpoint when the manifest names one.

Timed: `report.build` + `report.write_report` (what the command does after parsing), min over repeats, as
wall time (the floor) and as this process's CPU time (which a loaded machine inflates less).
Baseline in the same run: one pass over every site's stored ids (a bincount per site and shard), the least
any per-site statistic costs. Also printed: the HTML size and the number of code cards (the size limits are
`cbtool.report.build.Limits`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.analysis import _bincount_all, _min_time, build_store
from cbtool.formats.checkpoint import META
from cbtool.formats.store import Store
from cbtool.model.sites import CodebookSpec, Site
from cbtool.report.build import Limits, build, write_report

FLOOR_S = 10.0


def default_sites(layers: int = 4, heads: int = 4, d_model: int = 128, num_codes: int = 1000) -> list[Site]:
    """The sites of `cbtool train`'s default: every attention head and every MLP of a 4-layer model."""
    sites = []
    for layer in range(layers):
        spec = CodebookSpec(layer, "attn_heads", heads, d_model // heads, num_codes, 1)
        sites += [Site(f"{layer}.attn.h{h}", spec, h) for h in range(heads)]
        sites.append(Site(f"{layer}.mlp", CodebookSpec(layer, "mlp", 1, d_model, num_codes, 1), 0))
    return sites


def measure(tmp: Path, args: argparse.Namespace) -> dict:
    if args.store is None:
        t = time.perf_counter()
        store = build_store(tmp / "codes", args.tokens, default_sites())
        build_s = round(time.perf_counter() - t, 2)
        checkpoint = None
    else:
        store, build_s = Store(args.store), None
        ck = store.checkpoint_path
        checkpoint = ck if str(ck) not in ("", ".") and (ck / META).is_file() else None
    out = tmp / "report.html"
    limits = Limits()
    sizes: list[int] = []
    cards: list[int] = []
    cpu: list[float] = []

    def run() -> None:
        c0 = time.process_time()
        data = build(checkpoint, Store(store.path), [], limits)
        sizes.append(write_report(data, out))
        cpu.append(time.process_time() - c0)
        cards.append(len(data.get("codes") or []))

    took = _min_time(run, args.repeats)
    base = _min_time(lambda: [_bincount_all(store, s) for s in store.sites], args.repeats)
    if args.keep is not None:
        shutil.copyfile(out, args.keep)
    return {
        "store": "synthetic" if args.store is None else str(args.store),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "tokens": store.num_tokens, "sites": len(store.sites), "build_store_s": build_s,
        "report_s": round(took, 2), "report_cpu_s": round(min(cpu), 2), "ids_pass_baseline_s": round(base, 3),
        "ratio_vs_baseline": round(took / base, 1), "html_mib": round(sizes[-1] / 2**20, 2),
        "code_cards": cards[-1], "limits": limits.__dict__, "floor_s": FLOOR_S, "meets_floor": took <= FLOOR_S,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks report", description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=204_800, help="Synthetic store size (default: 1600 sequences).")
    ap.add_argument("--store", type=Path, default=None, help="Measure this store instead of a synthetic one.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="Also copy the report to this file.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cbtool-bench-report-") as tmp:
        result = measure(Path(tmp), args)
    print(json.dumps(result, indent=2) if args.json else "\n".join(f"{k:>20}: {v}" for k, v in result.items()))
    return 0 if result["meets_floor"] else 1
