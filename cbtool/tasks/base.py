"""The task a checkpoint was trained on: one type for TokFSM (cbtool/tasks/tokfsm.py) and text (cbtool/tasks/text.py).

`Checkpoint.task` is always a `Task`; training, `eval`, `embed`, `intervene` and `info` use only
this interface, so they behave the same on TokFSM, text and pretrained-base checkpoints.
A task is recorded in cbtool.json as its `task_meta()` and `tokenizer_meta()`, plus the files of
`files()` (docs/formats.md); `cbtool.formats.checkpoint.build_task` rebuilds it from there.

Documents: what every corpus (TokFSM, text files) is turned into before embedding or search.
A `Document` carries its token ids, its text, and for every token the [start, end) character span
it covers in that text, so regex matches over text map exactly onto tokens. Labels are optional
per-token integers (TokFSM: the state; -1 where a token has none, e.g. BOS). A `Corpus` is what a
task hands to `embed`: documents plus what the code store records about them (docs/formats.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # torch is imported where a task runs, not to read a store (docs/cli.md "Start-up")
    import torch

    from cbtool.model.sites import CodebookModel


@runtime_checkable
class Task(Protocol):
    """Batches, held-out evaluation, prompts (encode/decode), documents to embed, and its cbtool.json entries."""

    name: str  # "tokfsm" or "text": the `name` of cbtool.json's "task"
    # evaluation result keys -> (heading, format) in the order people read them (eval, info, train)
    metrics: dict[str, tuple[str, str]]

    @property
    def vocab_size(self) -> int: ...

    @property
    def block_size(self) -> int:
        """Tokens per training sequence: the model reads block_size - 1 and predicts the next of each."""
        ...

    @property
    def train_tokens(self) -> int | None:
        """Tokens of training data (what k-means can draw on); None: unlimited (generated)."""
        ...

    def train_batch(self, n: int, seed: int, step: int) -> torch.Tensor:
        """(n, block_size) token ids, a pure function of (seed, step) so `--resume` is exact."""
        ...

    def evaluate(self, model: CodebookModel, device: torch.device | str, *, samples: int = 512, seed: int = 0,
                 temperature: float = 1.0, blocks: int = 256) -> dict[str, Any]:
        """Held-out figures with codebooks on and bypassed ({"on": {...}, "bypassed": {...}, "code_usage": ...}).

        TokFSM uses samples/seed/temperature (sampled transitions), text uses blocks (held-out blocks)."""
        ...

    def eval_setting(self, result: dict[str, Any]) -> str:
        """What an evaluation measured, for a table title (e.g. '512 samples, T=1.0')."""
        ...

    def encode(self, text: str) -> list[int]:
        """A prompt -> token ids (never empty)."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def corpus(self, path: Path | None = None, text_field: str = "text", num_seqs: int = 2048,
               seed: int = 0, split: str = "all") -> Corpus:
        """Documents to embed: `path` (a text corpus) or, with None, the task's own data
        (TokFSM: `num_seqs` fresh held-out sequences from stream `seed`; text: the training corpus, or
        with `split` "heldout"/"train" its held-out / training documents)."""
        ...

    def summary(self) -> str:
        """One line for the training log."""
        ...

    def task_meta(self) -> dict[str, Any]:
        """cbtool.json "task"."""
        ...

    def tokenizer_meta(self) -> dict[str, Any]:
        """cbtool.json "tokenizer"."""
        ...

    def files(self) -> dict[str, bytes]:
        """Extra checkpoint files (name -> bytes), e.g. tokenizer.json."""
        ...


def format_metrics(task: Task, row: dict[str, Any]) -> str:
    """'loss 0.1234  transition accuracy 0.950': the metrics of one result row that it holds."""
    return "  ".join(f"{head} {'n/a' if row[key] is None else format(row[key], fmt)}"
                     for key, (head, fmt) in task.metrics.items() if key in row)



@dataclass
class Document:
    tokens: np.ndarray  # (n,) int64
    text: str
    spans: np.ndarray  # (n, 2) int64 character [start, end) per token; empty span for specials
    labels: np.ndarray | None = None  # (n,) int64, -1 = no label


@dataclass
class Corpus:
    """Documents to embed, with the store manifest's `corpus`, `labels` and `token_strings`."""

    spec: dict[str, Any]
    documents: Iterable[Document]
    labels: list[str]  # names of the per-token labels each document carries (TokFSM: ["state"])
    token_strings: list[str] | None = None  # names of tokens that cover no characters (e.g. BOS)
    expected_tokens: int | None = None  # for a progress bar, when known
