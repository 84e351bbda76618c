"""Language-model claims: concept codes (find-codes per concept) and topic steering (find-codes | intervene).

Both tables are printed from the real CLI (`python -m cbtool ... --json`), so every row is reproducible
with the command shown beside it:

  python -m benchmarks lm_claims concepts CHECKPOINT STORE      # one row per concept regex
  python -m benchmarks lm_claims steering CHECKPOINT STORE      # one row per topic, steered vs twin

concepts: for each concept, `find-codes --regex RE --min-count M` on the held-out store, its best code by F1
(`--sort f1`, find-codes' default) and by precision among codes with recall >= 0.3 when that exists, with a
`show-code` context line. steering: for each topic, the codes are the first `--pick` rows of
`find-codes --regex RE --min-count M --jsonl` (no hand-picking), then
`intervene --codes-from - --pick N --regex RE` from neutral prompts, `--samples` samples per prompt set, each
beside its unsteered twin; the table gives both rates with 95% Wilson intervals. `--per-site` passes
`intervene --per-site` (the best --pick codes of every site among find-codes' rows); `--topics shakespeare`
uses topics and neutral prompts for the built-in text model's corpus.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"

# concept -> regex over the document text (case-sensitive; \b word boundaries)
CONCEPTS: dict[str, str] = {
    "months": rf"\b({MONTHS})\b",
    "years": r"\b(1[789][0-9][0-9]|20[0-9][0-9])\b",
    "digits": r"[0-9]",
    "dollar amounts": r"\$",
    "negative emotion": r"\b([Ff]ear|[Ff]ears|afraid|anger|angry|sorrow|grief|hatred|despair|suffering|misery|"
                        r"terror|cruel|cruelty|tragedy|tragic|sad|sadness|anxiety|anxious|distress|shame|bitter|"
                        r"bitterness|pain|painful|grievous)\b",
    "countries": r"\b(Mexico|Spain|France|England|Britain|China|Japan|Russia|Germany|Cuba|Canada|Italy|Austria|"
                 r"Portugal|Brazil|Chile|Peru|Colombia|Venezuela|Turkey|Greece|Egypt|Iraq|Iran|Korea|Vietnam)\b",
    "quotation marks": r"[\"“”]",
}

# topic -> regex whose rate in generated text measures the topic (case-insensitive via (?i))
TOPICS: dict[str, str] = {
    "war": r"(?i)\b(war|wars|army|armies|troops|soldiers|military|battle|enemy|enemies)\b",
    "money": r"(?i)\b(tax|taxes|taxation|revenue|revenues|tariff|tariffs|debt|dollars|treasury|budget)\b",
    "education": r"(?i)\b(school|schools|education|educational|students|teachers|college|colleges)\b",
    "health": r"(?i)\b(health|medical|medicine|disease|diseases|hospital|hospitals|doctors|patients)\b",
    "farming": r"(?i)\b(farm|farms|farmer|farmers|agriculture|agricultural|crops|crop|harvest|wheat|cotton)\b",
    "the sea": r"(?i)\b(navy|naval|ships|ship|vessels|vessel|seas|ocean|harbor|harbors|fleet)\b",
}
# the built-in text model's corpus (Shakespeare): its own topics and neutral prompts (`--topics shakespeare`)
PLAY_TOPICS: dict[str, str] = {
    "love": r"(?i)\b(love|loves|loved|lover|lovers|loving|kiss|kisses|heart|hearts)\b",
    "death": r"(?i)\b(death|dead|die|dies|died|grave|graves|kill|killed|slain|murder|murdered)\b",
    "royalty": r"(?i)\b(king|kings|queen|crown|throne|majesty|royal|prince|princes)\b",
    "war": r"(?i)\b(war|wars|battle|sword|swords|soldier|soldiers|army|arms|fight|enemy)\b",
    "heaven": r"(?i)\b(heaven|heavens|god|gods|angel|angels|soul|souls|pray|prayers)\b",
    "night": r"(?i)\b(night|nights|moon|stars|dark|darkness|sleep|dream|dreams)\b",
}
PLAY_PROMPTS = ["The", "And", "I", "What", "Come,", "Now", "My lord,", "Enter"]
PROMPTS = ["The", "In the year ahead,", "I want to speak tonight about", "Our country", "We must",
           "It is my duty to report that", "Let me tell you", "This is"]


def cli(*args: object) -> dict:
    """Run `python -m cbtool ARGS --json`; returns the parsed document."""
    cmd = [sys.executable, "-m", "cbtool", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout)


def _context(store: Path, code: str) -> str:
    doc = cli("show-code", store, code, "--examples", "1", "--context", "6", "--json")
    if not doc.get("examples"):
        return ""
    ex = doc["examples"][0]
    return " ".join(f"{ex['left']}[{ex['token']}]{ex['right']}".split())


def concepts(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, regex in CONCEPTS.items():
        t0 = time.perf_counter()
        doc = cli("find-codes", args.store, "--regex", regex, "--min-count", args.min_count, "--top", 0, "--json")
        cand = doc["rows"]
        if not cand:
            rows.append({"concept": name, "regex": regex, "code": None})
            continue
        best = cand[0]
        broad = [r for r in cand if r["recall"] >= 0.3]
        broad_best = max(broad, key=lambda r: r["precision"]) if broad else None
        row = {"concept": name, "regex": regex, "feature_tokens": doc.get("feature_tokens"),
               "code": best["code"], "precision": best["precision"], "recall": best["recall"],
               "fires": best["fires"], "context": _context(args.store, best["code"]),
               "best_at_recall_0.3": None if broad_best is None else
               {k: broad_best[k] for k in ("code", "precision", "recall", "fires")},
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{name:<18} {row['code']:<14} P {row['precision']:.2f} R {row['recall']:.2f} "
              f"fires {row['fires']:<6} | {row['context'][:90]}", flush=True)
    return rows


def steering(args: argparse.Namespace) -> list[dict]:
    prompts = Path(args.out).with_suffix(".prompts.txt")
    topics, neutral = (PLAY_TOPICS, PLAY_PROMPTS) if args.topics == "shakespeare" else (TOPICS, PROMPTS)
    prompts.write_text("\n".join(neutral) + "\n", encoding="utf-8")
    per_prompt = max(1, args.samples // len(neutral))
    rows = []
    for name, regex in topics.items():
        t0 = time.perf_counter()
        found = subprocess.run([sys.executable, "-m", "cbtool", "find-codes", str(args.store), "--regex", regex,
                                "--min-count", str(args.min_count), "--jsonl"], capture_output=True, text=True)
        if found.returncode != 0 or not found.stdout.strip():
            rows.append({"topic": name, "regex": regex, "codes": None})
            continue
        cmd = [sys.executable, "-m", "cbtool", "intervene", str(args.checkpoint), "--codes-from", "-",
               "--pick", str(args.pick), *(["--per-site"] if args.per_site else []), "--mode", args.mode,
               "--strength", str(args.strength),
               "--prompts", str(prompts), "-n", str(per_prompt), "--max-new-tokens", str(args.max_new_tokens),
               "--regex", regex, "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--json"]
        res = subprocess.run(cmd, input=found.stdout, capture_output=True, text=True)
        if res.returncode not in (0, 1):
            raise SystemExit(f"intervene failed: {res.stderr.strip()[-500:]}")
        doc = json.loads(res.stdout)
        row = {"topic": name, "regex": regex, "codes": [iv["code"] for iv in doc["interventions"]],
               "samples": doc["samples"], "steered": doc["steered"], "baseline": doc["baseline"],
               "gain": doc["gain"], "example": doc["examples"][0]["steered"] if doc["examples"] else "",
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        s, b = row["steered"], row["baseline"]
        print(f"{name:<10} {' '.join(row['codes']):<30} steered {s['rate']:.2f} [{s['ci95'][0]:.2f}, "
              f"{s['ci95'][1]:.2f}]  baseline {b['rate']:.2f} [{b['ci95'][0]:.2f}, {b['ci95'][1]:.2f}]  "
              f"gain {row['gain']:+.2f}  ({row['seconds']:.0f} s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks lm_claims", description=__doc__.splitlines()[0])
    ap.add_argument("table", choices=("concepts", "steering"))
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("store", type=Path, help="a code store of held-out documents (embed --split heldout)")
    ap.add_argument("--min-count", type=int, default=10, help="find-codes --min-count")
    ap.add_argument("--samples", type=int, default=200, help="steering: samples per topic (over all prompts)")
    ap.add_argument("--pick", type=int, default=1, help="steering: codes taken from find-codes per topic")
    ap.add_argument("--topics", choices=("sotu", "shakespeare"), default="sotu",
                    help="steering: topic regexes and neutral prompts for this corpus")
    ap.add_argument("--per-site", action="store_true", help="steering: the best --pick codes of every site")
    ap.add_argument("--mode", default="force")
    ap.add_argument("--strength", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("lm_claims.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = concepts(args) if args.table == "concepts" else steering(args)
    doc = {"table": args.table, "checkpoint": str(args.checkpoint), "store": str(args.store),
           "options": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
           "wall_seconds": round(time.perf_counter() - t0, 1)}
    args.out.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    print(f"wrote {args.out} ({doc['wall_seconds']:.0f} s)")
    return 0
