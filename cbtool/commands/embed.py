"""`cbtool embed`: run a corpus through a checkpoint and store every token's top-k codes per site."""

from __future__ import annotations

import re
import time
from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cbtool.checkpoint import load_checkpoint
from cbtool.commands.common import (
    DEVICE_HELP,
    RUN_OPTION_HELP,
    default_checkpoint,
    default_store,
    emit_json,
    err,
    out,
)
from cbtool.embedding import documents_for, run_embed, tokfsm_corpus
from cbtool.errors import UserError
from cbtool.store import StoreWriter, _site_entry, code_dtype, match_sites
from cbtool.tokfsm import TokFSM
from cbtool.train import resolve_device


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
        "the checkpoint was trained on (heldout/train need its document-level holdout)."
    ),
    sites: str | None = typer.Option(
        None,
        "--sites",
        help="Site globs, comma-separated, e.g. '*.mlp' or '0.attn.h*,3.mlp' (default: every site).",
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Sequences per forward pass."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Stop after this many tokens."),
    shard_tokens: int = typer.Option(1_000_000, "--shard-tokens", help="Tokens per shard (whole documents)."),
    worker: str | None = typer.Option(
        None, "--worker", help="I/N: write only shards with index % N == I (run N processes on one store)."
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing store at --out first."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """Run a corpus through a checkpoint (codebooks on) and store each token's top-k code ids per site.

    Re-running resumes after the shards already written.

    Examples:
      cbtool embed                                   # TokFSM: 2048 held-out sequences -> RUN/codes
      cbtool embed --num-seqs 4000 --sites '*.mlp' --out runs/a/codes-mlp
      cbtool embed --worker 0/2 & cbtool embed --worker 1/2   # two processes, one store
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    work = _parse_worker(worker)
    dev = resolve_device(device)
    ckpt = load_checkpoint(default_checkpoint(checkpoint, run), device=dev)
    chosen = match_sites(list(ckpt.model.sites), sites, f"checkpoint {ckpt.path}")
    labels: list[str]
    if split not in ("all", "heldout", "train"):
        raise UserError(f"unknown --split {split!r}: use heldout, train or all")
    text_task = (ckpt.meta.get("task") or {}).get("name") == "text"
    if corpus is None and text_task:
        from cbtool.text import checkpoint_documents

        docs = checkpoint_documents(ckpt, None, split=split)
        task_meta = ckpt.meta["task"]
        corpus_spec = {"kind": "text", "path": task_meta.get("corpus"), "text_field": task_meta.get("text_field"),
                       "split": split}
        labels = []
        token_strings = None
    elif corpus is not None:
        if not corpus.exists():
            raise UserError(f"corpus {corpus} does not exist")
        docs = documents_for(ckpt, corpus, text_field)
        corpus_spec = {"kind": "text", "path": str(corpus.resolve()), "text_field": text_field}
        labels = []
        token_strings = None
    else:
        corpus_spec, docs = tokfsm_corpus(ckpt, num_seqs, seed)
        corpus_spec = {"kind": "tokfsm", **corpus_spec}
        labels = ["state"]
        token_strings = TokFSM.token_strings()
    target = default_store(out_dir, run)
    plan = {
        "checkpoint": {"path": str(ckpt.path.resolve()), "sha256": ckpt.sha256},
        "corpus": corpus_spec,
        "shard_tokens": shard_tokens,
        "max_tokens": max_tokens,
        "sites": [_site_entry(ckpt.model.sites[n]) for n in chosen],
        "labels": labels,
        "token_strings": token_strings,
    }
    writer = StoreWriter.open(target, plan, overwrite=overwrite)
    if writer.manifest.get("complete"):
        err.print(f"store {target} is complete; nothing to do (--overwrite starts over)", soft_wrap=True)
        res = {
            "shards": writer.manifest["num_shards"],
            "written": 0,
            "skipped": writer.manifest["num_shards"],
            "tokens_written": 0,
            "complete": 1,
        }
    else:
        expected = num_seqs * ckpt.task.spec.seq_len if corpus is None and ckpt.task is not None else None
        if expected is not None and max_tokens is not None:
            expected = min(expected, max_tokens)
        start = time.perf_counter()
        with Progress(
            TextColumn("embedding"),
            BarColumn(),
            TextColumn("{task.completed:,.0f} tokens"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=err,
            disable=not err.is_terminal,
            transient=True,
        ) as bar:
            task = bar.add_task("embed", total=expected, rate="")

            def tick(n: int) -> None:
                done = bar.tasks[0].completed + n
                rate = done / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=n, rate=f"{rate:,.0f} tok/s")

            res = run_embed(ckpt, writer, docs, chosen, shard_tokens, max_tokens, batch_size, dev, work, tick)
        secs = time.perf_counter() - start
        rate = res["tokens_written"] / max(secs, 1e-9)
        err.print(
            f"embedded {res['tokens_written']:,} tokens in {res['written']} shard(s) in {secs:.1f} s "
            f"({rate:,.0f} tokens/s); skipped {res['skipped']} shard(s) already written or not ours",
            soft_wrap=True,
        )
        res["seconds"] = round(secs, 3)
        res["tokens_per_s"] = round(rate, 1)
    man = writer.manifest
    doc = {
        "store": str(target),
        "checkpoint": str(ckpt.path),
        "checkpoint_sha256": ckpt.sha256,
        "complete": bool(res["complete"]),
        "tokens": man.get("tokens"),
        "docs": man.get("docs"),
        "sites": chosen,
        "labels": labels,
        **{k: v for k, v in res.items() if k != "complete"},
    }
    if as_json:
        emit_json("embed", doc)
        return
    if not res["complete"]:
        out.print(
            f"wrote {res['written']} shard(s) of {res['shards']} to {target}; the store is complete once "
            f"every worker has finished"
        )
        return
    table = Table(title=f"code store {target}")
    table.add_column("tokens", justify="right")
    table.add_column("docs", justify="right")
    table.add_column("shards", justify="right")
    table.add_column("sites")
    table.add_column("k / C / dtype")
    e = plan["sites"][0]
    table.add_row(
        f"{man['tokens']:,}",
        f"{man['docs']:,}",
        str(man["num_shards"]),
        f"{len(chosen)}: {', '.join(chosen[:4])}{' ...' if len(chosen) > 4 else ''}",
        f"{e['k']} / {e['num_codes']} / {code_dtype(e['num_codes']).name}",
    )
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
