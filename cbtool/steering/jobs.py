"""Steered generation beside unsteered twins, as `cbtool intervene` runs it: prompts, spec files, jobs, rates.

The interventions and the batched sampling are in cbtool/steering/interventions.py; definitions in docs/definitions.md.
`steer` returns what `cbtool intervene --json` summarises, with every sample's row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cbtool.errors import UserError
from cbtool.formats.checkpoint import Checkpoint
from cbtool.model.refs import codes_from_results
from cbtool.steering.interventions import (
    MODES,
    POSITIONS,
    SampleJob,
    continuation_logprobs,
    generate_with_twins,
    parse_interventions,
)
from cbtool.tasks.tokfsm import TokFSM, valid_transitions
from cbtool.util import strict_json
from cbtool.util.files import read_stdin_text, read_text
from cbtool.util.limits import MAX_SAMPLES, MAX_SEQ_LEN, check_number
from cbtool.util.regexes import UserRegex
from cbtool.util.stats import wilson_interval

SPEC_KEYS = {"prompt", "codes", "mode", "seed", "strength", "samples"}


def read_prompts(path: Path) -> list[str]:
    text = read_text(path, "prompt file")
    prompts = [line.strip() for line in strict_json.lines(text) if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {path} is empty")
    return prompts


def _parse(model: Any, refs: Sequence[str], mode: str, strength: float) -> list[Any]:
    """Interventions for `model`: a CodebookModel's codes, or an SAE model's latents (its own parser)."""
    own = getattr(model, "parse_interventions", None)
    return own(refs, mode, strength) if own is not None else parse_interventions(refs, model, mode, strength)


def read_spec(path: Path, modes: Sequence[str] = MODES) -> list[tuple[int, dict[str, Any]]]:
    """JSONL rows -> (line number, row), each checked; errors name the row (line) number."""
    lines = strict_json.lines(read_text(path, "spec file"))
    rows = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} row {no}"
        row = strict_json.loads(line, where)
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
        if "mode" in row and row["mode"] not in modes:
            raise UserError(f"{where}: 'mode' must be one of {', '.join(modes)}")
        for key in ("seed", "samples"):
            if key in row and (not isinstance(row[key], int) or isinstance(row[key], bool) or row[key] < 0):
                raise UserError(f"{where}: {key!r} must be a non-negative integer")
        if not 1 <= row.get("samples", 1) <= MAX_SAMPLES:
            raise UserError(f"{where}: 'samples' must be in 1..{MAX_SAMPLES:,}")
        strength = row.get("strength", 1.0)
        if not isinstance(strength, int | float) or isinstance(strength, bool):
            raise UserError(f"{where}: 'strength' must be a number")
        rows.append((no, row))
    if sum(row.get("samples", 1) for _, row in rows) > MAX_SAMPLES:
        raise UserError(f"{path}: its rows ask for more than {MAX_SAMPLES:,} samples in all")
    if not rows:
        raise UserError(f"spec file {path} has no rows")
    return rows


def make_jobs(ckpt: Checkpoint, args: dict[str, Any]) -> tuple[list[SampleJob], list[dict[str, Any]]]:
    """Every sample to draw, and per sample what to report about it."""
    jobs: list[SampleJob] = []
    info: list[dict[str, Any]] = []
    model = ckpt.model
    if args["spec"] is not None:
        for i, (no, row) in enumerate(read_spec(args["spec"], getattr(model, "modes", MODES))):
            try:
                ivs = _parse(model, row.get("codes", []), row.get("mode", args["mode"]),
                             row.get("strength", args["strength"]))
                prompt = ckpt.task.encode(row["prompt"])
            except UserError as e:
                raise UserError(f"{args['spec']} row {no}: {e}") from None
            seed = row.get("seed", args["seed"] + i * 1_000_003)
            for j in range(row.get("samples", args["samples"])):
                jobs.append(SampleJob(prompt, ivs, seed + j))
                info.append({"row": no, "sample": j, "prompt": row["prompt"], "seed": seed + j,
                             "interventions": [iv.to_dict() for iv in ivs]})
        return jobs, info
    ivs = _parse(model, args["codes"], args["mode"], args["strength"])
    if not ivs:
        raise UserError("no intervention: give --code SITE:CODE (repeatable) or a --spec file")
    if args["prompts_file"] is not None:
        prompts = read_prompts(args["prompts_file"])
    else:
        prompts = args["prompt"] or [""]
    for i, text in enumerate(prompts):
        tokens = ckpt.task.encode(text)
        for j in range(args["samples"]):
            seed = args["seed"] + len(jobs)
            jobs.append(SampleJob(tokens, ivs, seed))
            info.append({"row": i + 1, "sample": j, "prompt": text, "seed": seed,
                         "interventions": [iv.to_dict() for iv in ivs]})
    return jobs, info


def rate(hits: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(hits, n)
    return {"matches": hits, "samples": n, "rate": hits / n if n else None, "ci95": [lo, hi]}


def check_options(*, codes: Sequence[str] = (), prompts: Sequence[str] = (), prompts_file: Path | None = None,
                  spec: Path | None = None, mode: str = "force", positions: str = "all", samples: int = 4,
                  max_new_tokens: int = 32, temperature: float = 1.0, top_k: int | None = None,
                  batch_size: int = 32, regex: str | None = None, modes: Sequence[str] = MODES) -> UserRegex | None:
    """Refuse malformed options (one UserError line) before a checkpoint is loaded; the compiled regex. `modes`:
    the modes the target takes (an SAE's latents: cbtool/steering/sae.py)."""
    if mode not in modes:
        raise UserError(f"unknown --mode {mode!r}: use {', '.join(modes)}")
    if positions not in POSITIONS:
        raise UserError(f"unknown --positions {positions!r}: use {', '.join(POSITIONS)}")
    if sum(bool(x) for x in (list(prompts), prompts_file, spec)) > 1:
        raise UserError("give only one of --prompt, --prompts and --spec")
    if spec is not None and codes:
        raise UserError("--code and --spec are exclusive: put each row's codes in the spec")
    for name, value, high in (("--samples", samples, MAX_SAMPLES), ("--max-new-tokens", max_new_tokens, MAX_SEQ_LEN),
                              ("--batch-size", batch_size, MAX_SAMPLES)):
        if not 1 <= value <= high:
            raise UserError(f"{name} must be in 1..{high:,}, got {value}")
    if len(prompts) * samples > MAX_SAMPLES:
        raise UserError(f"{len(prompts)} prompts x --samples {samples} is over {MAX_SAMPLES:,} samples")
    check_number(temperature, "--temperature")  # the API takes no detour through the CLI's checks
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if regex is None:
        return None
    return UserRegex(regex)


def steer(
    checkpoint: Checkpoint, codes: Sequence[str] = (), prompts: Sequence[str] = (), *, mode: str = "force",
    strength: float = 1.0, positions: str = "all", samples: int = 4, max_new_tokens: int = 32,
    temperature: float = 1.0, top_k: int | None = None, seed: int = 0, batch_size: int = 32,
    regex: str | None = None, spec: Path | None = None, prompts_file: Path | None = None,
    device: torch.device | str | None = None, fluency: bool = False,
) -> dict[str, Any]:
    """Generate `samples` continuations of every prompt (default: the empty prompt) with the codes (`SITE:CODE`)
    forced on / added / ablated, each beside an unsteered twin with the same seed. `regex`: the share of
    steered and twin texts it matches (with Wilson 95% intervals) and the gain. `spec`: a JSONL file of rows
    {"prompt", "codes", "mode", "seed", "strength", "samples"} instead of codes and prompts.
    Returns the summary `cbtool intervene --json` prints, plus `rows`: one per sample (prompt, seed,
    interventions, steered and baseline text). `fluency`: each row's `steered_logprob` / `baseline_logprob`, the
    mean log-probability of its generated tokens under the unsteered model, and their means in the summary
    (topic words in garbled text must not pass for steering)."""
    pattern = check_options(codes=codes, prompts=prompts, prompts_file=prompts_file, spec=spec, mode=mode,
                            positions=positions, samples=samples, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, batch_size=batch_size, regex=regex,
                            modes=getattr(checkpoint.model, "modes", MODES))
    args = {"spec": spec, "mode": mode, "strength": strength, "seed": seed, "samples": samples,
            "codes": list(codes), "prompts_file": prompts_file, "prompt": list(prompts)}
    jobs, info = make_jobs(checkpoint, args)
    dev = torch.device(device) if device is not None else next(checkpoint.model.parameters()).device
    steered, baseline = generate_with_twins(checkpoint.model, jobs, max_new_tokens, temperature, top_k, positions,
                                            batch_size, dev)
    task = checkpoint.task
    rows = []
    for meta, s_ids, b_ids in zip(info, steered, baseline, strict=True):
        row = {**meta, "steered": task.decode(s_ids), "baseline": task.decode(b_ids)}
        if pattern is not None:
            row["steered_match"] = pattern.search(row["steered"])
            row["baseline_match"] = pattern.search(row["baseline"])
        rows.append(row)
    n = len(rows)
    summary: dict[str, Any] = {
        "checkpoint": str(checkpoint.path), "checkpoint_sha256": checkpoint.sha256, "samples": n,
        "positions": positions, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
        "seed": seed, "changed": sum(r["steered"] != r["baseline"] for r in rows) / n,
    }
    if spec is None:
        summary["interventions"] = rows[0]["interventions"]
    if isinstance(task, TokFSM):  # TokFSM: how often the generated states follow the FSM's edges
        prompts = ["".join(r["prompt"].split()) for r in rows]
        summary["valid_transitions"] = {
            label: valid_transitions(task, [p + r[label] for p, r in zip(prompts, rows, strict=True)],
                                     [len(p) for p in prompts])
            for label in ("steered", "baseline")}
    if fluency:
        prompt_ids = [j.prompt for j in jobs]
        with torch.no_grad():
            s_lp = continuation_logprobs(checkpoint.model, prompt_ids, steered, batch_size, dev)
            b_lp = continuation_logprobs(checkpoint.model, prompt_ids, baseline, batch_size, dev)
        for row, s_v, b_v in zip(rows, s_lp, b_lp, strict=True):
            row["steered_logprob"], row["baseline_logprob"] = s_v, b_v
        summary["fluency"] = {label: mean_interval([r[f"{label}_logprob"] for r in rows])
                              for label in ("steered", "baseline")}
    if pattern is not None:
        s_hits = sum(r["steered_match"] for r in rows)
        b_hits = sum(r["baseline_match"] for r in rows)
        summary["regex"] = regex
        summary["steered"], summary["baseline"] = rate(s_hits, n), rate(b_hits, n)
        summary["gain"] = (s_hits - b_hits) / n
    return {**summary, "rows": rows}


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean of finite values with a normal 95% interval: {"mean", "ci95", "n"}."""
    v = [x for x in values if x == x]
    n = len(v)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    mean = sum(v) / n
    sd = (sum((x - mean) ** 2 for x in v) / (n - 1)) ** 0.5 if n > 1 else 0.0
    half = 1.959963984540054 * sd / n ** 0.5
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def codes_from(source: str, pick: int = 1, per_site: bool = False, best_sites: int | None = None) -> list[str]:
    """The codes of the best `pick` rows of `find-codes --json`/`--jsonl` output in file `source` ("-": stdin),
    in find-codes' order: `intervene --codes-from` steers with what a search found, never hand-picked codes.
    `per_site`: the best `pick` rows of every site in it; `best_sites` N: of its N best sites only."""
    if pick < 1:
        raise UserError(f"--pick must be >= 1, got {pick}")
    if best_sites is not None and best_sites < 1:
        raise UserError(f"--best-sites must be >= 1, got {best_sites}")
    if source == "-":
        return codes_from_results(read_stdin_text("--codes-from -"), "stdin", pick, per_site, best_sites)
    path = Path(source)
    if not path.is_file():
        raise UserError(f"--codes-from {source}: no such file")
    text = read_text(path, "--codes-from")
    return codes_from_results(text, source, pick, per_site, best_sites)
