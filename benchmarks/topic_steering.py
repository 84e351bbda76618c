"""Topic steering as the paper runs it: per topic, one head's whole code set of context codes forced for 200 tokens.

For a text checkpoint with per-head codebooks (`cbtool train --preset context`), and topics given as
'NAME: REGEX' lines (fixtures/topics/shakespeare.txt), every step is a cbtool command run as a subprocess:

1. `cbtool eval --context-use TOPICS`: does the model read topic context at all (codebooks bypassed and on)?
2. `cbtool embed --split train`: the store codes are chosen from (training blocks only; never the held-out ones).
3. per topic: `cbtool find-codes --regex RE --window W --sort precision --min-count M --top 0 --jsonl` (context
   codes: they fire on the W tokens after a topic word), then `cbtool intervene --codes-from - --pick k
   --one-site` (the best head's k best codes replace all k of its slots, at every position) on the prompts, each
   sample beside its unsteered twin, `--max-new-tokens 200 --regex RE --fluency`.

Prints the table (steered rate, twin rate, gain with 95% intervals, fluency of steered samples and twins under
the unsteered model) and writes every command's JSON to --out. Tune --window/--min-count with the tuning prompts
and --seed 10000 (fixtures/topics/shakespeare-prompts-tuning.txt), report with the others and seed 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLOOR_GAIN, FLOOR_TOPICS = 0.30, 4


def cbtool(*args: object, stdin: str | None = None) -> str:
    cmd = [sys.executable, "-m", "cbtool", *map(str, args)]
    res = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
    return res.stdout


def read_topics(path: Path) -> dict[str, str]:
    from cbtool.analysis.context_use import read_topics as parse

    return parse(str(path))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks topic_steering", description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="run directory holding checkpoint/ (cbtool train --run)")
    p.add_argument("--topics", type=Path, default=ROOT / "fixtures/topics/shakespeare.txt")
    p.add_argument("--prompts", type=Path, default=ROOT / "fixtures/topics/shakespeare-prompts.txt")
    p.add_argument("--window", type=int, default=64, help="find-codes --window")
    p.add_argument("--min-count", type=int, default=100, help="find-codes --min-count")
    p.add_argument("--pick", type=int, default=None, help="codes forced per head (default: the site's k)")
    p.add_argument("--best-sites", type=int, default=1, help="heads per topic (1: --one-site)")
    p.add_argument("--samples", type=int, default=25, help="samples per prompt (8 prompts x 25 = 200 per topic)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-window", type=int, default=100)
    p.add_argument("--skip-context-use", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="JSON with every command's result")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    ckpt = a.run / "checkpoint"
    topics = read_topics(a.topics)
    result: dict[str, Any] = {"checkpoint": str(ckpt), "topics": topics, "prompts": str(a.prompts),
                              "settings": {k: str(v) for k, v in vars(a).items()}}
    if not a.skip_context_use:
        ev = json.loads(cbtool("eval", ckpt, "--context-use", a.topics, "--context-window", a.context_window,
                               "--blocks", 64, "--json", "--device", a.device))
        result["context_use"] = ev["context_use"]
        result["loss"] = {"on": ev["on"]["loss"], "bypassed": ev["bypassed"]["loss"]}
        print(f"context use (window {a.context_window}): mean gain {ev['context_use']['bypassed']['mean_gain']:+.3f} "
              f"nats bypassed, {ev['context_use']['on']['mean_gain']:+.3f} with codebooks on; "
              + ", ".join(f"{n} {r['gain']:+.2f}" for n, r in ev["context_use"]["bypassed"]["topics"].items()
                          if r["gain"] is not None), flush=True)
    store = a.run / "codes-train"
    if not (store / "manifest.json").is_file():
        cbtool("embed", ckpt, "--split", "train", "--out", store, "--device", a.device, "--overwrite")
    rows = []
    for name, regex in topics.items():
        found = cbtool("find-codes", store, "--regex", regex, "--window", a.window, "--sort", "precision",
                       "--min-count", a.min_count, "--top", 0, "--examples", 0, "--jsonl")
        pick = a.pick
        if pick is None:
            meta = json.loads((ckpt / "cbtool.json").read_text())
            pick = meta["training"]["config"]["k"]
        steer = json.loads(cbtool("intervene", ckpt, "--codes-from", "-", "--pick", pick, "--best-sites",
                                  a.best_sites, "--prompts", a.prompts, "-n", a.samples, "--max-new-tokens",
                                  a.max_new_tokens, "--regex", regex, "--fluency", "--seed", a.seed, "--json",
                                  "--device", a.device, stdin=found))
        codes = [iv["code"] for iv in steer["interventions"]]
        found_rows = [json.loads(line) for line in found.splitlines()]
        precision = {r["code"]: r["precision"] for r in found_rows}
        row = {"topic": name, "codes": codes, "mean_precision": sum(precision[c] for c in codes) / len(codes),
               "steered": steer["steered"], "baseline": steer["baseline"], "gain": steer["gain"],
               "fluency": steer["fluency"], "samples": steer["samples"], "examples": steer["examples"][:2]}
        rows.append(row)
        print(f"{name}: {row['steered']['rate']:.3f} steered vs {row['baseline']['rate']:.3f} twins, gain "
              f"{row['gain']:+.3f}", flush=True)
    result["rows"] = rows
    result["seconds"] = time.perf_counter() - t0
    print()
    print("| topic | head (codes) | mean precision | steered (95% CI) | twins (95% CI) | gain | fluency steered | "
          "fluency twins |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, b = r["steered"], r["baseline"]
        sites = sorted({c.rpartition(":")[0] for c in r["codes"]})
        print(f"| {r['topic']} | {', '.join(sites)} ({len(r['codes'])}) | {r['mean_precision']:.2f} | "
              f"{s['rate']:.3f} ({s['ci95'][0]:.3f}-{s['ci95'][1]:.3f}) | {b['rate']:.3f} "
              f"({b['ci95'][0]:.3f}-{b['ci95'][1]:.3f}) | {r['gain']:+.3f} | {r['fluency']['steered']['mean']:.2f} | "
              f"{r['fluency']['baseline']['mean']:.2f} |")
    wins = sum(r["gain"] >= FLOOR_GAIN for r in rows)
    print(f"\n{wins} of {len(rows)} topics gain >= +{FLOOR_GAIN:.2f} (floor: {FLOOR_TOPICS}); "
          f"{result['seconds']:.0f} s")
    result["topics_at_floor"] = wins
    if a.out is not None:
        a.out.write_text(json.dumps(result, indent=1))
    return 0
