"""Codebook vs SAE at one site of one model, every figure from the real CLI (docs/results.md "Codebooks and SAEs").

  python -m benchmarks sae_side_by_side --checkpoint runs/smol/checkpoint --codes runs/smol/codes \\
      --sae runs/smol/sae-10mlp --sae-codes runs/smol/sae-codes --site 10.mlp

`--codes` is the checkpoint's store and `--sae-codes` the SAE's, both embedded on the same documents (for the
docs: the held-out speeches, `cbtool embed CK --split heldout` and `cbtool embed --sae SAE --base-model CK
--split heldout`). For each dictionary, restricted to `--site`:

* loss with the dictionary spliced in vs the base model: `cbtool eval CK --sites SITE` (only that site's codebook
  on) and `cbtool eval --sae SAE --base-model CK` (the same held-out blocks of the checkpoint's corpus), and the
  share of the loss that zeroing the site costs which each dictionary recovers;
* the concept codes of benchmarks/lm_claims.py (months, years, dollar amounts, quotation marks): `cbtool
  find-codes STORE --sites SITE --regex RE --min-count 10`, the best code by F1 with its precision and recall;
* dead codes: `cbtool dead-codes STORE --sites SITE` (never fired on the store's tokens);
* explain's census: `cbtool explain STORE --sites SITE` (share of live codes with a hypothesis of precision >= 0.8,
  and the firing mass they carry).

Prints a markdown table and, with `--out FILE.json`, every document the commands returned.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.lm_claims import CONCEPTS, cli

SIDE_CONCEPTS = ("months", "years", "dollar amounts", "quotation marks")


def measure(store: Path, site: str, min_count: int) -> dict:
    found = {}
    for name in SIDE_CONCEPTS:
        doc = cli("find-codes", store, "--regex", CONCEPTS[name], "--sites", site, "--min-count", min_count,
                  "--top", 0, "--json")
        rows = doc["rows"]
        found[name] = ({k: rows[0][k] for k in ("code", "precision", "recall", "fires")} if rows else None)
    dead = next(s for s in cli("dead-codes", store, "--sites", site, "--json")["sites"] if s["site"] == site)
    census = cli("explain", store, "--sites", site, "--json")["census"][site]
    return {"concepts": found, "dead": {k: dead[k] for k in ("codes", "dead", "dead_frac", "rare")},
            "census": census}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks sae_side_by_side", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, type=Path)
    ap.add_argument("--codes", required=True, type=Path, help="the checkpoint's store")
    ap.add_argument("--sae", required=True, type=Path, help="the SAE folder (SAELens or sparsify)")
    ap.add_argument("--sae-codes", required=True, type=Path, help="the SAE's store, on the same documents")
    ap.add_argument("--site", default="10.mlp")
    ap.add_argument("--min-count", type=int, default=10)
    ap.add_argument("--blocks", type=int, default=256, help="held-out blocks for the losses")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cb_tokens = cli("info", args.codes, "--json").get("tokens")
    sae_tokens = cli("info", args.sae_codes, "--json").get("tokens")
    if cb_tokens != sae_tokens:
        raise SystemExit(f"the two stores hold different tokens ({cb_tokens} vs {sae_tokens}): embed both on "
                         f"the same documents")
    res = {
        "site": args.site, "tokens": cb_tokens,
        "codebook": {"loss": cli("eval", args.checkpoint, "--sites", args.site, "--blocks", args.blocks, "--json"),
                     **measure(args.codes, args.site, args.min_count)},
        "sae": {"loss": cli("eval", "--sae", args.sae, "--base-model", args.checkpoint, "--site", args.site,
                            "--blocks", args.blocks, "--json"),
                **measure(args.sae_codes, args.site, args.min_count)},
    }
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(table(res))
    print(f"\n{res['tokens']:,} tokens per store; {res['seconds']:.0f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


def table(res: dict) -> str:
    cb, sae = res["codebook"], res["sae"]
    lines = [f"| at {res['site']} | codebook | SAE |", "|---|---|---|"]

    def row(label: str, f) -> None:
        lines.append(f"| {label} | {f(cb)} | {f(sae)} |")

    def loss(d: dict) -> str:
        e = d["loss"]
        on = e["on"]["loss"] if "on" in e else e["spliced"]["loss"]
        return f"{on:.4f} vs {e['bypassed']['loss']:.4f} ({on - e['bypassed']['loss']:+.4f})"

    row("held-out loss spliced vs bypassed (nats/token)", loss)
    zero, off = sae["loss"]["ablated"]["loss"], sae["loss"]["bypassed"]["loss"]  # same base, same tokens

    def recovered(d: dict) -> str:
        e = d["loss"]
        on = e["on"]["loss"] if "on" in e else e["spliced"]["loss"]
        return f"{(zero - on) / (zero - off):.3f}"

    row(f"loss recovered vs the site zeroed ({zero:.4f})", recovered)
    lines.append(f"| fraction of variance unexplained | - | {sae['loss']['fvu']:.3f} |")
    for name in SIDE_CONCEPTS:
        def concept(d: dict, name: str = name) -> str:
            r = d["concepts"][name]
            return "none" if r is None else f"`{r['code']}` P {r['precision']:.2f} / R {r['recall']:.2f}"
        row(f"{name} (best code by F1)", concept)
    row("dead codes (never fired)", lambda d: f"{d['dead']['dead']:,} of {d['dead']['codes']:,} "
        f"({d['dead']['dead_frac']:.1%})")
    row("explain: live codes explained (precision >= 0.8)", lambda d: f"{d['census']['explained_share']:.1%} of "
        f"{d['census']['live_codes']:,}")
    row("explain: firing mass explained", lambda d: f"{d['census']['firing_mass_share']:.1%}")
    return "\n".join(lines)
