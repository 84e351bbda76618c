"""Features: sets of token positions in a code store (docs/definitions.md).

- Regex: matched against each document's text; a token belongs to the feature when its characters
  overlap a match (`match_on="all"`), or when it is the first token overlapping a match
  (`match_on="first"`). Matches never span two documents. Empty matches cover no character and
  select nothing.
- Labels: the store's own per-token labels (TokFSM `state`), or an external file (.npy, or text with
  one label per line) with exactly one label per stored token. Label values are mapped to indices
  0..V-1 (-1: no label), so scoring handles all values at once.

Everything is returned per shard, so features over a store larger than memory stay shard-sized. Under
torchrun each rank computes its own shards (`World.shards`); the others' entries are empty arrays.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbtool.errors import UserError
from cbtool.formats.store import Store
from cbtool.util import distributed, strict_json
from cbtool.util.files import read_text
from cbtool.util.regexes import UserRegex

MATCH_ON = ("first", "all")


def match_ranges(regex: UserRegex | re.Pattern[str], text: str, doc_chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty match [start, end) character ranges, document by document, in text coordinates (sorted and
    disjoint: matches of one document do not overlap, and documents follow each other)."""
    bounds = doc_chars.tolist()
    if isinstance(regex, UserRegex):
        found, firsts = regex.document_spans(text, bounds)
    else:
        found, firsts = [], []  # each match's document start
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            got = [m.span() for m in regex.finditer(text[a:b])]
            found += got
            firsts += [a] * len(got)
    if not found:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    se = np.asarray(found, dtype=np.int64) + np.asarray(firsts, dtype=np.int64)[:, None]
    se = se[se[:, 1] > se[:, 0]]
    return np.ascontiguousarray(se[:, 0]), np.ascontiguousarray(se[:, 1])


def tokens_overlapping(
    spans: np.ndarray, starts: np.ndarray, ends: np.ndarray, match_on: str = "all"
) -> np.ndarray:
    """Boolean mask over tokens for sorted, disjoint match ranges (as `match_ranges` gives; vectorised, no loop
    over tokens or characters)."""
    if match_on not in MATCH_ON:
        raise UserError(f"--match-on must be first or all, got {match_on!r}")
    n = spans.shape[0]
    mask = np.zeros(n, dtype=bool)
    if len(starts) == 0 or n == 0:
        return mask
    ts = np.ascontiguousarray(spans[:, 0])
    te = np.ascontiguousarray(spans[:, 1])
    if not (nondecreasing(ts) and nondecreasing(te)):
        return _overlapping_any_order(ts, te, starts, ends, match_on, mask)
    if match_on == "all":
        return _overlapping_sorted(ts, te, starts, ends, mask)
    # first: for each match, the first non-empty token whose end lies past the match start
    nonempty = np.flatnonzero(te > ts)
    ne_end = te[nonempty]
    j = np.searchsorted(ne_end, starts, side="right")
    ok = j < len(nonempty)
    j = j[ok]
    hit = ts[nonempty[j]] < ends[ok]
    mask[nonempty[j[hit]]] = True
    return mask


def nondecreasing(a: np.ndarray) -> bool:
    return bool(np.all(a[1:] >= a[:-1]))


def _overlapping_any_order(
    ts: np.ndarray, te: np.ndarray, starts: np.ndarray, ends: np.ndarray, match_on: str, mask: np.ndarray
) -> np.ndarray:
    """Tokens in any order (one may start inside the one before): the matches a non-empty token overlaps are
    a run of match indices, from the first ending after its start to the last starting before its end."""
    lo = np.searchsorted(ends, ts, side="right")
    hi = np.searchsorted(starts, te, side="left")
    hit = np.flatnonzero((te > ts) & (hi > lo))
    if match_on == "all":
        mask[hit] = True
        return mask
    runs = (hi - lo)[hit]
    match = np.repeat(lo[hit] - (np.cumsum(runs) - runs), runs) + np.arange(int(runs.sum()))
    first = np.full(len(starts), len(mask), dtype=np.int64)  # each match's first overlapping token
    np.minimum.at(first, match, np.repeat(hit, runs))
    mask[first[first < len(mask)]] = True
    return mask


def _overlapping_sorted(
    ts: np.ndarray, te: np.ndarray, starts: np.ndarray, ends: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """`match_on="all"` when token starts and ends are both in text order (what every tokenizer gives)."""
    mask[overlapping_positions(ts, te, starts, ends)] = True
    return mask


def char_bounds(ts: np.ndarray, te: np.ndarray, num_chars: int) -> tuple[np.ndarray, np.ndarray]:
    """For token starts `ts` and ends `te` in text order over `num_chars` characters: per character offset c,
    the number of tokens ending at or before c and the number starting before c (what `overlapping_positions`
    would search for), as two lookup tables of num_chars + 1 entries."""
    dtype = np.int32 if len(ts) < 2**31 else np.int64
    ended = np.cumsum(np.bincount(te, minlength=num_chars + 1)[: num_chars + 1]).astype(dtype)
    started = np.zeros(num_chars + 1, dtype)
    started[1:] = np.cumsum(np.bincount(ts, minlength=num_chars + 1)[:num_chars])
    return ended, started


def overlapping_positions(ts: np.ndarray, te: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                          bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The sorted indices of the non-empty tokens overlapping sorted, disjoint matches, when token starts `ts`
    and ends `te` are both in text order: the tokens overlapping match [s, e) are a run, from the first token
    ending after s to the last starting before e, less the empty ones. Work in the number of matches and
    selected tokens, not of tokens or characters. `bounds`: `char_bounds` of the same spans (a lookup per
    match instead of two binary searches)."""
    if not len(starts):
        return np.zeros(0, np.int64)
    if bounds is not None:
        lo, hi = bounds[0][starts].astype(np.int64), bounds[1][ends].astype(np.int64)
    else:
        if int(ends[-1]) <= np.iinfo(te.dtype).max:  # search in the spans' own dtype: no copy of them
            starts, ends = starts.astype(te.dtype), ends.astype(te.dtype)
        lo = np.searchsorted(te, starts, side="right").astype(np.int64)
        hi = np.searchsorted(ts, ends, side="left").astype(np.int64)
    runs = np.maximum(hi - lo, 0)
    total = int(runs.sum())
    pos = np.repeat(lo - (np.cumsum(runs) - runs), runs) + np.arange(total)
    pos = pos[te[pos] > ts[pos]]
    if not nondecreasing(pos):  # overlapping tokens: runs of neighbouring matches can share several
        return np.unique(pos)
    return pos[np.r_[True, pos[1:] != pos[:-1]]] if len(pos) else pos  # a token overlapping two matches: once


def regex_feature(store: Store, pattern: str, match_on: str = "all", window: int | None = None) -> list[np.ndarray]:
    """Per-shard boolean masks of the tokens a regex selects. With `window` N: the tokens that have a match's
    first token among the N tokens before them in their document (the context after a match; `match_on` is
    then ignored)."""
    regex = UserRegex(pattern)
    if match_on not in MATCH_ON:
        raise UserError(f"--match-on must be first or all, got {match_on!r}")
    if window is not None:
        check_window(store, window)
    masks = []
    for s in range(store.num_shards):
        if not distributed.world().owns(s):
            masks.append(np.zeros(0, dtype=bool))
            continue
        text = store.text(s)
        starts, ends = match_ranges(regex, text, np.asarray(store.doc_chars(s)))
        if window is None:
            masks.append(tokens_overlapping(np.asarray(store.spans(s)), starts, ends, match_on))
        else:
            firsts = tokens_overlapping(np.asarray(store.spans(s)), starts, ends, "first")
            masks.append(window_after(firsts, np.asarray(store.doc_offsets(s)), window))
    return masks


def longest_document(store: Store) -> int:
    """Tokens in the store's longest document (embed refuses documents longer than the model's block)."""
    return max((int(np.diff(np.asarray(store.doc_offsets(s))).max(initial=0)) for s in range(store.num_shards)),
               default=0)


def check_window(store: Store, window: int) -> None:
    """`--window` must be positive and no longer than the store's documents (at most the model's block)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"--window must be a positive number of tokens, got {window}")
    longest = longest_document(store)
    if window >= longest:
        raise UserError(f"--window {window} reaches past every document of the store (the longest has {longest} "
                        f"tokens, the model's block at most): use a window below {longest}")


def window_after(firsts: np.ndarray, doc_offsets: np.ndarray, window: int) -> np.ndarray:
    """Mask of the tokens t with a True of `firsts` at some m, t - window <= m < t, in t's document
    (`doc_offsets`: (docs + 1,) token offsets): a difference array, no loop over tokens."""
    n = firsts.shape[0]
    m = np.flatnonzero(firsts)
    if len(m) == 0:
        return np.zeros(n, dtype=bool)
    doc_end = doc_offsets[np.searchsorted(doc_offsets, m, side="right")]
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, m + 1, 1)
    np.add.at(diff, np.minimum(m + 1 + window, doc_end), -1)
    return np.cumsum(diff[:n]) > 0


@dataclass
class LabelFeature:
    """Per-shard label indices (-1 = no label) and the value each index stands for."""

    name: str
    values: list[int | str]
    index: list[np.ndarray]  # per shard, int64 in -1..V-1

    def value_index(self, text: str) -> int:
        """Index of a `--label VALUE` given on the command line."""
        for i, v in enumerate(self.values):
            if str(v) == text.strip():
                return i
        shown = ", ".join(str(v) for v in self.values[:10])
        more = f", ... ({len(self.values)} values)" if len(self.values) > 10 else ""
        raise UserError(
            f"label value {text!r} does not occur in labels {self.name!r} (values: {shown}{more})"
        )


def _index_int_labels(name: str, parts: list[np.ndarray]) -> LabelFeature:
    uniq = np.unique(np.concatenate([np.unique(p) for p in parts])) if parts else np.array([], np.int64)
    if distributed.world().active:  # the values of every rank's shards
        every = distributed.gather_json(uniq.tolist())
        uniq = np.unique(np.concatenate([np.asarray(u, dtype=np.int64) for u in every]))
    values = uniq[uniq >= 0]
    index = []
    for p in parts:
        idx = np.searchsorted(values, p)
        idx = np.where(p >= 0, idx, -1).astype(np.int64)
        index.append(idx)
    return LabelFeature(name, [int(v) for v in values], index)


def _split(store: Store, flat: np.ndarray) -> list[np.ndarray]:
    offs, world = store.token_offsets, distributed.world()
    return [np.asarray(flat[offs[s] : offs[s + 1]]) if world.owns(s) else flat[:0] for s in range(store.num_shards)]


def label_feature(store: Store, source: str) -> LabelFeature:
    """`--labels NAME` (a label stored with the store) or `--labels FILE` (.npy or one label per line)."""
    if source in store.label_names:
        return _index_int_labels(
            source, [np.asarray(store.labels(s, source), dtype=np.int64) if distributed.world().owns(s)
                     else np.zeros(0, dtype=np.int64) for s in range(store.num_shards)]
        )
    path = Path(source)
    if not path.exists():
        names = ", ".join(store.label_names) or "none"
        raise UserError(f"--labels {source!r} is neither a label of the store (it has: {names}) nor a file")
    if not path.is_file():
        raise UserError(f"--labels {path} is not a file")
    n = store.num_tokens
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read label file {path} as .npy without pickle ({e})") from None
        if arr.ndim != 1:
            raise UserError(f"label file {path} must be 1-D (one label per token), got shape {arr.shape}")
        if arr.shape[0] != n:
            raise UserError(f"label file {path} has {arr.shape[0]} labels but the store has {n} tokens")
        if arr.dtype.kind in "iub":
            return _index_int_labels(path.name, _split(store, np.asarray(arr, dtype=np.int64)))
        if arr.dtype.kind in "US":
            strs = np.asarray(arr).astype(str)
            return _index_str_labels(store, path.name, strs)
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(np.asarray(arr) == np.round(arr)):
            return _index_int_labels(path.name, _split(store, np.asarray(arr, dtype=np.int64)))
        raise UserError(f"label file {path} has dtype {arr.dtype}; use integers (-1 = none) or strings")
    lines = strict_json.lines(read_text(path, "label file"))
    if len(lines) != n:
        raise UserError(f"label file {path} has {len(lines)} lines but the store has {n} tokens")
    return _index_str_labels(store, path.name, np.array([ln.strip() for ln in lines], dtype=str))


def _index_str_labels(store: Store, name: str, strs: np.ndarray) -> LabelFeature:
    """String labels; an empty string means no label. All-integer files keep integer values."""
    present = strs != ""
    values, inv = np.unique(strs[present], return_inverse=True)
    idx = np.full(len(strs), -1, dtype=np.int64)
    idx[present] = inv
    out_values: list[int | str] = [str(v) for v in values]
    try:  # "12" and "3" sort as numbers when every label is an integer
        ints = np.array([int(v) for v in values], dtype=np.int64)
        order = np.argsort(ints, kind="stable")
        remap = np.empty_like(order)
        remap[order] = np.arange(len(order))
        idx[present] = remap[inv]
        out_values = [int(v) for v in ints[order]]
    except ValueError:
        pass
    return LabelFeature(name, out_values, _split(store, idx))
