"""`cbtool embed`: run a corpus through a checkpoint and store every token's top-k codes per site."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import typer
from rich.table import Table

from cbtool.commands.common import (
    DEVICE_HELP,
    RUN_OPTION_HELP,
    default_checkpoint,
    default_store,
    emit_json,
    err,
    out,
)
from cbtool.errors import UserError
from cbtool.formats.store import SHARD_META, code_dtype, read_manifest
from cbtool.util import distributed, progress, signals
from cbtool.util.files import refuse_overwriting_inputs

if TYPE_CHECKING:
    from cbtool.embedding import EmbedJob, SAEEmbedJob

# cbtool.embedding.DEFAULT_SHARD_TOKENS, here without importing torch for --help (tests/contracts/test_startup.py
# checks that they agree)
DEFAULT_SHARD_TOKENS = 1_000_000


def _parse_worker(text: str | None) -> tuple[int, int]:
    if text is None:
        return (0, 1)
    m = re.fullmatch(r"\s*([0-9]{1,9})\s*/\s*([0-9]{1,9})\s*", text)
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise UserError(f"bad --worker {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(m.group(1)), int(m.group(2))


def embed(
    checkpoint: Path | None = typer.Argument(None, help="Checkpoint directory (default RUN/checkpoint)."),  # noqa: B008
    out_dir: Path | None = typer.Option(None, "--out", help="Store directory (default RUN/codes)."),  # noqa: B008
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),  # noqa: B008
    corpus: Path | None = typer.Option(  # noqa: B008
        None,
        "--corpus",
        help="Text corpus: .txt, .jsonl or a folder (needs a checkpoint with a text tokenizer).",
    ),
    text_field: str = typer.Option(
        "text", "--text-field", help="JSON field holding the text in .jsonl files."
    ),
    num_seqs: int = typer.Option(2048, "--num-seqs", help="TokFSM: fresh held-out sequences to embed."),
    seed: int = typer.Option(0, "--seed", help="TokFSM: which held-out sequence stream."),
    split: str = typer.Option(
        "all", "--split", help="Text checkpoints without --corpus: heldout, train or all documents of the corpus "
        "the checkpoint was trained on (a corpus of fewer than 100 documents: the tokens of its held-out / "
        "training blocks)."
    ),
    sites: str | None = typer.Option(
        None,
        "--sites",
        help="Site globs, comma-separated, e.g. '*.mlp' or '0.attn.h*,3.mlp' (default: every site).",
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences per forward pass."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Stop after this many tokens."),
    shard_tokens: int = typer.Option(
        DEFAULT_SHARD_TOKENS, "--shard-tokens", help="Tokens per shard (whole documents)."
    ),
    worker: str | None = typer.Option(
        None, "--worker", help="I/N: write only shards with index % N == I (run N processes on one store)."
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing store at --out first."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    sae: Path | None = typer.Option(None, "--sae", help="An SAE folder (SAELens or sparsify): store its top-k "  # noqa: B008
                                    "latents (and their activations) at its site of --base-model instead of a "
                                    "checkpoint's codes."),
    base_model: Path | None = typer.Option(None, "--base-model", help="With --sae: the model it reads, a local "  # noqa: B008
                                           "Hugging Face folder or a cbtool checkpoint."),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="With --sae: a GGUF file in --base-model."),
    site: str | None = typer.Option(None, "--site", help="With --sae: read this site (L.resid, L.mlp, L.attn, "
                                    "L.attn.hH) instead of the one its hook name gives."),
    k_max: int | None = typer.Option(None, "--k-max", help="With --sae of a variable-L0 architecture (ReLU, "
                                     "JumpReLU, gated): latents kept per token, the largest (default 32; the "
                                     "dropped share is recorded). A TopK SAE keeps its own k."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="With --sae and a Hugging Face base: tokens per "
                                       "document, longer texts are cut (default 128, or the model's context "
                                       "when shorter)."),
) -> None:
    """Run a corpus through a checkpoint (codebooks on) and store each token's top-k code ids per site.

    Re-running resumes after the shards already written.

    Examples:
      cbtool embed                                   # TokFSM: 2048 held-out sequences -> RUN/codes
      cbtool embed --num-seqs 4000 --sites '*.mlp' --out runs/a/codes-mlp
      cbtool embed runs/smol/checkpoint --split heldout   # text: the held-out documents of its corpus
      cbtool embed --worker 0/2 & cbtool embed --worker 1/2   # two processes, one store
      torchrun --nproc-per-node 2 -m cbtool embed    # the same, the worker index from the rank
      cbtool embed --sae saes/l6-resid --base-model models/gpt2 --corpus text.txt --out runs/sae/codes
    """
    if sae is not None or base_model is not None:
        _embed_sae(sae, base_model, gguf_file, checkpoint, site, k_max, seq_len, out_dir, run, corpus, text_field,
                   num_seqs, seed, split, sites, batch_size, max_tokens, shard_tokens, worker, device, overwrite,
                   as_json)
        return
    for flag, value in (("--gguf-file", gguf_file), ("--site", site), ("--k-max", k_max), ("--seq-len", seq_len)):
        if value is not None:
            raise UserError(f"{flag} applies to --sae")
    from cbtool.embedding import plan_embed  # torch: imported when the command runs, not for --help
    from cbtool.formats.checkpoint import load_checkpoint
    from cbtool.model.devices import resolve_device
    world = distributed.world()
    parts = _parse_worker(worker)
    if world.active:  # under torchrun: rank R of N is worker R/N
        if worker is not None:
            raise UserError("--worker and torchrun both split the shards: give one of them")
        parts = (world.rank, world.size)
    dev = resolve_device(device)
    ckpt_dir, target = default_checkpoint(checkpoint, run), default_store(out_dir, run)
    distributed.agree([str(Path(ckpt_dir).resolve()), str(Path(target).resolve()), str(corpus), text_field, num_seqs,
                       seed, split, sites, batch_size, max_tokens, shard_tokens, str(dev), overwrite],
                      "the embed arguments")
    refuse_overwriting_inputs(target, "--out", files=[ckpt_dir, *([corpus] if corpus else [])], replaced_dir=True)
    ckpt = load_checkpoint(ckpt_dir, device=dev)
    if corpus is None and max_tokens is None and split == "all":
        max_tokens = _own_corpus_cap(ckpt)
    with signals.describing(lambda: _saved(target)):  # an interrupt's one line (cbtool/util/signals.py)
        # rank 0 creates (or replaces) the store, then the other ranks reopen it
        job = distributed.main_first(lambda: plan_embed(
            ckpt, target, corpus, text_field=text_field, num_seqs=num_seqs, seed=seed, split=split, sites=sites,
            batch_size=batch_size, max_tokens=max_tokens, shard_tokens=shard_tokens, worker=parts, device=dev,
            overwrite=overwrite and world.is_main))
        doc = _run_job(job, target, lambda d: (
            f"embedded {d['tokens_written']:,} tokens in {d['written']} shard(s) in {d['seconds']:.1f} s "
            f"({d['tokens_per_s']:,.0f} tokens/s); skipped {d['skipped']} shard(s) already written or not ours"))
    if as_json:
        emit_json("embed", doc)
        return
    if not doc["complete"]:
        out.print(
            f"wrote {doc['written']} shard(s) of {doc['shards']} to {target}; the store is complete once "
            f"every worker has finished"
        )
        return
    table = Table(title=f"code store {target}")
    table.add_column("tokens", justify="right")
    table.add_column("docs", justify="right")
    table.add_column("shards", justify="right")
    table.add_column("sites")
    table.add_column("k / C / dtype")
    e = job.writer.manifest["sites"][0]
    chosen = doc["sites"]
    table.add_row(
        f"{doc['tokens']:,}",
        f"{doc['docs']:,}",
        str(doc["shards"]),
        f"{len(chosen)}: {', '.join(chosen[:4])}{' ...' if len(chosen) > 4 else ''}",
        f"{e['k']} / {e['num_codes']} / {code_dtype(e['num_codes']).name}",
    )
    out.print(table)


OWN_CORPUS_FACTOR = 16  # `embed` of a checkpoint's own corpus: at most this many times the tokens it trained on
OWN_CORPUS_MIN = 65_536


def _own_corpus_cap(ckpt) -> int | None:
    """`embed CK` of a text checkpoint's own corpus, all of it, without --max-tokens: stop at OWN_CORPUS_FACTOR x
    the tokens the run trained on (steps x batch x block; at least OWN_CORPUS_MIN), so that a few-second run
    (`--preset tiny`: 65,536 tokens) is not followed by minutes embedding the whole corpus; the presets' full runs
    stay whole (the text default on the plays: 49M > 3.4M; SmolLM2's: 3.3M > 2.45M). Said on stderr;
    --max-tokens or --split choose otherwise."""
    from cbtool.tasks.text import TextTask

    if not isinstance(ckpt.task, TextTask):
        return None
    cfg = (ckpt.meta.get("training") or {}).get("config") or {}
    try:
        trained = (int(cfg["base_steps"]) + int(cfg["steps"])) * int(cfg["batch_size"]) * int(cfg["seq_len"])
    except (KeyError, TypeError, ValueError):
        return None
    cap = max(OWN_CORPUS_FACTOR * trained, OWN_CORPUS_MIN)
    recorded = (ckpt.meta.get("task") or {}).get("tokens")  # the corpus size training recorded: no re-tokenising
    total = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else ckpt.task.num_tokens
    if cap >= total:
        return None
    err.print(f"embedding the first {cap:,} of the corpus's {total:,} tokens ({OWN_CORPUS_FACTOR} x the {trained:,} "
              f"this run trained on); --max-tokens N or --split heldout|train choose otherwise", soft_wrap=True)
    return cap


def _embed_sae(sae_dir: Path | None, base_model: Path | None, gguf_file: str | None, checkpoint: Path | None,
               site: str | None, k_max: int | None, seq_len: int | None, out_dir: Path | None, run: Path | None,
               corpus: Path | None, text_field: str, num_seqs: int, seed: int, split: str, sites: str | None,
               batch_size: int, max_tokens: int | None, shard_tokens: int, worker: str | None, device: str,
               overwrite: bool, as_json: bool) -> None:
    """`embed --sae DIR --base-model MODEL`: the SAE's site of the base model; under torchrun rank R of N writes
    the shards of worker R/N, as `embed` does."""
    from cbtool.embedding import plan_sae_embed
    from cbtool.formats.sae import load_sae, open_base
    from cbtool.model.devices import resolve_device

    if sae_dir is None or base_model is None:
        raise UserError("--sae and --base-model go together: the SAE folder and the model it reads")
    if checkpoint is not None:
        raise UserError("with --sae give the model as --base-model, not as a checkpoint argument")
    if sites is not None:
        raise UserError("--sites selects codebook sites; an SAE reads one site (--site overrides its own)")
    if seq_len is not None and seq_len < 2:
        raise UserError(f"--seq-len must be >= 2, got {seq_len}")
    world = distributed.world()
    parts = _parse_worker(worker)
    if world.active:  # under torchrun: rank R of N is worker R/N
        if worker is not None:
            raise UserError("--worker and torchrun both split the shards: give one of them")
        parts = (world.rank, world.size)
    dev = resolve_device(device)
    target = default_store(out_dir, run)
    distributed.agree([str(Path(sae_dir).resolve()), str(Path(base_model).resolve()), gguf_file, site, k_max, seq_len,
                       str(Path(target).resolve()), str(corpus), text_field, num_seqs, seed, split, batch_size,
                       max_tokens, shard_tokens, str(dev), overwrite], "the embed arguments")
    sae = load_sae(sae_dir, k_max)
    base = open_base(base_model, gguf_file, dev, seq_len)
    with signals.describing(lambda: _saved(target)):
        # rank 0 creates (or replaces) the store, then the other ranks reopen it
        job = distributed.main_first(lambda: plan_sae_embed(
            sae, base, target, corpus, site=site, text_field=text_field, num_seqs=num_seqs, seed=seed, split=split,
            batch_size=batch_size, max_tokens=max_tokens, shard_tokens=shard_tokens, worker=parts, device=dev,
            overwrite=overwrite and world.is_main))
        doc = _run_job(job, target, lambda d: (
            f"embedded {d['tokens_written']:,} tokens in {d['written']} shard(s) in {d['seconds']:.1f} s through "
            f"SAE {sae.path} at {job.site}"))
    if as_json:
        emit_json("embed", doc)
        return
    if not doc["complete"]:
        out.print(f"wrote {doc['written']} shard(s) of {doc['shards']} to {target}; the store is complete once "
                  f"every worker has finished")
        return
    table = Table(title=f"code store {target} (SAE {sae.format} {sae.architecture})")
    for col in ("tokens", "docs", "shards", "site", "k / d_sae / dtype", "dropped (latents / mass)"):
        table.add_column(col, justify="right" if col in ("tokens", "docs", "shards") else "left")
    tr = doc["truncation"] or {}
    dropped = ("- (TopK)" if sae.k_fixed else
               f"{tr.get('dropped_latent_share', 0):.1%} / {tr.get('dropped_mass_share', 0):.1%} "
               f"(mean L0 {tr.get('mean_l0', 0):.1f})")
    table.add_row(f"{doc['tokens']:,}", f"{doc['docs']:,}", str(doc["shards"]), job.site,
                  f"{sae.k} / {sae.d_sae} / {code_dtype(sae.d_sae).name}", dropped)
    out.print(table)


def _saved(target: Path) -> str:
    done = sum(1 for _ in target.glob(f"shard-*/{SHARD_META}")) if target.is_dir() else 0
    return (f"{done} complete shard(s) are kept in {target}; run the same command again to continue (complete "
            f"shards are skipped)")


def _run_job(job: EmbedJob | SAEEmbedJob, target: Path, summary: Callable[[dict], str]) -> dict:
    """Run an embed job (its writer lock held until the store is finalised, by all ranks under torchrun) and
    say what it wrote."""
    try:
        if job.complete:
            err.print(f"store {target} is complete; nothing to do (--overwrite starts over)", soft_wrap=True)
            return job.run(close=False)
        with progress.track("embedding", job.expected_tokens, "tokens") as bar:  # a line every 30 s
            doc = job.run(bar.advance, close=False)
        if distributed.world().active:
            doc = _all_ranks(job, doc)
        err.print(summary(doc), soft_wrap=True)
        return doc
    finally:
        job.writer.close()


def _all_ranks(job: EmbedJob | SAEEmbedJob, doc: dict) -> dict:
    """Once every rank has written its shards: the store finalised and the summary of all ranks."""
    written, tokens = (int(x) for x in distributed.all_reduce_np(np.array([doc["written"], doc["tokens_written"]])))
    complete = job.writer.finalize(doc["shards"]) if distributed.world().is_main else False
    distributed.barrier()
    man = job.writer.manifest if distributed.world().is_main else read_manifest(job.writer.path)
    if not (complete or man.get("complete")):  # every shard was some rank's: a store left unfinished is an error
        from cbtool.embedding import raise_unfinished

        raise_unfinished(job.writer, doc["shards"])
    return {**doc, "written": written, "skipped": doc["shards"] - written, "tokens_written": tokens,
            "complete": bool(man.get("complete")), "tokens": man.get("tokens"), "docs": man.get("docs"),
            "tokens_per_s": round(tokens / max(doc["seconds"], 1e-9), 1)}


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
