"""The regexes `cbtool explain` writes (cbtool/explanations/explainer.py), matched with numpy instead of a regex engine.

`explain` renders a hypothesis as an alternation of literals, each optionally after a literal lookbehind and
before a lookahead on the parity of the characters left in the document: `(?:(?<=B1)A1(?=P1)|(?<=B2)A2|...)`,
where A may be any one character (`[\\s\\S]`). When a token's string also occurs elsewhere in the text, the
numbers it reports are the regex's own (`find-codes --regex`), and running the regex engine once per code and
document dominated `explain` on text stores. This module gives the same match ranges as `finditer` over each
document: at the leftmost position where an alternative matches, the first alternative (in pattern order)
that matches there; the next search starts at that match's end. The tests compare it with the regex engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cbtool.explanations.char_classes import code_points


@dataclass(frozen=True)
class Alternative:
    """One branch: `before` must precede the match (lookbehind, "" none), the match is `body` ("" = any one
    character), and `parity` (0 even, 1 odd, None any) is the number of characters after it in its document."""

    before: str
    body: str
    parity: int | None = None


class LiteralText:
    """One shard's text as code points with its document bounds, and the positions of each character."""

    def __init__(self, text: str, doc_chars: np.ndarray) -> None:
        self.chars = code_points(text)
        self.doc_chars = np.asarray(doc_chars, dtype=np.int64)
        self._where: dict[str, np.ndarray] = {}  # one character or a pair -> where it starts
        self._found: dict[Alternative, np.ndarray] = {}

    def where(self, ch: str) -> np.ndarray:
        """Where a character is (cached)."""
        if ch not in self._where:
            self._where[ch] = np.flatnonzero(self.chars == ord(ch))
        return self._where[ch]

    def starts(self, alt: Alternative) -> np.ndarray:
        """Every position where `alt` matches (not yet leftmost / non-overlapping), cached: the same branch
        recurs in many codes' hypotheses. Candidates come from the rarest character of the literal."""
        if alt not in self._found:
            self._found[alt] = self._find(alt)
        return self._found[alt]

    def _pairs(self, pair: str) -> np.ndarray:
        """Where the two characters `pair` start (cached: a few hundred distinct pairs hold all literals)."""
        if pair not in self._where:
            x = self.where(pair[0])
            x = x[x + 1 < len(self.chars)]
            self._where[pair] = x[self.chars[x + 1] == ord(pair[1])]
        return self._where[pair]

    def _find(self, alt: Alternative) -> np.ndarray:
        n, lb, length = len(self.chars), len(alt.before), max(len(alt.body), 1)
        full = alt.before + alt.body
        if len(full) > 1:  # candidates from the literal's rarest character pair, then check the others
            anchor = min(range(len(full) - 1), key=lambda i: (len(self._pairs(full[i : i + 2])), i))
            x = self._pairs(full[anchor : anchor + 2]) - anchor + lb  # match starts, if the literal fits there
            x = x[(x - lb >= 0) & (x - lb + len(full) <= n)]
            for i, ch in enumerate(full):
                if i not in (anchor, anchor + 1) and len(x):
                    x = x[self.chars[x - lb + i] == ord(ch)]
        elif full:
            x = self.where(full) + lb
        else:
            x = np.arange(n, dtype=np.int64)
        x = x[x + length <= n]
        doc = np.searchsorted(self.doc_chars, x, side="right") - 1
        ok = (x - lb >= self.doc_chars[doc]) & (x + length <= self.doc_chars[doc + 1])
        if alt.parity is not None:
            ok &= (self.doc_chars[doc + 1] - x - length) % 2 == alt.parity
        return x[ok]

    def ranges(self, alts: list[Alternative]) -> tuple[np.ndarray, np.ndarray]:
        """[start, end) of the matches of the alternation, as `finditer` over each document gives them."""
        found = [(self.starts(a), i, max(len(a.body), 1)) for i, a in enumerate(alts)]
        starts = np.concatenate([s for s, _, _ in found]) if found else np.zeros(0, np.int64)
        order = np.concatenate([np.full(len(s), i) for s, i, _ in found]) if found else starts
        length = np.concatenate([np.full(len(s), n) for s, _, n in found]) if found else starts
        pick = np.lexsort((order, starts))
        starts, length = starts[pick], length[pick]
        first = np.r_[True, starts[1:] != starts[:-1]] if len(starts) else np.zeros(0, bool)
        starts, ends = starts[first], starts[first] + length[first]
        if len(starts) > 1 and bool(np.any(starts[1:] < ends[:-1])):
            starts, ends = _leftmost_disjoint(starts, ends)
        return starts.astype(np.int64), ends.astype(np.int64)


def _leftmost_disjoint(starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of candidate matches sorted by start (one per start), the ones a left-to-right scan keeps: each next match
    starts at or after the end of the last kept one. A match that starts at or after the end of every earlier
    match is always kept (it heads a run); only the matches inside runs of overlaps are scanned one by one."""
    free = np.r_[True, starts[1:] >= np.maximum.accumulate(ends)[:-1]]
    keep = free.copy()
    head = np.maximum.accumulate(np.where(free, np.arange(len(starts)), 0))  # the head of each match's run
    inner = np.flatnonzero(~free)
    run, last = -1, -1
    for j, h, s, e in zip(inner.tolist(), head[inner].tolist(), starts[inner].tolist(), ends[inner].tolist(),
                          strict=True):
        if h != run:
            run, last = h, int(ends[h])
        if s >= last:
            keep[j] = True
            last = e
    return starts[keep], ends[keep]
