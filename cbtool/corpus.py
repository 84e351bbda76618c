"""Documents: what every corpus (TokFSM, text files) is turned into before embedding or search.

A `Document` carries its token ids, its text, and for every token the [start, end) character span
it covers in that text, so regex matches over text map exactly onto tokens. Labels are optional
per-token integers (TokFSM: the state; -1 where a token has none, e.g. BOS). A `Corpus` is what a
task hands to `embed`: documents plus what the code store records about them (docs/formats.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


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
