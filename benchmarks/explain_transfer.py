"""Explain transfer: do the explanations fit on one store hold on other documents? (`cbtool explain` then find-codes)

`cbtool explain` fits each code's hypothesis and scores it on the same store. This check takes the rows of
`cbtool explain FIT --json` (fit on one set of documents), samples `--per-site` explained rows (precision >=
`--min-precision`) of each site, and scores each row's own find-codes query on a second store OTHER of the same
checkpoint (other documents): the share of the sampled codes that still fire on OTHER (>= `--min-count` times)
and keep precision >= `--min-precision` there, and their median precision and recall on both stores.

    cbtool explain FIT --sites '*.mlp' --json > fit.json
    python -m benchmarks explain_transfer fit.json OTHER --per-site 200
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import cbtool


def transfer(rows: list[dict], other: cbtool.Store, per_site: int, min_precision: float, min_count: int,
             seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for site in sorted({r["site"] for r in rows}):
        explained = [r for r in rows if r["site"] == site and r["query"] is not None
                     and r["precision"] >= min_precision]
        pick = [explained[i] for i in sorted(rng.choice(len(explained), min(per_site, len(explained)),
                                                       replace=False))] if explained else []
        live, held, prec, rec, fit_prec, fit_rec = 0, 0, [], [], [], []
        for r in pick:
            doc = cbtool.find_codes(other, sites=site, top=0, examples=0, **r["query"])
            found = {x["code"]: x for x in doc["rows"]}.get(r["code"])
            if found is None or found["fires"] < min_count:
                continue
            live += 1
            held += found["precision"] >= min_precision
            prec.append(found["precision"])
            rec.append(found["recall"])
            fit_prec.append(r["precision"])
            fit_rec.append(r["recall"])
        out[site] = {
            "explained_on_fit": len(explained), "sampled": len(pick), "live_on_other": live,
            "still_explained": held, "still_explained_share": held / live if live else None,
            "median_precision_fit": float(np.median(fit_prec)) if fit_prec else None,
            "median_precision_other": float(np.median(prec)) if prec else None,
            "median_recall_fit": float(np.median(fit_rec)) if fit_rec else None,
            "median_recall_other": float(np.median(rec)) if rec else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks explain_transfer", description=__doc__.splitlines()[0])
    ap.add_argument("fit_json", type=Path, help="`cbtool explain FIT --json` output")
    ap.add_argument("other", type=Path, help="a code store of the same checkpoint over other documents")
    ap.add_argument("--per-site", type=int, default=200)
    ap.add_argument("--min-precision", type=float, default=0.8)
    ap.add_argument("--min-count", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = json.loads(args.fit_json.read_text())["rows"]
    res = transfer(rows, cbtool.open_store(args.other), args.per_site, args.min_precision, args.min_count, args.seed)
    print(json.dumps(res, indent=2))
    return 0
