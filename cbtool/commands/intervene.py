# ruff: noqa: B008  (typer declares options as call defaults)
"""`cbtool intervene`: batch-steered generation beside an unsteered baseline; `--fsm-eval` runs the
paper's TokFSM state-steering experiment."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from cbtool import plots
from cbtool.checkpoint import Checkpoint, load_checkpoint
from cbtool.commands.common import (
    DEVICE_HELP,
    RUN_OPTION_HELP,
    default_checkpoint,
    emit_json,
    emit_jsonl,
    err,
    out,
)
from cbtool.errors import CheckFailed, UserError
from cbtool.plots import check_plot_path
from cbtool.steering import (
    MODES,
    POSITIONS,
    SampleJob,
    decode_tokens,
    encode_prompt,
    generate_with_twins,
    parse_interventions,
    wilson_interval,
)
from cbtool.train import resolve_device

SPEC_KEYS = {"prompt", "codes", "mode", "seed", "strength", "samples"}


def _read_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {getattr(e, 'strerror', None) or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} is empty")
    return prompts


def _read_spec(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """JSONL rows -> (line number, row), each checked; errors name the row (line) number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read spec file {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} row {no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        unknown = set(row) - SPEC_KEYS
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
                            f"allowed: {', '.join(sorted(SPEC_KEYS))}")
        if not isinstance(row.get("prompt"), str):
            raise UserError(f"{where}: 'prompt' must be a string")
        codes = row.get("codes", [])
        if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
            raise UserError(f"{where}: 'codes' must be a list of SITE:CODE strings")
        if "mode" in row and row["mode"] not in MODES:
            raise UserError(f"{where}: 'mode' must be one of {', '.join(MODES)}")
        for key in ("seed", "samples"):
            if key in row and (not isinstance(row[key], int) or isinstance(row[key], bool) or row[key] < 0):
                raise UserError(f"{where}: {key!r} must be a non-negative integer")
        if row.get("samples") == 0:
            raise UserError(f"{where}: 'samples' must be >= 1")
        strength = row.get("strength", 1.0)
        if not isinstance(strength, int | float) or isinstance(strength, bool):
            raise UserError(f"{where}: 'strength' must be a number")
        rows.append((no, row))
    if not rows:
        raise UserError(f"spec file {path} has no rows")
    return rows


def _jobs(ckpt: Checkpoint, args: dict[str, Any]) -> tuple[list[SampleJob], list[dict[str, Any]]]:
    """Every sample to draw, and per sample what to report about it."""
    jobs: list[SampleJob] = []
    info: list[dict[str, Any]] = []
    model = ckpt.model
    if args["spec"] is not None:
        for i, (no, row) in enumerate(_read_spec(args["spec"])):
            try:
                ivs = parse_interventions(row.get("codes", []), model, row.get("mode", args["mode"]),
                                          row.get("strength", args["strength"]))
                prompt = encode_prompt(ckpt, row["prompt"])
            except UserError as e:
                raise UserError(f"{args['spec']} row {no}: {e}") from None
            seed = row.get("seed", args["seed"] + i * 1_000_003)
            for j in range(row.get("samples", args["samples"])):
                jobs.append(SampleJob(prompt, ivs, seed + j))
                info.append({"row": no, "sample": j, "prompt": row["prompt"], "seed": seed + j,
                             "interventions": [iv.to_dict() for iv in ivs]})
        return jobs, info
    ivs = parse_interventions(args["codes"], model, args["mode"], args["strength"])
    if not ivs:
        raise UserError("no intervention: give --code SITE:CODE (repeatable) or a --spec file")
    if args["prompts_file"] is not None:
        prompts = _read_prompts(args["prompts_file"])
    else:
        prompts = args["prompt"] or [""]
    for i, text in enumerate(prompts):
        tokens = encode_prompt(ckpt, text)
        for j in range(args["samples"]):
            seed = args["seed"] + len(jobs)
            jobs.append(SampleJob(tokens, ivs, seed))
            info.append({"row": i + 1, "sample": j, "prompt": text, "seed": seed,
                         "interventions": [iv.to_dict() for iv in ivs]})
    return jobs, info


def _rate(hits: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(hits, n)
    return {"matches": hits, "samples": n, "rate": hits / n if n else None, "ci95": [lo, hi]}


def intervene(
    path: Path | None = typer.Argument(None, help="Checkpoint directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    code: list[str] = typer.Option([], "--code", "-c", help="SITE:CODE to steer with (repeatable)."),
    mode: str = typer.Option("force", "--mode", help="force (code joins the active set, replacing the "
                             "lowest-scoring one), add (its vector x --strength is added), ablate (removed, "
                             "next best takes its place)."),
    strength: float = typer.Option(1.0, "--strength", help="Multiplier of the code vector in add mode."),
    positions: str = typer.Option("all", "--positions", help="Steered tokens: all, prompt or generated."),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="Prompt text (repeatable; TokFSM: digits, "
                                     "e.g. 3719; default: the empty prompt, BOS only)."),
    prompts_file: Path | None = typer.Option(None, "--prompts", help="File with one prompt per line."),
    spec: Path | None = typer.Option(None, "--spec", help="JSONL, one row per prompt: {\"prompt\": ..., "
                                     "\"codes\": [...], \"mode\": ..., \"seed\": ...} "
                                     "(+ strength, samples)."),
    samples: int = typer.Option(4, "--samples", "-n",
                                help="Samples per prompt (each with an unsteered twin)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate per sample."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (0 = greedy)."),
    top_k: int | None = typer.Option(None, "--top-k", help="Sample only among the k likeliest tokens."),
    seed: int = typer.Option(0, "--seed", help="Sample i of a run uses seed SEED+i (spec rows: their seed)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Samples per batch (each batch also runs their "
                                   "twins)."),
    regex: str | None = typer.Option(None, "--regex", help="Success = generated text matches; report rates."),
    require_gain: float | None = typer.Option(None, "--require-gain", help="Exit 1 unless the steered rate "
                                              "is at least G above the baseline rate (needs --regex)."),
    fsm_eval: bool = typer.Option(False, "--fsm-eval",
                                  help="TokFSM state-steering experiment (paper sec. 4)."),
    pairs: int = typer.Option(500, "--pairs", help="--fsm-eval: (a, b) state pairs."),
    fsm_patch: str = typer.Option("state", "--fsm-patch", help="--fsm-eval: patch both tokens of state a "
                                  "(state) or only its last (last)."),
    code_seqs: int = typer.Option(256, "--code-seqs",
                                  help="--fsm-eval: fresh sequences for the code search."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON summary on stdout."),
    as_jsonl: bool = typer.Option(False, "--jsonl", help="One JSON row per sample on stdout."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw steered vs baseline rates with 95% intervals "
                                     "(--regex or --fsm-eval) to FILE.png or FILE.svg."),
) -> None:
    """Generate with codes forced on / added / ablated, beside an unsteered twin of every sample.

    Examples:
      cbtool intervene --code 3.mlp:412 --prompt 3719 -n 8
      cbtool intervene --code 3:412 --code 2.attn.h1:7 --mode ablate --prompts prompts.txt --jsonl
      cbtool intervene --code 3.mlp:412 -n 200 --regex "^41" --require-gain 0.2
      cbtool intervene --spec rows.jsonl --json
      cbtool intervene --fsm-eval
      cbtool intervene --code 3.mlp:412 -n 200 --regex "^41" --plot rates.png
    """
    plot = check_plot_path(plot)
    if plot is not None and regex is None and not fsm_eval:
        raise UserError("--plot draws success rates: give --regex (or use --fsm-eval)")
    if as_json and as_jsonl:
        raise UserError("--json and --jsonl are exclusive")
    dev = resolve_device(device)
    if fsm_eval:
        res = _fsm_eval(path, run, dev, pairs, fsm_patch, code_seqs, seed, temperature, as_json, code or prompt
                        or spec or prompts_file)
        if plot is not None:
            plots.fsm_steering_rates(res, plot)
            err.print(f"plot written to {plot}")
        return
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}: use {', '.join(MODES)}")
    if positions not in POSITIONS:
        raise UserError(f"unknown --positions {positions!r}: use {', '.join(POSITIONS)}")
    if sum(x is not None and x != [] for x in (prompt, prompts_file, spec)) > 1:
        raise UserError("give only one of --prompt, --prompts and --spec")
    if spec is not None and code:
        raise UserError("--code and --spec are exclusive: put each row's codes in the spec")
    for name, value, low in (("--samples", samples, 1), ("--max-new-tokens", max_new_tokens, 1),
                             ("--batch-size", batch_size, 1)):
        if value < low:
            raise UserError(f"{name} must be >= {low}, got {value}")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if require_gain is not None and regex is None:
        raise UserError("--require-gain needs --regex")
    pattern = None
    if regex is not None:
        try:
            pattern = re.compile(regex)
        except re.error as e:
            raise UserError(f"invalid --regex {regex!r}: {e}") from None
    ckpt = load_checkpoint(default_checkpoint(path, run), device=dev)
    args = {"spec": spec, "mode": mode, "strength": strength, "seed": seed, "samples": samples,
            "codes": code, "prompts_file": prompts_file, "prompt": prompt}
    jobs, info = _jobs(ckpt, args)
    t0 = time.perf_counter()
    steered, baseline = generate_with_twins(ckpt.model, jobs, max_new_tokens, temperature, top_k, positions,
                                            batch_size, dev)
    err.print(f"[dim]{len(jobs)} steered samples + {len(jobs)} twins on {dev}, batch {batch_size}: "
              f"{time.perf_counter() - t0:.2f} s[/dim]")
    rows = []
    for meta, s_ids, b_ids in zip(info, steered, baseline, strict=True):
        row = {**meta, "steered": decode_tokens(ckpt, s_ids), "baseline": decode_tokens(ckpt, b_ids)}
        if pattern is not None:
            row["steered_match"] = bool(pattern.search(row["steered"]))
            row["baseline_match"] = bool(pattern.search(row["baseline"]))
        rows.append(row)
    n = len(rows)
    summary: dict[str, Any] = {
        "checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256, "samples": n,
        "positions": positions, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
        "seed": seed, "changed": sum(r["steered"] != r["baseline"] for r in rows) / n,
    }
    if spec is None:
        summary["interventions"] = rows[0]["interventions"]
    if pattern is not None:
        s_hits = sum(r["steered_match"] for r in rows)
        b_hits = sum(r["baseline_match"] for r in rows)
        summary["regex"] = regex
        summary["steered"], summary["baseline"] = _rate(s_hits, n), _rate(b_hits, n)
        summary["gain"] = (s_hits - b_hits) / n
        if require_gain is not None:
            summary["require_gain"] = require_gain
    if as_jsonl:
        emit_jsonl(rows)
    elif as_json:
        emit_json("intervene", {**summary, "examples": rows[:5]})
    else:
        _show(rows, summary, pattern is not None)
    if plot is not None:
        plots.steering_rates(summary, plot)
        err.print(f"plot written to {plot}")
    if require_gain is not None and summary["gain"] < require_gain:
        s_rate, b_rate = summary["steered"]["rate"], summary["baseline"]["rate"]
        raise CheckFailed(f"steered rate {s_rate:.3f} is {summary['gain']:+.3f} over the baseline "
                          f"{b_rate:.3f}; --require-gain {require_gain} not met")


def _show(rows: list[dict[str, Any]], summary: dict[str, Any], with_regex: bool, limit: int = 50) -> None:
    table = Table(title=f"steered vs unsteered twin ({summary['samples']} samples, positions="
                        f"{summary['positions']}, T={summary['temperature']})")
    for col in ("row", "seed", "prompt", "interventions", "steered", "baseline"):
        table.add_column(col, overflow="fold")
    for r in rows[:limit]:
        ivs = " ".join(f"{iv['mode']} {iv['code']}" for iv in r["interventions"]) or "-"
        s, b = r["steered"], r["baseline"]
        if with_regex:
            s = f"{'✓' if r['steered_match'] else '✗'} {s}"
            b = f"{'✓' if r['baseline_match'] else '✗'} {b}"
        table.add_row(str(r["row"]), str(r["seed"]), r["prompt"] or "(empty)", ivs, s, b)
    out.print(table)
    if len(rows) > limit:
        out.print(f"... {len(rows) - limit} more samples (use --jsonl for all)")
    out.print(f"steered text differs from its twin in {summary['changed']:.1%} of samples")
    if with_regex:
        for label in ("steered", "baseline"):
            r = summary[label]
            out.print(f"{label:>8}: {r['matches']}/{r['samples']} match /{summary['regex']}/ = "
                      f"{r['rate']:.1%} (95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%})")
        out.print(f"    gain: {summary['gain']:+.1%}")


def _fsm_eval(path: Path | None, run: Path | None, dev, pairs: int, patch: str, code_seqs: int, seed: int,
              temperature: float, as_json: bool, extra: Any) -> dict[str, Any]:
    from cbtool.fsm_steering import fsm_state_steering

    if extra:
        raise UserError("--fsm-eval chooses its own codes and prompts: drop --code/--prompt/--prompts/--spec")
    if pairs < 1 or code_seqs < 1:
        raise UserError("--pairs and --code-seqs must be >= 1")
    if patch not in ("state", "last"):
        raise UserError(f"unknown --fsm-patch {patch!r}: use state or last")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    ckpt = load_checkpoint(default_checkpoint(path, run), device=dev)
    if ckpt.task is None or type(ckpt.task).__name__ != "TokFSM":
        raise UserError(f"{ckpt.path} was not trained on TokFSM: --fsm-eval needs a TokFSM checkpoint")
    err.print(f"[dim]state steering: {pairs} pairs, code search over {code_seqs} sequences, on {dev}[/dim]")
    res = fsm_state_steering(ckpt.model, ckpt.task, dev, pairs=pairs, seed=seed, num_seqs=code_seqs,
                             patch=patch, temperature=temperature)
    if as_json:
        emit_json("intervene-fsm", {"checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256, **res})
        return res
    table = Table(title=f"{ckpt.path}: force state b's best codes on inputs ending in state a "
                        f"({pairs} pairs, JSD in bits)")
    table.add_column("codes", no_wrap=True)
    for col in ("sites", "JSD b", "/none", "JSD a", "digit1 JSD b", "valid b", "valid a", "precision"):
        table.add_column(col, justify="right")
    for r in res["table"]:
        prec = "-" if r["mean_code_precision"] is None else f"{r['mean_code_precision']:.2f}"
        table.add_row(r["sites"], str(r["patched_sites"]), f"{r['jsd_to_b']:.3f}",
                      f"{r['jsd_to_b_vs_none']:.2f}", f"{r['jsd_to_a']:.3f}",
                      f"{r['first_digit_jsd_to_b']:.3f}", f"{r['valid_for_b']:.1%}",
                      f"{r['valid_for_a']:.1%}", prec)
    out.print(table)
    out.print("codes: whose codes were forced (state b's best code per site); JSD b / JSD a: between the "
              "model's next-state distribution (product of its two digit distributions) and the true one of "
              "b / a; /none: JSD b relative to the unpatched input; digit1: the first digit alone; valid b / "
              "valid a: share of sampled next states that are out-neighbours of b / a; precision: mean "
              "precision of the forced codes.")
    return res


def register(app: typer.Typer) -> None:
    app.command("intervene")(intervene)

