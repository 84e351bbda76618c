"""`cbtool embed` engine: corpora -> documents -> batched forward passes -> store shards.

Corpora:
- TokFSM (the checkpoint's own task): `num_seqs` fresh sequences from a held-out seed stream
  (disjoint from training and evaluation seeds), labelled with their states.
- Text (`--corpus PATH`): `documents_for(checkpoint, corpus_path, text_field)` — the extension
  point for checkpoints that carry a text tokenizer. It must yield `Document`s (token ids, text,
  per-token character spans) that fit the model's block size.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbtool.checkpoint import Checkpoint
from cbtool.corpus import Document, fsm_documents
from cbtool.errors import UserError
from cbtool.store import ShardArrays, StoreWriter, code_dtype, documents_to_arrays

# Analysis sequences come from seeds (HELD_OUT_SEED + --seed) * 100_003 + batch: far from any
# training stream (seed * 1_000_003 + step * 7919 + 12345 for small seeds) and from eval's.
HELD_OUT_SEED = 2**40


def documents_for(checkpoint: Checkpoint, corpus_path: Path, text_field: str = "text") -> Iterator[Document]:
    """Documents of a text corpus (.txt, .jsonl with `text_field`, or a folder of them).

    Extension point: needs a checkpoint with a text tokenizer (tokenizer with character offsets)."""
    tok = checkpoint.meta.get("tokenizer") or {}
    if tok.get("kind") in ("bpe", "hf"):  # text checkpoints (cbtool.text)
        from cbtool.text import checkpoint_documents

        return checkpoint_documents(checkpoint, corpus_path, text_field)
    if tok.get("kind") in (None, "tokfsm"):
        raise UserError("text corpora need a checkpoint with a text tokenizer")
    raise UserError(f"text corpora are not supported yet for tokenizer kind {tok.get('kind')!r}")


def tokfsm_corpus(
    checkpoint: Checkpoint, num_seqs: int, seed: int
) -> tuple[dict[str, Any], Iterator[Document]]:
    if checkpoint.task is None:
        raise UserError(f"checkpoint {checkpoint.path} has no built-in task; give --corpus PATH")
    if num_seqs < 1:
        raise UserError(f"empty corpus: --num-seqs must be >= 1, got {num_seqs}")
    spec = {
        **checkpoint.task.spec.to_dict(),
        "num_seqs": num_seqs,
        "seed": seed,
        "stream": "held-out",
        "held_out_seed": HELD_OUT_SEED + seed,
    }
    return spec, fsm_documents(checkpoint.task, num_seqs, HELD_OUT_SEED + seed)


def truncate(doc: Document, n: int) -> Document:
    """The first n tokens of a document (text cut after the last kept token's characters)."""
    end = int(doc.spans[:n, 1].max()) if n else 0
    labels = None if doc.labels is None else doc.labels[:n]
    return Document(doc.tokens[:n], doc.text[:end], doc.spans[:n], labels)


def plan_shards(
    docs: Iterable[Document], shard_tokens: int, max_tokens: int | None
) -> Iterator[list[Document]]:
    """Group documents into shards of >= shard_tokens tokens (whole documents; the last may be short);
    stop at max_tokens, cutting the last document to fit."""
    shard: list[Document] = []
    n_shard = total = 0
    for doc in docs:
        if max_tokens is not None and total + len(doc.tokens) > max_tokens:
            doc = truncate(doc, max_tokens - total)
        if len(doc.tokens):
            shard.append(doc)
            n_shard += len(doc.tokens)
            total += len(doc.tokens)
        if n_shard >= shard_tokens:
            yield shard
            shard, n_shard = [], 0
        if max_tokens is not None and total >= max_tokens:
            break
    if shard:
        yield shard


@torch.inference_mode()
def embed_shard(
    checkpoint: Checkpoint,
    docs: list[Document],
    sites: list[str],
    batch_size: int,
    device: torch.device,
    on_tokens: Callable[[int], None] | None = None,
) -> ShardArrays:
    """Run a shard's documents through the model (codebooks on) and collect top-k ids per site."""
    model = checkpoint.model
    arrays = documents_to_arrays(docs)
    by_module: dict[str, list[tuple[str, int]]] = {}
    for name in sites:
        site = model.sites[name]
        by_module.setdefault(site.spec.key, []).append((name, site.group))
    specs = {s.key: s for s in model.specs}
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in sites}
    block = getattr(getattr(model.base, "config", None), "block_size", None)
    for lo in range(0, len(docs), batch_size):
        batch = docs[lo : lo + batch_size]
        lengths = [len(d.tokens) for d in batch]
        t = max(lengths)
        if block is not None and t > block:
            raise UserError(f"a document of {t} tokens exceeds the model's block size {block}")
        idx = np.zeros((len(batch), t), dtype=np.int64)
        for i, d in enumerate(batch):
            idx[i, : lengths[i]] = d.tokens
        model(torch.from_numpy(idx).to(device))
        keep = None
        if min(lengths) != t:
            keep = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).reshape(-1)
        for key, members in by_module.items():
            cb = model.codebook(specs[key])
            sel = cb.last
            assert sel is not None
            ids = sel.ids.reshape(len(batch) * t, cb.groups, cb.k).cpu().numpy()
            if keep is not None:
                ids = ids[keep]
            for name, g in members:
                chunks[name].append(ids[:, g, :].astype(code_dtype(cb.num_codes)))  # small while held
        if on_tokens is not None:
            on_tokens(sum(lengths))
    arrays.codes = {name: np.concatenate(parts) for name, parts in chunks.items()}
    return arrays


def run_embed(
    checkpoint: Checkpoint,
    writer: StoreWriter,
    docs: Iterable[Document],
    sites: list[str],
    shard_tokens: int,
    max_tokens: int | None,
    batch_size: int,
    device: torch.device,
    worker: tuple[int, int] = (0, 1),
    on_tokens: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Embed every shard this worker owns that is not complete yet; finalize when all are done."""
    model = checkpoint.model
    selected_modules = {model.sites[n].spec.key for n in sites}
    for spec, cb in model.items():
        cb.record = spec.key in selected_modules
        cb.last = None
    written = skipped = tokens = 0
    num_shards = 0
    try:
        for index, shard_docs in zip(
            itertools.count(), plan_shards(docs, shard_tokens, max_tokens), strict=False
        ):
            num_shards = index + 1
            if index % worker[1] != worker[0] or writer.is_complete(index):
                skipped += 1
                continue
            with writer.claim(index):
                if writer.is_complete(index):  # finished by another writer meanwhile
                    skipped += 1
                    continue
                arrays = embed_shard(checkpoint, shard_docs, sites, batch_size, device, on_tokens)
                tokens += writer.write_shard(index, arrays)
                written += 1
    finally:
        model.set_record(False)
    if num_shards == 0:
        raise UserError("empty corpus: no tokens to embed")
    complete = writer.finalize(num_shards)
    return {
        "shards": num_shards,
        "written": written,
        "skipped": skipped,
        "tokens_written": tokens,
        "complete": int(complete),
    }
