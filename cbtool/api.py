"""The Python API: the commands' work as functions that take and return Python objects (docs/api.md).

Each function is what one command does, without the printing: `train_model` (`cbtool train`), `embed` (`cbtool
embed`), `find_codes`, `dead_codes`, `code_contexts` (`cbtool show-code`) and `steer`
(`cbtool intervene`). Bad input raises `cbtool.UserError` with the message the CLI would print.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cbtool.embedding import plan_embed
from cbtool.formats.checkpoint import Checkpoint, load_checkpoint
from cbtool.formats.store import Store
from cbtool.training.start import start_training


def _checkpoint(checkpoint: Checkpoint | str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    return checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(Path(checkpoint), device=device)


def train_model(out: str | Path, preset: str | None = None, *, device: str = "cpu", overwrite: bool = False,
          resume: bool = False, verbose: bool = False, **options: Any) -> Checkpoint:
    """Train a model with codebooks and return its checkpoint (written to `out`).

    `preset`: "default" (None: "default", or with `resume` the stored run's), "paper" or "tiny" (seconds on
    a CPU); `options`: any TrainConfig field (docs/train.md), e.g. `num_codes=64, sites="mlp", task="text",
    corpus="notes.txt"`; with `resume` they must agree with the stored run but for those docs/train.md
    says may change. The held-out results are in `checkpoint.meta["training"]["results"]`. `verbose`: the
    training log on stderr."""
    log = Console(stderr=True, quiet=not verbose, highlight=False)
    trainer = start_training(Path(out), preset, resume=resume, overwrite=overwrite, device=device, log=log,
                             **options)
    trainer.run()
    return load_checkpoint(Path(out), device=trainer.device)


def embed(checkpoint: Checkpoint | str | Path, out: str | Path, corpus: str | Path | None = None,
          **options: Any) -> Store:
    """Run a corpus through a checkpoint and write a code store at `out`; returns the store.

    `corpus` None: the checkpoint's own data (TokFSM: `num_seqs` held-out sequences; text: its training
    corpus). Options: text_field, num_seqs, seed, sites (globs), batch_size, max_tokens, shard_tokens,
    overwrite, device. Re-running resumes an interrupted store."""
    ckpt = _checkpoint(checkpoint, options.pop("device", "cpu"))
    plan_embed(ckpt, Path(out), None if corpus is None else Path(corpus), **options).run()
    return Store(Path(out))
