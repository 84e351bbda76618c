# ruff: noqa: B008  (typer declares options as call defaults)
"""`cbtool intervene`: batch-steered generation beside an unsteered baseline; `--fsm-eval` runs the
paper's TokFSM state-patching experiment (docs/steer.md)."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table
from rich.text import Text

from cbtool.commands.common import (
    DEVICE_HELP,
    RUN_OPTION_HELP,
    default_checkpoint,
    default_store,
    emit_json,
    emit_jsonl,
    err,
    out,
)
from cbtool.errors import CheckFailed, UserError
from cbtool.explanations.explainer import code_meaning, matching_store
from cbtool.report import plots
from cbtool.report.plots import check_plot_path
from cbtool.tasks.fsm_text import group_states

if TYPE_CHECKING:
    from cbtool.formats.checkpoint import Checkpoint

# cbtool.steering.patching's DEFAULT_ROWS and ROW_HELP, here without importing torch for --help
# (tests/contracts/test_startup.py checks that they agree)
DEFAULT_ROWS = ("none", "0.attn", "1.mlp", "attn", "mlp", "all")
ROW_HELP = "none, all, attn, mlp, L.attn (all heads of layer L), L.mlp"


def intervene(
    path: Path | None = typer.Argument(None, help="Checkpoint directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    code: list[str] = typer.Option([], "--code", "-c", help="SITE:CODE to steer with (repeatable)."),
    codes_from: str | None = typer.Option(None, "--codes-from", help="Also steer with the best --pick codes of "
                                          "find-codes --json/--jsonl output in FILE ('-' = stdin)."),
    pick: int = typer.Option(1, "--pick", help="With --codes-from: how many of its best rows to steer with."),
    per_site: bool = typer.Option(False, "--per-site", help="With --codes-from: the best --pick rows of every "
                                  "site in it (codes at several layers at once)."),
    one_site: bool = typer.Option(False, "--one-site", help="With --codes-from: the best --pick rows of its best "
                                  "site only (--pick k: that head's whole code set, as the paper steers topics)."),
    best_sites: int | None = typer.Option(None, "--best-sites", help="With --codes-from: like --one-site, over "
                                          "its N best sites (e.g. two heads)."),
    mode: str = typer.Option("force", "--mode", help="force (code joins the active set, replacing the "
                             "lowest-scoring one), add (its vector x --strength is added), ablate (removed, "
                             "next best takes its place). With --sae: ablate (x - act * W_dec[i]), add "
                             "(x + strength * W_dec[i]) or set (held at --value)."),
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
    fluency: bool = typer.Option(False, "--fluency", help="Also score every sample and twin by the mean "
                                 "log-probability of its new tokens under the unsteered model (nats/token)."),
    require_gain: float | None = typer.Option(None, "--require-gain", help="Exit 1 unless the steered rate "
                                              "is at least G above the baseline rate (needs --regex)."),
    fsm_eval: bool = typer.Option(False, "--fsm-eval",
                                  help="TokFSM state patching (paper sec. 4; see --fsm-mode)."),
    fsm_mode: str = typer.Option("patching", "--fsm-mode", help="--fsm-eval: patching (the paper's table: "
                                 "JSD to b's own next-token distribution) or steering (two-digit next-state "
                                 "JSD to b's true transitions, forcing b's most precise codes)."),
    prefix_states: int = typer.Option(62, "--prefix-states", help="--fsm-eval patching: random-walk prefixes "
                                      "of 0..P states before state a."),
    patch_rows: str = typer.Option(",".join(DEFAULT_ROWS), "--patch-rows",
                                   help=f"--fsm-eval patching: rows, comma-separated ({ROW_HELP})."),
    pairs: int = typer.Option(500, "--pairs", help="--fsm-eval steering: (a, b) state pairs."),
    fsm_patch: str = typer.Option("state", "--fsm-patch", help="--fsm-eval: patch both tokens of state a "
                                  "(state) or only its last (last)."),
    code_seqs: int = typer.Option(256, "--code-seqs",
                                  help="--fsm-eval: fresh sequences for the code search."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON summary on stdout."),
    as_jsonl: bool = typer.Option(False, "--jsonl", help="One JSON row per sample on stdout."),
    plot: Path | None = typer.Option(None, "--plot", help="Also draw steered vs baseline rates with 95% intervals "
                                     "(--regex or --fsm-eval) to FILE.png or FILE.svg."),
    sae: Path | None = typer.Option(None, "--sae", help="Steer the latents of this SAE folder (SAELens or "
                                    "sparsify) on --base-model: --code SITE:LATENT, --mode ablate|add|set."),
    base_model: Path | None = typer.Option(None, "--base-model", help="With --sae: the model it reads (a local "
                                           "Hugging Face folder or a cbtool checkpoint)."),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="With --sae: a GGUF file in --base-model."),
    site: str | None = typer.Option(None, "--site", help="With --sae: the site it reads, overriding its hook name."),
    store: Path | None = typer.Option(None, "--store", help="With --sae: a store embedded with it (describes the "
                                      "latents; --mode set takes its default value there)."),
    value: float | None = typer.Option(None, "--value", help="With --sae --mode set: the activation to hold the "
                                       "latent at (default: the 0.99 quantile of its nonzero activations in "
                                       "--store)."),
    k_max: int | None = typer.Option(None, "--k-max", help="With --sae of a variable-L0 architecture: latents kept "
                                     "per token, as `embed --k-max` (default 32)."),
) -> None:
    """Generate with codes forced on / added / ablated, beside an unsteered twin of every sample.

    Examples:
      cbtool intervene --code 3.mlp:412 --prompt 3719 -n 8
      cbtool intervene --code 3:412 --code 2.attn.h1:7 --mode ablate --prompts prompts.txt --jsonl
      cbtool intervene --code 3.mlp:412 -n 200 --regex "^41" --require-gain 0.2
      cbtool intervene --spec rows.jsonl --json
      cbtool find-codes --regex ' war' --jsonl | cbtool intervene --codes-from - --pick 2 --regex ' war'
      cbtool intervene --fsm-eval                      # the paper's state-patching table
      cbtool intervene --fsm-eval --fsm-mode steering  # two-digit next-state JSD to b's true transitions
      cbtool intervene --code 3.mlp:412 -n 200 --regex "^41" --plot rates.png
      cbtool intervene --sae saes/l6 --base-model models/gpt2 --code 6.resid:1234 --mode add --strength 8 -p "The"
    """
    from cbtool.formats.checkpoint import load_checkpoint  # torch: imported when the command runs
    from cbtool.model.devices import resolve_device
    from cbtool.steering.interventions import MODES
    from cbtool.steering.jobs import check_options, steer
    from cbtool.steering.jobs import codes_from as steer_codes_from
    from cbtool.steering.sae import SAE_MODES
    from cbtool.tasks.tokfsm import TokFSM

    if sae is None:
        for flag, given in (("--base-model", base_model), ("--gguf-file", gguf_file), ("--site", site),
                            ("--store", store), ("--value", value), ("--k-max", k_max)):
            if given is not None:
                raise UserError(f"{flag} applies to --sae")
    elif path is not None or fsm_eval:
        raise UserError("--sae steers an SAE on --base-model: drop the checkpoint argument and --fsm-eval")
    elif base_model is None:
        raise UserError("--sae needs --base-model, the model it reads")
    plot = check_plot_path(plot)
    if plot is not None and regex is None and not fsm_eval:
        raise UserError("--plot draws success rates: give --regex (or use --fsm-eval)")
    if as_json and as_jsonl:
        raise UserError("--json and --jsonl are exclusive")
    if one_site and best_sites is not None:
        raise UserError("--one-site is --best-sites 1: give one of them")
    best_sites = 1 if one_site else best_sites
    for flag, given in (("--per-site", per_site), ("--one-site/--best-sites", best_sites is not None)):
        if given and codes_from is None:
            raise UserError(f"{flag} needs --codes-from")
    if per_site and best_sites is not None:
        raise UserError("--per-site takes every site, --one-site/--best-sites the best: give one of them")
    if codes_from is not None:
        code = [*code, *steer_codes_from(codes_from, pick, per_site, best_sites)]
    dev = resolve_device(device)
    if fsm_eval and fsm_mode == "patching":
        if plot is not None:
            raise UserError("--plot draws the state-steering rates: use --fsm-eval --fsm-mode steering")
        _fsm_patching(path, run, dev, prefix_states, patch_rows, seed, as_json, code or prompt or spec or prompts_file)
        return
    if fsm_eval and fsm_mode != "steering":
        raise UserError(f"unknown --fsm-mode {fsm_mode!r}: use patching or steering")
    if fsm_eval:
        res = _fsm_eval(path, run, dev, pairs, fsm_patch, code_seqs, seed, temperature, as_json, code or prompt
                        or spec or prompts_file)
        if plot is not None:
            plots.fsm_steering_rates(res, plot)
            err.print(f"plot written to {plot}")
        return
    if require_gain is not None and regex is None:
        raise UserError("--require-gain needs --regex")
    check_options(codes=code, prompts=prompt, prompts_file=prompts_file, spec=spec, mode=mode, positions=positions,
                  samples=samples, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                  batch_size=batch_size, regex=regex, modes=MODES if sae is None else SAE_MODES)
    if sae is not None:
        ckpt, describe = _sae_target(sae, base_model, gguf_file, site, store, value, k_max, dev)
    else:
        ckpt = load_checkpoint(default_checkpoint(path, run), device=dev)
        describe = partial(_describe_codes, ckpt, run=run)
    if best_sites is not None and sae is None:
        _check_pick(ckpt, code, pick)
    t0 = time.perf_counter()
    summary = steer(ckpt, code, prompt, mode=mode, strength=strength, positions=positions, samples=samples,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                    batch_size=batch_size, regex=regex, spec=spec, prompts_file=prompts_file, device=dev,
                    fluency=fluency)
    rows = summary.pop("rows")
    err.print(f"[dim]{len(rows)} steered samples + {len(rows)} twins on {dev}, batch {batch_size}: "
              f"{time.perf_counter() - t0:.2f} s[/dim]")
    if require_gain is not None:
        summary["require_gain"] = require_gain
    if as_jsonl:
        emit_jsonl(rows)
    elif as_json:
        emit_json("intervene", {**summary, "examples": rows[:5]})
    else:
        describe(rows)
        _show(rows, summary, regex is not None, isinstance(ckpt.task, TokFSM))
    if plot is not None:
        plots.steering_rates(summary, plot)
        err.print(f"plot written to {plot}")
    if require_gain is not None and summary["gain"] < require_gain:
        s_rate, b_rate = summary["steered"]["rate"], summary["baseline"]["rate"]
        raise CheckFailed(f"steered rate {s_rate:.3f} is {summary['gain']:+.3f} over the baseline "
                          f"{b_rate:.3f}; --require-gain {require_gain} not met")


def _sae_target(sae_dir: Path, base_model: Path, gguf_file: str | None, site: str | None, store_path: Path | None,
                value: float | None, k_max: int | None, dev) -> tuple[Any, Any]:
    """`intervene --sae`: the SAE on its base model as `steer` takes it, and what describes its latents."""
    from cbtool.formats.sae import load_sae, open_base
    from cbtool.formats.store import open_store
    from cbtool.steering.sae import sae_target

    sae = load_sae(sae_dir, k_max)
    store = open_store(store_path, warn=lambda m: err.print(m, markup=False)) if store_path is not None else None
    target = sae_target(open_base(base_model, gguf_file, dev), sae.to(dev), site, store, value)

    def describe(rows: list[dict[str, Any]]) -> None:
        if store is None:
            return
        for ref in dict.fromkeys(iv["code"] for r in rows for iv in r["interventions"]):
            out.print(f"{ref}: {code_meaning(store, ref)}  ({store.path})", markup=False, highlight=False)

    return target, describe


def _check_pick(ckpt: Checkpoint, codes: list[str], pick: int) -> None:
    """--one-site/--best-sites force --pick codes at a site: no more than the k slots it has."""
    ks = {name: s.spec.k for name, s in ckpt.model.sites.items()}
    for site in dict.fromkeys(c.rpartition(":")[0] for c in codes):
        if site in ks and pick > ks[site]:
            raise UserError(f"--pick {pick} is more codes than site {site} selects (k = {ks[site]}): forced codes "
                            f"replace its k slots; use --pick {ks[site]} or fewer")


def _describe_codes(ckpt: Checkpoint, rows: list[dict[str, Any]], run: Path | None) -> None:
    """One line per forced / added / ablated code: what it stands for in the run's store (when that store
    was embedded from this checkpoint)."""
    store = matching_store(default_store(None, run), ckpt.sha256)
    refs = dict.fromkeys(iv["code"] for r in rows for iv in r["interventions"])
    if store is None:
        if refs:
            out.print(f"(run `cbtool embed` to see what the codes stand for: no store of {ckpt.path} at "
                      f"{default_store(None, run)})", markup=False)
        return
    for ref in refs:
        out.print(f"{ref}: {code_meaning(store, ref)}  ({store.path})", markup=False, highlight=False)


def _show(rows: list[dict[str, Any]], summary: dict[str, Any], with_regex: bool, fsm: bool = False,
          limit: int = 50) -> None:
    table = Table(title=f"steered vs unsteered twin ({summary['samples']} samples, positions="
                        f"{summary['positions']}, T={summary['temperature']}"
                        + ("; digits grouped into states" if fsm else "") + ")")
    # at 80 columns the short columns keep their width (no prompt one character per line): row and seed never
    # wrap, prompt and interventions keep up to 24 / 20 characters a line, and the two texts share the rest
    shown = rows[:limit]
    prompts = [("".join(r["prompt"].split()) if fsm else r["prompt"]) for r in shown]
    ivss = [" ".join(f"{iv['mode']} {iv['code']}" for iv in r["interventions"]) or "-" for r in shown]
    longest = {"prompt": max((len(group_states(p) if fsm else p) for p in prompts), default=7),
               "interventions": max(map(len, ivss), default=1)}
    table.add_column("row", no_wrap=True, justify="right")
    table.add_column("seed", no_wrap=True, justify="right")
    table.add_column("prompt", overflow="fold", min_width=max(6, min(longest["prompt"], 24)))
    table.add_column("interventions", overflow="fold", min_width=max(13, min(longest["interventions"], 20)))
    for col in ("steered (bold: where it differs from its twin)", "baseline (twin)"):
        table.add_column(col, overflow="fold", min_width=10)
    for r, prompt, ivs in zip(shown, prompts, ivss, strict=True):
        s, b = _twin_texts(r["steered"], r["baseline"], len(prompt) if fsm else None)
        if with_regex:
            s = Text(f"{'✓' if r['steered_match'] else '✗'} ").append_text(s)
            b = Text(f"{'✓' if r['baseline_match'] else '✗'} ").append_text(b)
        table.add_row(str(r["row"]), str(r["seed"]), (group_states(prompt) if fsm else prompt) or "(empty)",
                      ivs, s, b)
    out.print(table)
    valid = summary.get("valid_transitions")
    if valid:
        out.print("valid FSM transitions in the generated states: " + ", ".join(
            f"{label} {v['valid']}/{v['transitions']} = {v['rate']:.1%}" for label, v in valid.items()))
    if len(rows) > limit:
        out.print(f"... {len(rows) - limit} more samples (use --jsonl for all)")
    out.print(f"steered text differs from its twin in {summary['changed']:.1%} of samples")
    if with_regex:
        for label in ("steered", "baseline"):
            r = summary[label]
            out.print(f"{label:>8}: {r['matches']}/{r['samples']} match /{summary['regex']}/ = "
                      f"{r['rate']:.1%} (95% CI {r['ci95'][0]:.1%}-{r['ci95'][1]:.1%})")
        out.print(f"    gain: {summary['gain']:+.1%}")
    flu = summary.get("fluency")
    if flu and flu["steered"]["n"] and flu["baseline"]["n"]:
        s_f, b_f = flu["steered"], flu["baseline"]
        out.print(f"fluency (mean log-prob of the new tokens under the unsteered model): steered "
                  f"{s_f['mean']:.3f} (95% CI {s_f['ci95'][0]:.3f}..{s_f['ci95'][1]:.3f}), twins {b_f['mean']:.3f} "
                  f"({b_f['ci95'][0]:.3f}..{b_f['ci95'][1]:.3f}) nats/token")


def _twin_texts(steered: str, baseline: str, fsm_first: int | None) -> tuple[Text, Text]:
    """Steered and twin text, the steered characters that differ from the twin's in bold; TokFSM digits
    (`fsm_first`: the digit index of the first generated digit) grouped into states."""
    s_text, b_text = Text(), Text()
    for i, ch in enumerate(steered):
        if fsm_first is not None and i and (fsm_first + i) % 2 == 0:
            s_text.append(" ")
        s_text.append(ch, style="bold" if i >= len(baseline) or baseline[i] != ch else "")
    b_text.append(baseline if fsm_first is None else group_states(baseline, fsm_first))
    return s_text, b_text


def _tokfsm_checkpoint(path: Path | None, run: Path | None, dev, extra: Any) -> Checkpoint:
    from cbtool.formats.checkpoint import load_checkpoint
    from cbtool.tasks.tokfsm import TokFSM

    if extra:
        raise UserError("--fsm-eval chooses its own codes and prompts: drop --code/--prompt/--prompts/--spec")
    ckpt = load_checkpoint(default_checkpoint(path, run), device=dev)
    if not isinstance(ckpt.task, TokFSM):
        raise UserError(f"{ckpt.path} was not trained on TokFSM: --fsm-eval needs a TokFSM checkpoint")
    return ckpt


def _fsm_patching(path: Path | None, run: Path | None, dev, prefix_states: int, rows: str, seed: int,
                  as_json: bool, extra: Any) -> None:
    from cbtool.steering.patching import PATCHING_NOTE, parse_rows, state_patching

    ckpt = _tokfsm_checkpoint(path, run, dev, extra)
    res = state_patching(ckpt.model, ckpt.task, dev, parse_rows(rows, ckpt.model), prefix_states, seed)
    if as_json:
        emit_json("intervene-fsm-patching", {"checkpoint": str(ckpt.path), "checkpoint_sha256": ckpt.sha256,
                                             **res})
        return
    out.print(patching_table(res, f"{ckpt.path}: state patching ({res['pairs']} pairs (a, b))"))
    out.print(PATCHING_NOTE)


def _fsm_eval(path: Path | None, run: Path | None, dev, pairs: int, patch: str, code_seqs: int, seed: int,
              temperature: float, as_json: bool, extra: Any) -> dict[str, Any]:
    from cbtool.steering.fsm import fsm_state_steering

    if pairs < 1 or code_seqs < 1:
        raise UserError("--pairs and --code-seqs must be >= 1")
    if patch not in ("state", "last"):
        raise UserError(f"unknown --fsm-patch {patch!r}: use state or last")
    if temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {temperature}")
    ckpt = _tokfsm_checkpoint(path, run, dev, extra)
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


def patching_table(res: dict[str, Any], title: str):
    """The result as a rich table: raw and normalised JSD per row, bare and prefixed inputs."""
    table = Table(title=title)
    table.add_column("patched codes", no_wrap=True)
    table.add_column("sites", justify="right")
    p = res["prefix_states"]
    for col in ("JSD bare", "norm. bare", f"JSD prefix 0..{p}", f"norm. prefix 0..{p}"):
        table.add_column(col, justify="right")
    for r in res["table"]:
        table.add_row(r["row"], str(r["sites"]), f"{r['jsd_bare']:.4f}", f"{r['normalised_bare']:.3f}",
                      f"{r['jsd_prefix']:.4f}", f"{r['normalised_prefix']:.3f}")
    return table
