"""explain's masked features (cbtool/explanations/hypotheses.py) without the regex engine: the character-class
regexes and
the position-in-document regexes, computed with numpy over a shard's code points.

Each function gives character ranges whose union is the union of the regex's matches over every document (as
`find-codes --regex` finds them, document by document: cbtool/analysis/features.py), so the tokens overlapping them are
the ones `find-codes` selects. Whether a character is `\\d`, `\\w` or `\\s` is asked of the `regex` module itself,
once per distinct code point, so the Unicode definitions are the engine's own.
tests/explanations/test_explain.py compares every feature with the engine on random texts.
"""

from __future__ import annotations

import numpy as np
import regex

CHAR_CLASSES = {  # name -> the regex find-codes is given (tokens overlapping a match)
    "digits": r"\d+",
    "capitalised word": r"\b[A-Z][a-z]+",
    "punctuation": r"[^\w\s]+",
    "whitespace": r"\s+",
    "line start": r"(?m)^[\s\S]",
}
_CLASS = {name: regex.compile(rx, regex.VERSION0) for name, rx in (("d", r"\d"), ("w", r"\w"), ("s", r"\s"))}


def code_points(text: str) -> np.ndarray:
    """The text's characters as code points (one uint32 each)."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _classes(chars: np.ndarray) -> dict[str, np.ndarray]:
    """Per character: whether the engine's `\\d`, `\\w`, `\\s` match it (asked once per distinct code point)."""
    if not len(chars):
        return {k: np.zeros(0, bool) for k in _CLASS}
    present = np.flatnonzero(np.bincount(chars))
    out = {}
    for k, rx in _CLASS.items():
        table = np.zeros(int(present[-1]) + 1, dtype=bool)
        table[present] = [rx.fullmatch(chr(c)) is not None for c in present.tolist()]
        out[k] = table[chars]
    return out


def _runs(cover: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of each maximal run of True."""
    d = np.diff(np.r_[np.int8(0), cover.view(np.int8), np.int8(0)])
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def char_class_ranges(name: str, chars: np.ndarray, doc_chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ranges covering exactly the characters inside the matches of CHAR_CLASSES[name] (documents
    doc_chars[i]:doc_chars[i + 1] searched one by one; they tile the text)."""
    n = len(chars)
    first = np.zeros(n + 1, dtype=bool)  # the first character of a document
    first[doc_chars[:-1][np.diff(doc_chars) > 0]] = True
    first = first[:n]
    if name == "line start":  # (?m)^ : a document's start or after a line feed; [\s\S]: one character there
        after_lf = np.r_[False, chars[:-1] == 0x0A]
        return _runs(first | after_lf)
    cls = _classes(chars)
    if name == "digits":
        return _runs(cls["d"])
    if name == "punctuation":
        return _runs(~cls["w"] & ~cls["s"])
    if name == "whitespace":
        return _runs(cls["s"])
    if name == "capitalised word":  # \b[A-Z][a-z]+ : an upper-case letter after a non-word character (or a
        # document's start), then the whole run of lower-case letters after it within its document
        upper = (chars >= 0x41) & (chars <= 0x5A)
        lower = (chars >= 0x61) & (chars <= 0x7A)
        boundary = first | ~np.r_[False, cls["w"][:-1]]
        nxt_lower = np.r_[lower[1:] & ~first[1:], False]
        start = upper & boundary & nxt_lower
        run = np.cumsum(~lower | first)  # a lower-case run shares the id of the character before it
        good = np.zeros(int(run[-1]) + 1 if n else 1, dtype=bool)
        good[run[start]] = True
        return _runs(start | (lower & ~first & good[run]))
    raise KeyError(name)


def position_ranges(a: int, b: int, doc_chars: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Characters [a, b) of every document longer than a (hypotheses.position_regex's one match there)."""
    ds, length = doc_chars[:-1], np.diff(doc_chars)
    keep = length > a
    return ds[keep] + a, ds[keep] + np.minimum(b, length[keep])
