"""Text: byte-level BPE tokenizers, Documents with exact char spans, and the text `Task`. The corpora themselves
are read by cbtool/tasks/corpora.py (docs/language-models.md).

Tokenizers are `tokenizers.Tokenizer` objects (trained here, or the fast tokenizer of a Hugging
Face model) saved in the checkpoint as `tokenizer.json`. Every token keeps the [start, end)
character span it covers, so regex matches over the text map exactly onto tokens.

Training data: every source text is tokenised, sources are joined with the end-of-text token and
cut into blocks of `seq_len + 1` tokens; every 20th block is held out for `eval`. A training batch
is a pure function of (seed, step), like TokFSM's, so `--resume` stays exact.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbtool.errors import CbtoolWarning, UserError, first_line
from cbtool.model.sites import CodebookModel
from cbtool.tasks.base import Corpus, Document
from cbtool.tasks.corpora import BUILTIN_NAME, Source, corpus_sha256, is_named_corpus, load_sources
from cbtool.tasks.evaluate import mean_loss, on_vs_bypassed
from cbtool.util import progress
from cbtool.util.files import read_text

TOKENIZER_FILE = "tokenizer.json"
EOT = "<|endoftext|>"
HOLDOUT_EVERY = 20  # every 20th document (or block, see HOLDOUT_MIN_DOCS) is held out
HOLDOUT_MIN_DOCS = 5 * HOLDOUT_EVERY  # >= 5 held-out documents; smaller corpora hold out every 20th block instead
SPLITS = ("all", "heldout", "train")  # `embed --split`: documents of a text checkpoint's own corpus


def _need_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UserError("text tasks need the `tokenizers` package: pip install tokenizers (the text extra: "
                        "pip install -e '.[text]' in the cbtool checkout)") from None
    return tokenizers


# -- tokenizers -----------------------------------------------------------------------------------
class TextTokenizer:
    """A `tokenizers.Tokenizer` with exact char spans and an end-of-text id."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eot_id = self._find_eot()

    def _find_eot(self) -> int:
        for name in (EOT, "</s>", "<|im_end|>", "<eos>", "<s>"):
            i = self.tok.token_to_id(name)
            if i is not None:
                return int(i)
        return 0

    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size(with_added_tokens=True))

    def to_str(self) -> str:
        return self.tok.to_str()

    @classmethod
    def from_str(cls, s: str) -> TextTokenizer:
        tokenizers = _need_tokenizers()
        try:
            return cls(tokenizers.Tokenizer.from_str(s))
        except Exception as e:  # noqa: BLE001 - any parse failure is bad input
            raise UserError(f"invalid tokenizer.json: {str(e).splitlines()[0] if str(e) else e}") from None

    @classmethod
    def from_file(cls, path: Path) -> TextTokenizer:
        return cls.from_str(read_text(Path(path), "tokenizer"))

    def encode_many(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Token ids and char spans (n, 2) for each text, no special tokens added."""
        out = []
        for enc in self.tok.encode_batch(texts, add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int64)
            spans = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            out.append((ids, spans))
        return out

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_strings(self) -> list[str]:
        return [self.decode([i]) for i in range(self.vocab_size)]


def train_bpe(sources: list[Source], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE (GPT-2 style, spans not trimmed) trained offline on the corpus."""
    tokenizers = _need_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise UserError(f"--vocab-size must be >= 300 for a byte-level BPE, got {vocab_size}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((s.text for s in sources), trainer=trainer)
    return TextTokenizer(tok)


# The last Hugging Face tokenizer loaded in this process (tokenizer.json text), keyed like hf's bases.
_TOKENIZERS: dict[tuple[str, str | None, str], str] = {}


def load_hf_tokenizer(path: str | Path, gguf_file: str | None = None):
    """A Hugging Face model's fast tokenizer as a `TextTokenizer` (offsets untrimmed)."""
    from cbtool.model import hf

    p = Path(path)
    tokenizers = _need_tokenizers()
    key = (str(p.resolve()), gguf_file, hf.content_hash(p, gguf_file)) if p.is_dir() else None
    if key is not None and key in _TOKENIZERS:
        return TextTokenizer.from_str(_TOKENIZERS[key])
    if gguf_file is None and (p / "tokenizer.json").is_file():
        try:
            tok = tokenizers.Tokenizer.from_file(str(p / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - a broken file is bad input
            raise UserError(f"{p / 'tokenizer.json'}: cannot read the tokenizer ({first_line(e)})") from None
    else:
        transformers = hf._transformers()
        kw: dict[str, Any] = {"local_files_only": True}
        if gguf_file is not None:
            kw["gguf_file"] = gguf_file
        try:
            with progress.track(f"loading the tokenizer of {gguf_file or p.name}", None, "tokenizers"):
                fast = transformers.AutoTokenizer.from_pretrained(str(p), use_fast=True, **kw)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--base-model {p}: cannot load its tokenizer ({first_line(e)})") from None
        tok = getattr(fast, "backend_tokenizer", None)
        if tok is None:
            raise UserError(f"--base-model {p}: only fast (tokenizers) tokenizers are supported")
    _untrim_offsets(tok)
    if key is not None:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tok.to_str()
    return TextTokenizer(tok)


def _untrim_offsets(tok: Any) -> None:
    """Byte-level post-processors trim spaces from offsets; cbtool never adds special tokens while
    encoding, so dropping the post-processor keeps every token's span exact."""
    try:
        tok.post_processor = None
    except (TypeError, AttributeError, ValueError):
        pass


def checkpoint_tokenizer(ckpt_path: Path) -> TextTokenizer:
    f = Path(ckpt_path) / TOKENIZER_FILE
    if not f.is_file():
        raise UserError(f"checkpoint {ckpt_path} has no {TOKENIZER_FILE}: it is not a text checkpoint")
    return TextTokenizer.from_file(f)


# -- documents --------------------------------------------------------------------------------------
def text_documents(tok: TextTokenizer, sources: list[Source], max_tokens: int) -> Iterator[Document]:
    """Documents of at most `max_tokens` tokens: long texts are cut at token boundaries; each
    Document's text is its own slice and its spans index into that slice."""
    if max_tokens < 1:
        raise UserError("documents need at least 1 token")
    for batch_lo in range(0, len(sources), 256):
        batch = sources[batch_lo: batch_lo + 256]
        for src, (ids, spans) in zip(batch, tok.encode_many([s.text for s in batch]), strict=True):
            for lo in range(0, len(ids), max_tokens):
                t, sp = ids[lo: lo + max_tokens], spans[lo: lo + max_tokens]
                if len(t) == 0:
                    continue
                c0 = int(sp[0, 0])
                c1 = int(sp[:, 1].max())
                if lo + max_tokens >= len(ids):
                    c1 = len(src.text)
                yield Document(t.copy(), src.text[c0:c1], sp - c0, None)


# -- packed training data ---------------------------------------------------------------------------
def holdout_kind(num_sources: int) -> str:
    """"documents" (whole documents held out: never seen in training or k-means) when the corpus has at
    least HOLDOUT_MIN_DOCS of them, else "blocks" (every HOLDOUT_EVERY-th packed block)."""
    return "documents" if num_sources >= HOLDOUT_MIN_DOCS else "blocks"


def split_sources(sources: list[Source], holdout: str) -> tuple[list[Source], list[Source]]:
    """(training, held-out) documents under a document-level split; everything trains under "blocks"."""
    if holdout != "documents":
        return list(sources), []
    held = [i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1 for i in range(len(sources))]
    return ([s for s, h in zip(sources, held, strict=True) if not h],
            [s for s, h in zip(sources, held, strict=True) if h])


def _stream(tok: TextTokenizer, sources: list[Source]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sources as one token stream, each followed by the end-of-text token: (ids, the source index of each
    token (-1: end-of-text), each token's [start, end) span in its source text)."""
    encoded = tok.encode_many([s.text for s in sources])
    if not encoded:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 2), np.int64)
    ids = np.concatenate([np.r_[ids, tok.eot_id] for ids, _ in encoded]).astype(np.int64)
    src = np.concatenate([np.r_[np.full(len(ids), i), -1] for i, (ids, _) in enumerate(encoded)]).astype(np.int64)
    spans = np.concatenate([np.r_[sp.reshape(-1, 2), [[0, 0]]] for _, sp in encoded]).astype(np.int64)
    return ids, src, spans


def _pack(tok: TextTokenizer, sources: list[Source], width: int) -> tuple[torch.Tensor, int]:
    """Sources joined with the end-of-text token and cut into (n, width) blocks; and the token count."""
    stream = _stream(tok, sources)[0]
    n = stream.size // width
    return torch.from_numpy(stream[: n * width].reshape(n, width).copy()), int(stream.size)


def heldout_block_mask(n: int) -> np.ndarray:
    """Which of `n` packed blocks block-level holdout keeps out: every HOLDOUT_EVERY-th (the last when none)."""
    held = np.arange(n) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    if n and not held.any():
        held[-1] = True
    return held


def block_documents(tok: TextTokenizer, sources: list[Source], width: int, heldout: bool) -> Iterator[Document]:
    """Under block-level holdout: the input tokens (the first `width - 1`, what the model reads) of the
    held-out (or the training) packed blocks of `width` tokens, as Documents cut where a source text ends (the
    end-of-text tokens between them are dropped), each token with its exact span in its source text."""
    ids, src, spans = _stream(tok, sources)
    held = heldout_block_mask(len(ids) // width)
    for b in np.flatnonzero(held if heldout else ~held):
        lo = int(b) * width
        s = src[lo: lo + width - 1]
        cuts = np.flatnonzero(s[1:] != s[:-1]) + 1
        for a, z in zip(np.r_[0, cuts], np.r_[cuts, len(s)], strict=True):
            if s[a] < 0:
                continue
            sp = spans[lo + a: lo + z]
            c0, c1 = int(sp[0, 0]), int(sp[:, 1].max())
            yield Document(ids[lo + a: lo + z].copy(), sources[int(s[a])].text[c0:c1], sp - c0, None)


def _mix(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 424242) % (2**63)


class TextTask:
    """The text `Task` (cbtool/tasks/base.py): a tokenizer and a corpus cut into packed blocks of `seq_len + 1`
    tokens with a held-out split: `holdout` "documents" holds every HOLDOUT_EVERY-th source document out
    whole (corpora of at least HOLDOUT_MIN_DOCS documents); "blocks" (smaller corpora, and checkpoints made
    before document-level holdout existed) every HOLDOUT_EVERY-th packed block.

    Built for training from the sources in hand, or from a checkpoint (`from_meta`), where the
    tokenizer (tokenizer.json) and the corpus are read only when first needed: `info`, `embed
    --corpus` and `intervene` never read the training corpus."""

    name = "text"
    metrics = {"loss": ("LM loss (nats/token)", ".4f"), "perplexity": ("perplexity", ".2f")}

    def __init__(self, tok: TextTokenizer | Callable[[], TextTokenizer], corpus: str | None, text_field: str,
                 seq_len: int, tokenizer_kind: str = "bpe", sources: list[Source] | None = None,
                 base_dir: Path | None = None, holdout: str | None = None, corpus_sha256: str | None = None) -> None:
        """`corpus` None or "shakespeare": the built-in corpus; a relative path is relative to `base_dir`
        (a checkpoint directory); `sources`: the corpus already read; `corpus_sha256`: its hash (`corpus_sha256`)
        as read then; reading the corpus again warns (CbtoolWarning) when it now hashes differently."""
        if seq_len < 2:
            raise UserError(f"--seq-len must be >= 2, got {seq_len}")
        self._tok, self.corpus_name, self.text_field, self.seq_len = tok, corpus, text_field, seq_len
        self.tokenizer_kind, self._sources, self._base_dir = tokenizer_kind, sources, base_dir
        self._holdout, self._sha256 = holdout, corpus_sha256

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: Path) -> TextTask:
        """The text task of a checkpoint: its tokenizer.json, corpus, text field and block length."""
        task, tok = meta["task"], meta.get("tokenizer") or {}
        try:
            seq_len = int(task.get("seq_len", 128))
            corpus = task.get("corpus")
            if corpus is not None and not isinstance(corpus, str):
                raise TypeError("corpus is not a string")
        except (TypeError, ValueError) as e:
            raise UserError(f"malformed text task in {where / 'cbtool.json'}: {e}") from None
        return cls(lambda: checkpoint_tokenizer(where), corpus, task.get("text_field") or "text", seq_len,
                   str(tok.get("kind") or "bpe"), base_dir=where, holdout=str(task.get("holdout") or "blocks"),
                   corpus_sha256=task.get("corpus_sha256"))

    @cached_property
    def tok(self) -> TextTokenizer:
        return self._tok if isinstance(self._tok, TextTokenizer) else self._tok()

    def _corpus_path(self, corpus: str | Path | None) -> str | None:
        if corpus is None or corpus == BUILTIN_NAME:
            return None
        if is_named_corpus(corpus):
            return str(corpus)
        p = Path(corpus)
        return str(p if p.is_absolute() or self._base_dir is None else self._base_dir / p)

    @cached_property
    def sources(self) -> list[Source]:
        if self._sources is not None:
            return self._sources
        path = self._corpus_path(self.corpus_name)
        sources = load_sources(path, self.text_field)
        now = corpus_sha256(path)
        if self._sha256 is not None and now != self._sha256:
            ckpt = f"checkpoint {self._base_dir}" if self._base_dir is not None else "the checkpoint"
            warnings.warn(f"the corpus {path or BUILTIN_NAME} has changed since {ckpt} was trained on it (its "
                          f"sha256 differs from the one in cbtool.json); results are for its current text",
                          CbtoolWarning, stacklevel=2)
        self._sha256 = now
        return sources

    @property
    def holdout(self) -> str:
        """ "documents" or "blocks" (see the class docstring)."""
        if self._holdout is None:
            self._holdout = holdout_kind(len(self.sources))
        return self._holdout

    @cached_property
    def _blocks(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        width = self.seq_len + 1
        train_src, held_src = split_sources(self.sources, self.holdout)
        blocks, num_tokens = _pack(self.tok, train_src, width)
        if self.holdout == "documents":
            held_blocks, held_tokens = _pack(self.tok, held_src, width)
            if blocks.shape[0] < 1 or held_blocks.shape[0] < 1:
                raise UserError(f"corpus too small: its training or held-out documents make no block of {width} "
                                f"tokens; use more text or a smaller --seq-len")
            return num_tokens + held_tokens, blocks, held_blocks
        n = blocks.shape[0]
        if n < 2:
            raise UserError(f"corpus too small: {num_tokens} tokens make fewer than 2 blocks of {width}; "
                            f"use more text or a smaller --seq-len")
        held = torch.from_numpy(heldout_block_mask(n))
        return num_tokens, blocks[~held], blocks[held]

    @property
    def num_tokens(self) -> int:
        return self._blocks[0]

    @property
    def train_blocks(self) -> torch.Tensor:
        return self._blocks[1]

    @property
    def heldout_blocks(self) -> torch.Tensor:
        return self._blocks[2]

    @property
    def train_tokens(self) -> int | None:
        return int(self.train_blocks.shape[0]) * self.seq_len

    # -- the Task interface -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    @property
    def block_size(self) -> int:
        return self.seq_len + 1

    def train_batch(self, n: int, seed: int, step: int) -> torch.Tensor:
        """n training blocks (n, seq_len + 1) drawn with a generator seeded by (seed, step)."""
        g = torch.Generator().manual_seed(_mix(seed, step))
        pick = torch.randint(0, self.train_blocks.shape[0], (n,), generator=g)
        return self.train_blocks[pick]

    def evaluate(self, model: CodebookModel, device: torch.device | str, *, samples: int = 512, seed: int = 0,
                 temperature: float = 1.0, blocks: int = 256) -> dict[str, Any]:
        """LM loss and perplexity on the first `blocks` held-out blocks, codebooks on vs bypassed
        (samples/seed/temperature do not apply)."""
        held = self.heldout_blocks[: max(1, blocks)]

        def measure() -> dict[str, Any]:
            loss = mean_loss(model, held.split(16), device)
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

        result = on_vs_bypassed(model, measure, held.split(16), device)
        result["heldout_tokens"] = int(held.shape[0] * (held.shape[1] - 1))
        result["loss_increase"] = result["on"]["loss"] - result["bypassed"]["loss"]
        return result

    def eval_setting(self, result: dict[str, Any]) -> str:
        return f"{result['heldout_tokens']:,} held-out tokens"

    def encode(self, text: str) -> list[int]:
        """Prompt text -> token ids (an empty prompt is the end-of-text token)."""
        ids = self.tok.encode(text)
        return ids if ids else [self.tok.eot_id]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def corpus(self, path: Path | None = None, text_field: str = "text", num_seqs: int = 2048,
               seed: int = 0, split: str = "all") -> Corpus:
        """A corpus (None: the training corpus; with `split` "heldout"/"train" only its held-out / training
        documents, or under block-level holdout the tokens of its held-out / training blocks) as Documents of
        at most seq_len (+1 for blocks) tokens, tokenised with this task's tokenizer (num_seqs and seed do not
        apply)."""
        if split not in SPLITS:
            raise UserError(f"unknown --split {split!r}: use {', '.join(SPLITS)}")
        if path is None:
            corpus, text_field = self._corpus_path(self.corpus_name), self.text_field
            spec = {"kind": "text", "path": corpus or BUILTIN_NAME, "text_field": text_field, "split": split}
            sources = self.sources
            if split != "all":
                spec["holdout"] = self.holdout
                if self.holdout == "blocks":
                    docs = block_documents(self.tok, sources, self.seq_len + 1, split == "heldout")
                    return Corpus(spec, docs, [])
                train, held = split_sources(sources, self.holdout)
                sources = held if split == "heldout" else train
            return Corpus(spec, text_documents(self.tok, sources, self.seq_len), [])
        if split != "all":
            raise UserError("--split selects documents of the checkpoint's own corpus: drop --corpus")
        if not Path(path).exists():
            raise UserError(f"corpus {path} does not exist")
        spec = {"kind": "text", "path": str(Path(path).resolve()), "text_field": text_field}
        return Corpus(spec, text_documents(self.tok, load_sources(str(path), text_field), self.seq_len), [])

    def summary(self) -> str:
        return (f"text corpus: {self.num_tokens:,} tokens, {self.train_blocks.shape[0]} training / "
                f"{self.heldout_blocks.shape[0]} held-out blocks of {self.seq_len}")

    def task_meta(self) -> dict[str, Any]:
        return {"name": "text", "corpus": self.corpus_name, "text_field": self.text_field,
                "seq_len": self.seq_len, "tokens": self.num_tokens,
                "train_blocks": int(self.train_blocks.shape[0]),
                "heldout_blocks": int(self.heldout_blocks.shape[0]), "holdout_every": HOLDOUT_EVERY,
                "holdout": self.holdout, "corpus_sha256": self.corpus_sha256}

    @property
    def corpus_sha256(self) -> str:
        """The hash (`corpus_sha256`) of the corpus as this task read it."""
        self.sources  # noqa: B018 - reading the corpus from disk hashes it
        if self._sha256 is None:
            self._sha256 = corpus_sha256(self._corpus_path(self.corpus_name))
        return self._sha256

    def tokenizer_meta(self) -> dict[str, Any]:
        return {"kind": self.tokenizer_kind, "file": TOKENIZER_FILE, "vocab_size": self.vocab_size,
                "eot_id": self.tok.eot_id}

    def files(self) -> dict[str, bytes]:
        return {TOKENIZER_FILE: self.tok.to_str().encode("utf-8")}
