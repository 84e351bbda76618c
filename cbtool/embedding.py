"""Embedding: a corpus -> documents -> batched forward passes -> code store shards (`cbtool embed`).

The documents come from the checkpoint's task (`Task.corpus`, cbtool/tasks/base.py): TokFSM embeds fresh
sequences of a held-out stream labelled with their states; text embeds a corpus (or the training
corpus) tokenised with the checkpoint's tokenizer. `plan_embed` opens (or reopens) the store and
`EmbedJob.run` writes the shards this worker owns; `embed` does both.

Through an SAE (`cbtool embed --sae DIR --base-model MODEL`, `plan_sae_embed`): the base model runs with no
codebook, the SAE's site is read by a hook (the forward stops there), and the SAE's top-k latents per token are
the store's code ids, with their activations (docs/formats.md "SAE stores").
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
from cbtool.formats.sae import SAEBase, SparseDictionary, TruncationCounter, check_site
from cbtool.formats.store import (
    MANIFEST,
    ShardArrays,
    checkpoint_ref,
    code_dtype,
    documents_to_arrays,
    match_sites,
    sae_ref,
    sae_site_entry,
    site_entry,
)
from cbtool.formats.store_writer import StoreWriter
from cbtool.model.sites import hook_site
from cbtool.tasks.base import Corpus, Document
from cbtool.util import budget

DEFAULT_SHARD_TOKENS = 1_000_000
ACT_MAX = 65504.0  # the largest float16: stored SAE activations are clamped to it


class _StoreJob:
    """What both embed jobs share: their store (`writer`), documents (`corpus`) and token cap (`max_tokens`)."""

    writer: StoreWriter
    corpus: Corpus
    max_tokens: int | None

    @property
    def complete(self) -> bool:
        """The store was already complete when opened: `run` has nothing to do."""
        return bool(self.writer.manifest.get("complete"))

    @property
    def expected_tokens(self) -> int | None:
        n = self.corpus.expected_tokens
        return n if n is None or self.max_tokens is None else min(n, self.max_tokens)

    def run(self, on_tokens: Callable[[int], None] | None = None, close: bool = True) -> dict[str, Any]:
        """Write this worker's missing shards; the summary `cbtool embed --json` prints. The store's writer
        lock is released at the end unless `close` is False (the caller then calls `writer.close()`)."""
        try:
            return self._run(on_tokens)
        finally:
            if close:
                self.writer.close()

    def _run(self, on_tokens: Callable[[int], None] | None) -> dict[str, Any]:
        raise NotImplementedError


def _check_sizes(batch_size: int, shard_tokens: int, max_tokens: int | None) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")


@dataclass
class EmbedJob(_StoreJob):
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

    def _run(self, on_tokens: Callable[[int], None] | None) -> dict[str, Any]:
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
    _check_sizes(batch_size, shard_tokens, max_tokens)
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
    _check_fits(plan["sites"], docs, checkpoint.task.block_size, Path(out), batch_size, shard_tokens, max_tokens,
                overwrite)
    writer = StoreWriter.open(Path(out), plan, overwrite=overwrite, worker=worker)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    return EmbedJob(checkpoint, writer, docs, chosen, shard_tokens, max_tokens, batch_size, dev, worker)


def _check_fits(entries: list[dict[str, Any]], docs: Corpus, block: int, out: Path, batch_size: int,
                shard_tokens: int, max_tokens: int | None, overwrite: bool) -> None:
    """Sizes that cannot fit are refused before a store is opened (cbtool/util/budget.py): each stored token takes
    at least its span (8 bytes), a token id byte and its k code ids per site; a shard is held in memory while it
    is written, and a forward pass holds at least one activation of a site's width per token."""
    per_token = 9 + sum(int(e["k"]) * np.dtype(e["dtype"]).itemsize for e in entries)
    dim = min((int(e["dim"]) for e in entries), default=0)
    budget.check_memory(batch_size * block * 4 * dim, f"--batch-size {batch_size} (sequences of {block} tokens)",
                        "use a smaller --batch-size")
    total = docs.expected_tokens if max_tokens is None or docs.expected_tokens is None \
        else min(docs.expected_tokens, max_tokens)
    budget.check_memory(min(shard_tokens, total or shard_tokens) * per_token, f"--shard-tokens {shard_tokens}",
                        "use a smaller --shard-tokens")
    if total is not None and (overwrite or not (out / MANIFEST).is_file()):  # a new store: all of it is to write
        budget.check_disk(total * per_token, out, f"embedding {total:,} tokens",
                          "use a smaller --num-seqs or --max-tokens, or --out on a larger disk")


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
        for batch, idx, keep in _batches(docs, batch_size, block):
            lengths, t = [len(d.tokens) for d in batch], idx.shape[1]
            forward(torch.from_numpy(idx).to(device))
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


def _batches(docs: list[Document], batch_size: int, block: int | None
             ) -> Iterator[tuple[list[Document], np.ndarray, np.ndarray | None]]:
    """Batches of documents as right-padded token ids (B, T), with the mask (B*T,) of real tokens (None when no
    document is shorter than T)."""
    for lo in range(0, len(docs), batch_size):
        batch = docs[lo : lo + batch_size]
        lengths = [len(d.tokens) for d in batch]
        t = max(lengths)
        if block is not None and t > block:
            raise UserError(f"a document of {t} tokens exceeds the model's block size {block}")
        idx = np.zeros((len(batch), t), dtype=np.int64)
        for i, d in enumerate(batch):
            idx[i, : lengths[i]] = d.tokens
        keep = None
        if min(lengths) != t:
            keep = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).reshape(-1)
        yield batch, idx, keep


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


def raise_unfinished(writer: StoreWriter, num_shards: int) -> None:
    """Every shard was this writer's, yet the store could not be finalised (shards removed or replaced under
    it): an error, never a reported success."""
    missing = [i for i in range(num_shards) if not writer.is_complete(i)]
    raise UserError(f"store {writer.path} could not be finalised: {len(missing)} of {num_shards} shard(s) are "
                    f"missing (first: {missing[0] if missing else '?'}), removed while this embed ran; run it "
                    f"again to finish the store")


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
    if not complete and worker[1] == 1:
        raise_unfinished(writer, num_shards)
    return {
        "shards": num_shards,
        "written": written,
        "skipped": skipped,
        "tokens_written": tokens,
        "complete": int(complete),
    }


# -- through an SAE ---------------------------------------------------------------------------------

@dataclass
class SAEEmbedJob(_StoreJob):
    """An opened store to fill with an SAE's latents at one site of a base model (see `plan_sae_embed`)."""

    sae: SparseDictionary
    base: SAEBase
    site: str
    writer: StoreWriter
    corpus: Corpus
    shard_tokens: int
    max_tokens: int | None
    batch_size: int
    device: torch.device
    worker: tuple[int, int]

    def _run(self, on_tokens: Callable[[int], None] | None) -> dict[str, Any]:
        written = skipped = tokens = num_shards = 0
        start = time.perf_counter()
        if self.complete:
            num_shards = skipped = int(self.writer.manifest["num_shards"])
            complete = True
        else:
            for index, docs in zip(itertools.count(), plan_shards(self.corpus.documents, self.shard_tokens,
                                                                  self.max_tokens), strict=False):
                num_shards = index + 1
                if index % self.worker[1] != self.worker[0] or self.writer.is_complete(index):
                    skipped += 1
                    continue
                with self.writer.claim(index):
                    if self.writer.is_complete(index):
                        skipped += 1
                        continue
                    arrays = embed_sae_shard(self.sae, self.base, self.site, docs, self.batch_size, self.device,
                                             on_tokens)
                    tokens += self.writer.write_shard(index, arrays)
                    written += 1
            if num_shards == 0:
                raise UserError("empty corpus: no tokens to embed")
            complete = self.writer.finalize(num_shards)
            if not complete and self.worker[1] == 1:
                raise_unfinished(self.writer, num_shards)
        secs = time.perf_counter() - start
        man = self.writer.manifest
        return {
            "store": str(self.writer.path), "sae": str(self.sae.path), "base_model": man.get("base_model"),
            "complete": bool(complete), "tokens": man.get("tokens"), "docs": man.get("docs"), "sites": [self.site],
            "labels": self.corpus.labels, "shards": num_shards, "written": written, "skipped": skipped,
            "tokens_written": tokens, "seconds": round(secs, 3),
            "tokens_per_s": round(tokens / max(secs, 1e-9), 1),
            "truncation": (man.get("sae") or {}).get("truncation"),
        }


def plan_sae_embed(
    sae: SparseDictionary, base: SAEBase, out: Path, corpus: Path | None = None, *, site: str | None = None,
    text_field: str = "text", num_seqs: int = 2048, seed: int = 0, split: str = "all", batch_size: int = 64,
    max_tokens: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS, worker: tuple[int, int] = (0, 1),
    device: torch.device | str = "cpu", overwrite: bool = False,
) -> SAEEmbedJob:
    """Check the SAE against the base (site, width), choose the documents (`corpus`, or a cbtool checkpoint's
    own as `plan_embed` does) and open the store at `out`."""
    _check_sizes(batch_size, shard_tokens, max_tokens)
    name, where = check_site(sae, base, site)
    if corpus is None and base.spec.get("kind") == "hf":
        raise UserError("--sae with a Hugging Face --base-model needs --corpus TEXT (.txt, .jsonl or a folder)")
    docs = base.task.corpus(None if corpus is None else Path(corpus), text_field, num_seqs, seed, split)
    plan = {
        "checkpoint": {"path": "", "sha256": None},
        "corpus": docs.spec,
        "shard_tokens": shard_tokens,
        "max_tokens": max_tokens,
        "sites": [sae_site_entry(name, latents=sae.d_sae, k=sae.k, **where)],
        "labels": docs.labels,
        "token_strings": docs.token_strings,
        "sae": {**sae.identity(), "site": name, **sae_ref(sae.path, Path(out))},
        "base_model": base.spec,
    }
    writer = StoreWriter.open(Path(out), plan, overwrite=overwrite, worker=worker)
    dev = torch.device(device)
    sae.to(dev)
    return SAEEmbedJob(sae, base, name, writer, docs, shard_tokens, max_tokens, batch_size, dev, worker)


def fired_slots(ids: torch.Tensor, acts: torch.Tensor, padding: int) -> torch.Tensor:
    """The ids a store keeps: a slot whose activation is 0 (fewer latents active than k) holds `padding` (= d_sae,
    the store's extra last code, which never fires), so every other stored id is a latent that fired."""
    return torch.where(acts > 0, ids, torch.full_like(ids, padding))


@torch.inference_mode()
def capture_site(base: SAEBase, site: str, idx: torch.Tensor) -> torch.Tensor:
    """The activations (B, T, width) at `site` for token ids idx (B, T); the forward stops there."""
    got: list[torch.Tensor] = []

    def grab(x: torch.Tensor) -> None:
        got.append(x.detach())
        raise _Enough

    handle = hook_site(base.locator, site, grab)
    try:
        base.model(idx)
    except _Enough:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"site {site} did not run in the forward pass")
    return got[0]


@torch.inference_mode()
def embed_sae_shard(sae: SparseDictionary, base: SAEBase, site: str, docs: list[Document], batch_size: int,
                    device: torch.device, on_tokens: Callable[[int], None] | None = None) -> ShardArrays:
    """Run a shard's documents through the base model, encode the site's activations with the SAE: ids, float16
    activations and the truncation counts (shard.json `truncation`)."""
    arrays = documents_to_arrays(docs)
    counter = TruncationCounter(sae)
    id_parts, act_parts = [], []
    block = getattr(getattr(base.model, "config", None), "block_size", None)
    block = block or getattr(getattr(getattr(base.model, "base", None), "config", None), "block_size", None)
    for batch, idx, keep in _batches(docs, batch_size, block):
        lengths = [len(d.tokens) for d in batch]
        x = capture_site(base, site, torch.from_numpy(idx).to(device))
        x = x.reshape(idx.size, x.shape[-1])
        if keep is not None:
            x = x[torch.from_numpy(keep).to(x.device)]
        ids, acts = sae.encode(x)
        counter.add(x)
        acts = acts.clamp(max=ACT_MAX).half()  # what the store keeps; a slot fired iff its float16 act is > 0
        id_parts.append(fired_slots(ids, acts, sae.d_sae).cpu().numpy().astype(code_dtype(sae.d_sae + 1)))
        act_parts.append(acts.cpu().numpy())
        if on_tokens is not None:
            on_tokens(sum(lengths))
    arrays.codes = {site: np.concatenate(id_parts)}
    arrays.acts = {site: np.concatenate(act_parts)}
    arrays.meta = {"truncation": counter.counts()}
    return arrays
