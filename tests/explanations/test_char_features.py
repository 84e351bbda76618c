"""cbtool/explanations/char_classes.py against the regex engine: for every character class and position bucket `explain`
uses, on random texts of tricky characters (Unicode digits, letters and spaces, line separators other than
\\n, combining marks, empty documents), the characters the numpy ranges cover are those the engine's matches
cover, document by document, and so are the tokens they select; and cbtool/analysis/features.py's position lists
equal its masks."""

from __future__ import annotations

import numpy as np
import pytest

from cbtool.analysis.features import char_bounds, match_ranges, overlapping_positions, tokens_overlapping
from cbtool.explanations.char_classes import CHAR_CLASSES, char_class_ranges, code_points, position_ranges
from cbtool.explanations.hypotheses import position_buckets, position_regex
from cbtool.util.regexes import UserRegex

ALPHABET = ["A", "Ab", "Zz", "b", "q", "É", "é", "ǅ", "\u0301", "_", "1", "42", "٣", "²", "\r", "\n", "\r\n",
            "\x85", "\u2028", "\x0b", "\t", " ", "\u00a0", ",", "—", "'", "x"]


def _texts(seed: int, trials: int):
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        text = "".join(rng.choice(ALPHABET, int(rng.integers(0, 60))))
        cuts = np.sort(rng.integers(0, len(text) + 1, int(rng.integers(0, 5))))
        yield rng, text, np.r_[0, cuts, len(text)].astype(np.int64)


def _covered(n: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    cover = np.zeros(n, dtype=bool)
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        cover[a:b] = True
    return cover


def _random_spans(rng: np.random.Generator, n: int) -> np.ndarray:
    bounds = np.sort(np.r_[0, rng.integers(0, n + 1, int(rng.integers(0, 20))), n])
    return np.stack([bounds[:-1], bounds[1:]], 1)  # tokens tiling the text, some empty


@pytest.mark.parametrize("name", list(CHAR_CLASSES))
def test_char_class_ranges_cover_what_the_engine_matches(name):
    regex = UserRegex(CHAR_CLASSES[name])
    for trial, (rng, text, doc_chars) in enumerate(_texts(list(CHAR_CLASSES).index(name), 400)):
        want = match_ranges(regex, text, doc_chars)
        got = char_class_ranges(name, code_points(text), doc_chars)
        assert np.array_equal(_covered(len(text), *got), _covered(len(text), *want)), (trial, name, text, doc_chars)
        spans = _random_spans(rng, len(text))
        assert np.array_equal(tokens_overlapping(spans, *got, "all"), tokens_overlapping(spans, *want, "all"))


def test_position_ranges_are_the_position_regexes_matches():
    for trial, (_, text, doc_chars) in enumerate(_texts(5, 200)):
        longest = int(np.diff(doc_chars).max(initial=0))
        for a, b in position_buckets(longest):
            want = match_ranges(UserRegex(position_regex(a, b)), text, doc_chars)
            got = position_ranges(a, b, doc_chars)
            assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]), (trial, a, b)


def test_overlapping_positions_equal_the_mask():
    """Sorted token spans, some empty and some overlapping their neighbours, against disjoint matches."""
    rng = np.random.default_rng(11)
    for _ in range(500):
        n = int(rng.integers(0, 50))
        ts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 25))))
        te = np.maximum(ts, np.sort(ts + rng.integers(-1, 4, len(ts))))  # both in order; overlaps allowed
        cut = np.unique(rng.integers(0, n + 1, int(rng.integers(0, 10))))
        starts, ends = cut[0::2][: len(cut) // 2], cut[1::2]
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        want = np.flatnonzero(tokens_overlapping(np.stack([ts, te], 1).reshape(-1, 2), starts, ends, "all"))
        assert np.array_equal(overlapping_positions(ts, te, starts, ends), want)
        bounds = char_bounds(ts, te, int(max(n, te.max(initial=0))))  # lookup tables instead of searches
        assert np.array_equal(overlapping_positions(ts, te, starts, ends, bounds), want)


def test_leftmost_disjoint_is_the_left_to_right_scan():
    """cbtool/explanations/literal_match.py keeps, of overlapping candidate matches, what a scan keeping each match that
    starts at or after the last kept one's end keeps (only runs of overlaps are scanned)."""
    from cbtool.explanations.literal_match import _leftmost_disjoint

    rng = np.random.default_rng(5)
    for _ in range(2000):
        starts = np.unique(rng.integers(0, 60, int(rng.integers(1, 40))))
        ends = starts + rng.integers(1, 7, len(starts))
        keep, last = [], -1
        for j, (s, e) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            if s >= last:
                keep.append(j)
                last = e
        got = _leftmost_disjoint(starts, ends)
        assert np.array_equal(got[0], starts[keep]) and np.array_equal(got[1], ends[keep])
