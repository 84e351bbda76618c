"""Documents: what every corpus (TokFSM, text files) is turned into before embedding or search.

A `Document` carries its token ids, its text, and for every token the [start, end) character span
it covers in that text, so regex matches over text map exactly onto tokens. Labels are optional
per-token integers (TokFSM: the state; -1 where a token has none, e.g. BOS).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from cbtool.tokfsm import BOS, TokFSM


@dataclass
class Document:
    tokens: np.ndarray  # (n,) int64
    text: str
    spans: np.ndarray  # (n, 2) int64 character [start, end) per token; empty span for specials
    labels: np.ndarray | None = None  # (n,) int64, -1 = no label


def fsm_document(tokens: np.ndarray, labels: np.ndarray | None = None) -> Document:
    """A TokFSM sequence: text = its digits; BOS covers no characters."""
    tokens = np.asarray(tokens, dtype=np.int64)
    is_digit = (tokens >= 1) & (tokens <= 10)
    ends = np.cumsum(is_digit)
    starts = ends - is_digit
    text = TokFSM.decode(tokens.tolist())
    spans = np.stack([starts, ends], axis=1).astype(np.int64)
    spans[tokens == BOS] = [0, 0]
    return Document(tokens, text, spans, None if labels is None else np.asarray(labels, dtype=np.int64))


def fsm_documents(fsm: TokFSM, num_seqs: int, seed: int, batch: int = 256) -> Iterator[Document]:
    """`num_seqs` fresh TokFSM sequences from a seed (use a held-out seed for analysis)."""
    for i, lo in enumerate(range(0, num_seqs, batch)):
        toks, labels = fsm.batch(min(batch, num_seqs - lo), torch.Generator().manual_seed(seed * 100_003 + i))
        for t, lab in zip(toks.numpy(), labels.numpy(), strict=True):
            yield fsm_document(t, lab)
