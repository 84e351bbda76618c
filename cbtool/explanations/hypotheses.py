"""The hypothesis families `cbtool explain` searches, and their vectorised counting (cbtool/explanations/explainer.py).

A family is either
- *keyed*: every token position gets at most one key (its token id, its previous token, the n-gram ending
  there, its label value); a hypothesis is a small set of keys, i.e. the positions whose key is in the set;
- *masked*: a few fixed regex features (character classes, position-in-document buckets), each a hypothesis.

Counting never loops over codes: hits of every (code, key) pair of a site come from one `np.bincount` (or
`np.unique` when C x keys is large) over `code * K + key`; masked families use one bincount per mask.
For one code with `fires` firings, a key set with hits H and size S scores precision H / fires, recall H / S
and F1 2H / (fires + S). The best F1 over *all* key sets takes the keys in order of h / s (Dinkelbach), so the
search takes, per code, the keys in that order (ties: more hits, then lower key) and keeps the best prefix of
at most `max_set` keys (ties: the shorter). With a precision floor p, the same prefixes are searched among
those with hits >= p x fires (precision only grows along a prefix), and masks among those that reach it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from cbtool.analysis.features import char_bounds, match_ranges, nondecreasing, overlapping_positions, tokens_overlapping
from cbtool.explanations.char_classes import CHAR_CLASSES, char_class_ranges, position_ranges
from cbtool.explanations.literal_match import Alternative, LiteralText
from cbtool.formats.store import Store
from cbtool.util.regexes import UserRegex

PARITY = "+parity"  # a keyed family conjoined with the parity of the token's distance to its document's end
KEYED = ("token", "prev-token", "bigram", "trigram", "label", *(f + PARITY for f in ("token", "bigram", "trigram")))
MASKED = ("char-class", "position")
FAMILIES = KEYED + MASKED
MAX_BOUNDS_CHARS = 1 << 26  # per shard: char-to-token lookup tables (8 bytes a character) up to this many characters
DENSE_BINS = 1 << 24  # count (code, key) pairs with a dense bincount up to this many bins, else np.unique


@dataclass
class KeyedBest:
    """Per code of one site: the best key set of a keyed family (members padded with -1)."""

    f1: np.ndarray  # (C,) float
    hits: np.ndarray  # (C,) int64: firings inside the set
    size: np.ndarray  # (C,) int64: positions of the set
    members: np.ndarray  # (C, max_set) int64


@dataclass
class MaskedBest:
    """Per code of one site: the best mask of a masked family (-1: none)."""

    f1: np.ndarray
    hits: np.ndarray
    size: np.ndarray
    mask: np.ndarray  # (C,) int64 index into the family's masks


def f1_counts(hits: np.ndarray, fires: np.ndarray, size: np.ndarray) -> np.ndarray:
    """F1 of precision hits / fires and recall hits / size, written 2H / (fires + size); 0 when hits is 0."""
    hits = np.asarray(hits, dtype=np.float64)
    den = np.asarray(fires, dtype=np.float64) + size
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(hits > 0, 2 * hits / np.where(den > 0, den, 1), 0.0)


def pair_counts(codes: np.ndarray, keys: np.ndarray, num_codes: int, num_keys: int) -> tuple[np.ndarray, ...]:
    """(code, key, hits) of every pair with hits > 0 over positions with key >= 0 (a code counted once per
    token: top-k ids of a token are distinct)."""
    ok = keys >= 0
    comb = (np.asarray(codes[ok], dtype=np.int64) * num_keys + keys[ok][:, None]).reshape(-1)
    if num_codes * num_keys <= DENSE_BINS:
        counts = np.bincount(comb, minlength=num_codes * num_keys)
        nz = np.flatnonzero(counts)
        hits = counts[nz]
    else:
        nz, hits = np.unique(comb, return_counts=True)
    return nz // num_keys, nz % num_keys, hits.astype(np.int64)


@dataclass
class KeyPrefixes:
    """Per (code, key) pair with hits, sorted per code by hits / size (the search order): the running hits,
    size and F1 of the prefix that ends at the pair, and its rank in its code's order."""

    code: np.ndarray
    key: np.ndarray
    rank: np.ndarray
    first: np.ndarray  # index of the code's first pair
    cum_h: np.ndarray
    cum_s: np.ndarray
    f1: np.ndarray


def key_prefixes(codes: np.ndarray, keys: np.ndarray, fires: np.ndarray, max_set: int | None = None) -> KeyPrefixes:
    """Every code's key prefixes (see KeyPrefixes); codes: (n, k) ids, keys: (n,) int64 (-1 none).
    `max_set`: only each code's first `max_set` pairs of the search order (all a search of sets of at most
    that many keys looks at)."""
    if not (keys >= 0).any():
        e = np.zeros(0, np.int64)
        return KeyPrefixes(e, e, e, e, e, e, np.zeros(0))
    num_keys = int(keys.max()) + 1
    size = np.bincount(keys[keys >= 0], minlength=num_keys)
    code, key, h = pair_counts(codes, keys, len(fires), num_keys)
    s = size[key]
    if max_set is not None and max_set <= FEW_KEYS:
        order = _leading_pairs(code, h, s, max_set)
    else:
        order = np.lexsort((key, -h, -(h / s), code))
    code, key, h, s = code[order], key[order], h[order], s[order]
    first = np.r_[True, code[1:] != code[:-1]]
    start = np.flatnonzero(first)
    seg = np.cumsum(first) - 1
    cum_h, cum_s = np.cumsum(h), np.cumsum(s)
    cum_h = cum_h - (cum_h - h)[start][seg]
    cum_s = cum_s - (cum_s - s)[start][seg]
    return KeyPrefixes(code, key, np.arange(len(code)) - start[seg], start[seg], cum_h, cum_s,
                       f1_counts(cum_h, fires[code], cum_s))


FEW_KEYS = 8  # up to this many keys per code, pick them in rounds (linear passes) instead of sorting all pairs


def _leading_pairs(code: np.ndarray, h: np.ndarray, s: np.ndarray, count: int) -> np.ndarray:
    """Indices of each code's first `count` pairs in the search order (h / s descending, then h descending,
    then key ascending), grouped by code in that order. Pairs come sorted by code, then key (pair_counts), so
    each round takes per code the first pair of the largest h / s, and among those of the largest h."""
    first = np.r_[True, code[1:] != code[:-1]]
    start = np.flatnonzero(first)
    seg = np.cumsum(first) - 1
    ratio = h / s
    left = np.ones(len(code), dtype=bool)
    picked, ranks = [], []
    for r in range(count):
        rr = np.where(left, ratio, -1.0)
        top = left & (rr == np.maximum.reduceat(rr, start)[seg])
        hh = np.where(top, h, -1)
        top &= hh == np.maximum.reduceat(hh, start)[seg]
        idx = np.flatnonzero(top)
        if not len(idx):
            break
        idx = idx[np.r_[True, seg[idx][1:] != seg[idx][:-1]]]  # the lowest key of each code's ties
        left[idx] = False
        picked.append(idx)
        ranks.append(np.full(len(idx), r))
    idx, rank = np.concatenate(picked), np.concatenate(ranks)
    return idx[np.lexsort((rank, code[idx]))]


def best_prefix(pre: KeyPrefixes, fires: np.ndarray, max_set: int, min_precision: float = 0.0,
                max_size: float = np.inf) -> KeyedBest:
    """Per code, its best-F1 prefix of at most `max_set` keys (ties: the shorter) among those with precision
    (hits / fires) >= `min_precision` and at most `max_size` positions; codes without one get F1 0."""
    c = len(fires)
    out = KeyedBest(np.zeros(c), np.zeros(c, np.int64), np.zeros(c, np.int64), np.full((c, max_set), -1, np.int64))
    ok = (pre.rank < max_set) & (pre.cum_s <= max_size)
    if min_precision > 0:
        ok &= pre.cum_h / fires[pre.code] >= min_precision
    cand = np.flatnonzero(ok)
    cand = cand[np.lexsort((pre.rank[cand], -pre.f1[cand], pre.code[cand]))]
    best = cand[np.r_[True, pre.code[cand][1:] != pre.code[cand][:-1]]] if len(cand) else cand
    who = pre.code[best]
    out.f1[who], out.hits[who], out.size[who] = pre.f1[best], pre.cum_h[best], pre.cum_s[best]
    for j in range(max_set):
        has = pre.rank[best] >= j
        out.members[who[has], j] = pre.key[pre.first[best[has]] + j]
    return out


def best_key_sets(codes: np.ndarray, keys: np.ndarray, fires: np.ndarray, max_set: int,
                  min_precision: float = 0.0, max_size: float = np.inf) -> KeyedBest:
    """The best key set (at most `max_set` keys, precision >= `min_precision`, at most `max_size` positions) of
    every code; codes: (n, k) ids, keys: (n,) int64 (-1 none)."""
    return best_prefix(key_prefixes(codes, keys, fires, max_set), fires, max_set, min_precision, max_size)


def mask_counts(codes: np.ndarray, masks: list[np.ndarray], num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(masks, C) hits of every code on each boolean feature, and (masks,) the features' sizes."""
    hits = np.stack([np.bincount(np.asarray(codes[m], dtype=np.int64).reshape(-1), minlength=num_codes)
                     for m in masks]) if masks else np.zeros((0, num_codes), np.int64)
    return hits, np.array([int(m.sum()) for m in masks], dtype=np.int64)


def best_mask(hits: np.ndarray, size: np.ndarray, fires: np.ndarray, min_precision: float = 0.0) -> MaskedBest:
    """Per code, its best-F1 feature among those with precision >= `min_precision` (ties: the first)."""
    c = len(fires)
    if not len(hits):
        return MaskedBest(np.zeros(c), np.zeros(c, np.int64), np.zeros(c, np.int64), np.full(c, -1, np.int64))
    f1 = f1_counts(hits, fires[None, :], size[:, None])
    if min_precision > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(hits / np.maximum(fires, 1)[None, :] >= min_precision, f1, 0.0)
    best = np.argmax(f1, axis=0)
    cols = np.arange(c)
    got = f1[best, cols] > 0
    return MaskedBest(f1[best, cols], hits[best, cols], size[best], np.where(got, best, -1))


def best_masks(codes: np.ndarray, masks: list[np.ndarray], fires: np.ndarray,
               min_precision: float = 0.0) -> MaskedBest:
    """The best of a few boolean features (precision >= `min_precision`) for every code (ties: the first)."""
    return best_mask(*mask_counts(codes, masks, len(fires)), fires, min_precision)


def position_buckets(max_chars: int) -> list[tuple[int, int]]:
    """Character-offset buckets within a document: [0,1), [1,2), [2,4), [4,8), ... covering `max_chars`."""
    out, a, b = [], 0, 1
    while a < max(max_chars, 1):
        out.append((a, b))
        a, b = b, 2 * b
    return out


def position_regex(a: int, b: int) -> str:
    """A regex whose one match per document covers its characters [a, b) (or up to its end)."""
    return rf"\A[\s\S]{{1,{b}}}" if a == 0 else rf"(?<=\A[\s\S]{{{a}}})[\s\S]{{1,{b - a}}}"


class TokenView:
    """A store's positions in memory, with what the families need: token ids, the previous non-empty token of
    the same document, document ids, and regex features computed exactly as `find-codes` computes them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        shards = range(store.num_shards)
        self.texts = [store.text(s) for s in shards]
        self.doc_chars = [np.asarray(store.doc_chars(s), dtype=np.int64) for s in shards]
        self.spans = [np.asarray(store.spans(s), dtype=np.int64) for s in shards]
        self.tokens = np.concatenate([np.asarray(store.tokens(s), dtype=np.int64) for s in shards])
        n = len(self.tokens)
        base = np.concatenate([[0], np.cumsum(store.shard_docs)]).astype(np.int64)
        offsets = [np.asarray(store.doc_offsets(s), dtype=np.int64) for s in shards]
        self.doc = np.concatenate([np.repeat(np.arange(len(o) - 1) + base[s], np.diff(o))
                                   for s, o in enumerate(offsets)]) if n else np.zeros(0, np.int64)
        sp = np.concatenate(self.spans) if n else np.zeros((0, 2), np.int64)
        self.start, self.end = sp[:, 0], sp[:, 1]
        doc_end = np.concatenate([dc[1:] for dc in self.doc_chars]) if n else np.zeros(0, np.int64)
        self.to_end = doc_end[self.doc] - self.end  # characters after the token in its document
        self.nonempty = self.end > self.start
        self.prev = self._previous()
        self.prev2 = np.where(self.prev >= 0, self.prev[np.maximum(self.prev, 0)], -1)
        after = np.flatnonzero(self.nonempty & (self.prev >= 0))
        # spans tile each document: the character after a token belongs to the next non-empty token
        self.tiled = bool(np.all(self.start[after] == self.end[self.prev[after]]))
        self._masks: dict[str, np.ndarray] = {}
        self._positions: dict[str, np.ndarray] = {}
        self._literal: list[LiteralText] = []
        self._strings: dict[int, str] = {}
        self._faithful: dict[int, bool] = {}
        self._char_bounds: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}
        self._keys: dict[tuple[str, str | None], tuple[np.ndarray, np.ndarray | None]] = {}
        # the positions of each token id, in position order: by_token[token_bounds[t]:token_bounds[t + 1]]
        self.by_token = np.flatnonzero(self.nonempty)[np.argsort(self.tokens[self.nonempty], kind="stable")]
        self.token_bounds = np.searchsorted(self.tokens[self.by_token], np.arange(int(self.tokens.max(initial=0)) + 2))
        self.in_order = [nondecreasing(sp[:, 0]) and nondecreasing(sp[:, 1]) for sp in self.spans]
        # the masked features computed without the regex engine (cbtool/explanations/char_classes.py): regex ->
        # per-shard
        # ranges whose union is the union of the regex's matches
        self._native: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray]]] = {
            rx: partial(self._class_ranges, name) for name, rx in CHAR_CLASSES.items()}
        self._native.update({position_regex(a, b): partial(self._position_ranges, a, b)
                             for a, b in position_buckets(self.max_doc_chars())})

    def _previous(self) -> np.ndarray:
        """Per position: the index of the previous non-empty token in the same document (-1: none)."""
        idx = np.where(self.nonempty, np.arange(len(self.tokens)), -1)
        prev = np.r_[-1, np.maximum.accumulate(idx)[:-1]] if len(idx) else idx
        return np.where((prev >= 0) & (self.doc[np.maximum(prev, 0)] == self.doc), prev, -1)

    # -- per-position keys of the keyed families -----------------------------------------------------
    def keys(self, family: str, label: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(n,) keys (-1: none) and, for n-grams, the (keys, n) token ids each key stands for. A `+parity`
        family's key is the base key * 2 + the parity of the characters after the token in its document.
        Cached per family (a `+parity` family reuses its base family's keys)."""
        if (family, label) not in self._keys:
            self._keys[family, label] = self._compute_keys(family, label)
        return self._keys[family, label]

    def _compute_keys(self, family: str, label: str | None) -> tuple[np.ndarray, np.ndarray | None]:
        if family.endswith(PARITY):
            base, grams = self.keys(family[: -len(PARITY)])
            return np.where(base >= 0, base * 2 + self.to_end % 2, -1), grams
        tok = np.where(self.nonempty, self.tokens, -1)
        if family == "token":
            return tok, None
        if family == "prev-token":
            return np.where(self.nonempty & (self.prev >= 0), self.tokens[np.maximum(self.prev, 0)], -1), None
        if family == "label":
            from cbtool.analysis.features import label_feature

            return np.concatenate(label_feature(self.store, label).index), None  # type: ignore[arg-type]
        here = np.arange(len(tok))
        cols = [self.prev2, self.prev, here] if family == "trigram" else [self.prev, here]
        ok = self.nonempty & np.all([c >= 0 for c in cols], axis=0)
        grams = np.stack([self.tokens[np.maximum(c, 0)] for c in cols], axis=1)[ok]
        keys = np.full(len(tok), -1, dtype=np.int64)
        if not ok.any():
            return keys, grams
        base = int(grams.max()) + 1
        if base ** len(cols) < 2**62:  # one int64 per n-gram (same order as the rows): a 1-d unique, far faster
            packed = np.zeros(len(grams), dtype=np.int64)
            for j in range(len(cols)):
                packed = packed * base + grams[:, j]
            uniq_packed, inv = np.unique(packed, return_inverse=True)
            uniq = np.stack([uniq_packed // base ** (len(cols) - 1 - j) % base for j in range(len(cols))], axis=1)
        else:
            uniq, inv = np.unique(grams, axis=0, return_inverse=True)
        keys[ok] = inv.reshape(-1)
        return keys, uniq

    # -- rendering as find-codes features --------------------------------------------------------
    def positions_of(self, token: int) -> np.ndarray:
        """The non-empty positions of a token id, in order."""
        if not 0 <= token < len(self.token_bounds) - 1:
            return self.by_token[:0]
        return self.by_token[self.token_bounds[token] : self.token_bounds[token + 1]]

    def string(self, token: int) -> str:
        """The characters of a token (its first non-empty occurrence)."""
        if token not in self._strings:
            p = int(self.positions_of(token)[0])
            s = self._shard_of(p)
            self._strings[token] = self.texts[s][int(self.start[p]) : int(self.end[p])]
        return self._strings[token]

    def _shard_of(self, p: int) -> int:
        return int(np.searchsorted(self.store.token_offsets, p, side="right") - 1)

    def literal(self, shard: int) -> LiteralText:
        if not self._literal:
            self._literal = [LiteralText(t, dc) for t, dc in zip(self.texts, self.doc_chars, strict=True)]
        return self._literal[shard]

    def faithful(self, token: int) -> bool:
        """Whether the token's string occurs in the documents exactly where the token is (the same start
        characters): then a regex built from such literals selects exactly the positions the search counted
        (see cbtool/explanations/explainer.py)."""
        if token not in self._faithful:
            s = self.string(token)
            where = self.positions_of(token)
            lengths = self.end[where] - self.start[where]
            same = bool(lengths.min() == len(s) and lengths.max() == len(s))
            offsets = np.asarray(self.store.token_offsets, dtype=np.int64)
            for shard in range(self.store.num_shards) if same else ():
                here = where[(where >= offsets[shard]) & (where < offsets[shard + 1])]
                found = self.literal(shard).starts(Alternative("", s))
                if not np.array_equal(found, np.sort(self.start[here])):
                    same = False
                    break
            self._faithful[token] = same
        return self._faithful[token]

    def regex_mask(self, pattern: str) -> np.ndarray:
        """(n,) tokens overlapping a match of `pattern` in their document: `find-codes --regex` (match-on all)."""
        if pattern not in self._masks:
            self._masks[pattern] = self._regex_mask(pattern)
        return self._masks[pattern]

    def regex_positions(self, pattern: str, branches: list[Alternative] | None = None) -> np.ndarray:
        """The indices of `regex_mask(pattern)`, cached as such: the thousands of hypotheses scored by their
        regex stay small in memory (each as many entries as tokens it selects). `branches`: the pattern is
        their alternation, matched by cbtool/explanations/literal_match.py (the same tokens, much faster)."""
        if pattern not in self._positions:
            if branches:
                offsets = np.asarray(self.store.token_offsets, dtype=np.int64)
                parts = []
                for s, sp in enumerate(self.spans):
                    starts, ends = self.literal(s).ranges(branches)
                    if self.in_order[s]:
                        parts.append(overlapping_positions(sp[:, 0], sp[:, 1], starts, ends, self._bounds(s))
                                     + offsets[s])
                    else:
                        parts.append(np.flatnonzero(tokens_overlapping(sp, starts, ends, "all")) + offsets[s])
                where = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            else:  # not kept as a mask: only the positions are cached
                where = np.flatnonzero(self._masks[pattern] if pattern in self._masks else self._regex_mask(pattern))
            self._positions[pattern] = where.astype(np.int32 if len(self.tokens) < 2**31 else np.int64)
        return self._positions[pattern]

    def _bounds(self, shard: int) -> tuple[np.ndarray, np.ndarray] | None:
        """`features.char_bounds` of a shard whose spans are in text order (cached; None above
        MAX_BOUNDS_CHARS characters, where binary searches cost less memory)."""
        if shard not in self._char_bounds:
            sp, n = self.spans[shard], len(self.texts[shard])
            self._char_bounds[shard] = char_bounds(sp[:, 0], sp[:, 1], n) if n <= MAX_BOUNDS_CHARS else None
        return self._char_bounds[shard]

    def _regex_mask(self, pattern: str) -> np.ndarray:
        native = self._native.get(pattern)
        regex = None if native else UserRegex(pattern)
        parts = [tokens_overlapping(sp, *(native(s) if native else match_ranges(regex, text, dc)), "all")
                 for s, (sp, text, dc) in enumerate(zip(self.spans, self.texts, self.doc_chars, strict=True))]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)

    def _class_ranges(self, name: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        return char_class_ranges(name, self.literal(shard).chars, self.doc_chars[shard])

    def _position_ranges(self, a: int, b: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
        return position_ranges(a, b, self.doc_chars[shard])

    def max_doc_chars(self) -> int:
        return max((int(np.diff(dc).max()) for dc in self.doc_chars if len(dc) > 1), default=0)
