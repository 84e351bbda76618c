"""Embedding: a corpus -> documents -> batched forward passes -> code store shards (`cbtool embed`).

The documents come from the checkpoint's task (`Task.corpus`, cbtool/tasks/base.py): TokFSM embeds fresh
sequences of a held-out stream labelled with their states; text embeds a corpus (or the training
corpus) tokenised with the checkpoint's tokenizer. `plan_embed` opens (or reopens) the store and
`EmbedJob.run` writes the shards this worker owns; `embed` does both.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbtool.errors import UserError
from cbtool.formats.checkpoint import Checkpoint
from cbtool.formats.store import (
    ShardArrays,
    StoreWriter,
    checkpoint_ref,
    code_dtype,
    documents_to_arrays,
    match_sites,
    site_entry,
)
from cbtool.tasks.base import Corpus, Document

DEFAULT_SHARD_TOKENS = 1_000_000


@dataclass
class EmbedJob:
    """An opened store and what to write into it (see `plan_embed`)."""

    checkpoint: Checkpoint
    writer: StoreWriter
    corpus: Corpus
    sites: list[str]
    shard_tokens: int
    max_tokens: int | None
    batch_size: int
    device: torch.device
    worker: tuple[int, int]

    @property
    def complete(self) -> bool:
        """The store was already complete when opened: `run` has nothing to do."""
        return bool(self.writer.manifest.get("complete"))

    @property
    def expected_tokens(self) -> int | None:
        n = self.corpus.expected_tokens
        return n if n is None or self.max_tokens is None else min(n, self.max_tokens)

    def run(self, on_tokens: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Write this worker's missing shards; the summary `cbtool embed --json` prints."""
        if self.complete:
            n = self.writer.manifest["num_shards"]
            res: dict[str, Any] = {"shards": n, "written": 0, "skipped": n, "tokens_written": 0, "complete": 1}
        else:
            start = time.perf_counter()
            res = run_embed(self.checkpoint, self.writer, self.corpus.documents, self.sites, self.shard_tokens,
                            self.max_tokens, self.batch_size, self.device, self.worker, on_tokens)
            secs = time.perf_counter() - start
            res["seconds"] = round(secs, 3)
            res["tokens_per_s"] = round(res["tokens_written"] / max(secs, 1e-9), 1)
        man = self.writer.manifest
        return {
            "store": str(self.writer.path),
            "checkpoint": str(self.checkpoint.path),
            "checkpoint_sha256": self.checkpoint.sha256,
            "complete": bool(res.pop("complete")),
            "tokens": man.get("tokens"),
            "docs": man.get("docs"),
            "sites": self.sites,
            "labels": self.corpus.labels,
            **res,
        }


def plan_embed(
    checkpoint: Checkpoint, out: Path, corpus: Path | None = None, *, text_field: str = "text",
    num_seqs: int = 2048, seed: int = 0, split: str = "all", sites: str | None = None, batch_size: int = 64,
    max_tokens: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, worker: tuple[int, int] = (0, 1),
    device: torch.device | str | None = None, overwrite: bool = False,
) -> EmbedJob:
    """Check the arguments, choose the documents (`corpus` None: the task's own, see `Task.corpus`) and
    open the store at `out` (creating it, or reopening a compatible one to resume)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    model = checkpoint.model
    chosen = match_sites(list(model.sites), sites, f"checkpoint {checkpoint.path}")
    docs = checkpoint.task.corpus(None if corpus is None else Path(corpus), text_field, num_seqs, seed, split)
    vocab = int(model.base.config.vocab_size)
    if checkpoint.task.vocab_size > vocab:
        raise UserError(f"tokenizer has {checkpoint.task.vocab_size} tokens but the model only {vocab}: mismatch")
    plan = {
        "checkpoint": checkpoint_ref(checkpoint.path, Path(out), checkpoint.sha256),
        "corpus": docs.spec,
        "shard_tokens": shard_tokens,
        "max_tokens": max_tokens,
        "sites": [site_entry(model.sites[n]) for n in chosen],
        "labels": docs.labels,
        "token_strings": docs.token_strings,
    }
    writer = StoreWriter.open(Path(out), plan, overwrite=overwrite)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    return EmbedJob(checkpoint, writer, docs, chosen, shard_tokens, max_tokens, batch_size, dev, worker)


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
    with _stopping_forward(model, [model.codebook(specs[key]) for key in by_module]) as forward:
        for lo in range(0, len(docs), batch_size):
            batch = docs[lo : lo + batch_size]
            lengths = [len(d.tokens) for d in batch]
            t = max(lengths)
            if block is not None and t > block:
                raise UserError(f"a document of {t} tokens exceeds the model's block size {block}")
            idx = np.zeros((len(batch), t), dtype=np.int64)
            for i, d in enumerate(batch):
                idx[i, : lengths[i]] = d.tokens
            forward(torch.from_numpy(idx).to(device))
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


class _Enough(Exception):
    """Every selected codebook has run: the rest of the forward (later layers, the LM head) is not needed."""


@contextmanager
def _stopping_forward(model: torch.nn.Module, codebooks: list[torch.nn.Module]) -> Iterator[Callable[..., None]]:
    """`model`'s forward, stopped once each of `codebooks` has run (their selections are recorded by then):
    embedding through a 30-layer base with codebooks up to layer 20 skips a third of it and the LM head."""
    seen: set[int] = set()

    def hook(module: torch.nn.Module, _args: Any, _output: Any) -> None:
        seen.add(id(module))
        if len(seen) == len(codebooks):
            raise _Enough

    def forward(idx: torch.Tensor) -> None:
        seen.clear()
        try:
            model(idx)
        except _Enough:
            pass

    handles = [cb.register_forward_hook(hook) for cb in codebooks]
    try:
        yield forward
    finally:
        for h in handles:
            h.remove()


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
