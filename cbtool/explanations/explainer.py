"""Explaining every code without a language model (`cbtool explain`), and the census of a dictionary.

For every live code (>= `min_count` firings) of the chosen sites, the hypothesis families of
cbtool/explanations/hypotheses.py are searched by vectorised counting and one hypothesis is kept (the rule
below), written as a `find-codes` query (a regex, match-on all, or a stored label value) that gives the same numbers:

- token:       the firing token is one of a small set            `(?:the|a)`
- prev-token:  the previous token is one of a small set          `(?<=the)[\\s\\S]`
- bigram / trigram: the n-gram ending at the position             `(?<=Mr)\\.`
- char-class:  digits, capitalised word, punctuation, whitespace, line start (cbtool/explanations/hypotheses.py)
- position:    character-offset bucket in the document [0,1), [1,2), [2,4), ...
- label:       a value of each label the store holds (TokFSM: `--labels state --label 42`)

The search counts token ids. A regex built from token strings selects exactly those positions when every token
in it is *faithful* (its string occurs in the text only where the token is) and, for the context families, the
token spans tile each document; the numbers are then the search's. Otherwise the regex's own feature is
computed (as `find-codes --regex` does) and its numbers are reported, so what is printed is always what
`find-codes` reproduces. The families are tried best search-F1 first, stopping once no remaining family's
search F1 can beat the best reported F1 so far.

Only selective hypotheses count: one true of more than `max_coverage` (default half) of the store's tokens
explains no code, however precise (every TokFSM token is a digit; four in five SmolLM2 tokens hold a space).

The kept hypothesis: the best-F1 one, unless its precision is below `min_precision`; then the best-F1 one among
the *precise* hypotheses (precision >= `min_precision`) whose F1 is at least `min_f1_share` (default 0.5) of
the code's best F1, when there is one.
A code that fires on a part of a feature (TokFSM: one of several codes of a state, each firing at the state's
second digit in some of its contexts) is described by that feature at precision ~1 but recall 1 / parts, and
some noisier n-gram set often has a higher F1: the F1 floor keeps the precise description when it costs at most
half of the best F1, and keeps out hypotheses that are precise for any code because they cover almost every
token (every TokFSM token is a digit). Each row also holds `best_f1` and `best_f1_precision`, the best-F1
hypothesis's numbers.

Census per site: the share of live codes whose kept hypothesis has precision >= `min_precision` (explained),
the share of the live codes' firings that belong to explained codes (firing mass), and the stricter share
whose best-F1 hypothesis itself is that precise (`best_f1_explained_share`).
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np

from cbtool.analysis.contexts import code_contexts
from cbtool.errors import UserError
from cbtool.explanations.hypotheses import (
    CHAR_CLASSES,
    FAMILIES,
    KEYED,
    PARITY,
    KeyedBest,
    MaskedBest,
    TokenView,
    best_mask,
    best_prefix,
    key_prefixes,
    mask_counts,
    position_buckets,
    position_regex,
)
from cbtool.explanations.literal_match import Alternative
from cbtool.formats.store import MANIFEST, Store, read_manifest
from cbtool.model.refs import parse_code_ref
from cbtool.util import progress

DEFAULT_MIN_COUNT = 10
DEFAULT_MIN_PRECISION = 0.8
DEFAULT_MAX_SET = 4
DEFAULT_MIN_F1_SHARE = 0.5  # a precise hypothesis is kept over the best-F1 one when its F1 is >= this share of it
DEFAULT_MAX_COVERAGE = 0.5  # a hypothesis true of more than this share of the store's tokens explains no code
# the characters after a match, to the end of its document, are even / odd in number
PARITY_LOOKAHEAD = (r"(?=(?:[\s\S]{2})*\Z)", r"(?=[\s\S](?:[\s\S]{2})*\Z)")


def parse_families(text: str | None) -> list[str]:
    """`--families token,label` (None or empty: all), in the canonical order."""
    if text is None or not text.strip():
        return list(FAMILIES)
    asked = [f.strip() for f in text.split(",") if f.strip()]
    bad = [f for f in asked if f not in FAMILIES]
    if bad:
        raise UserError(f"unknown hypothesis famil{'ies' if len(bad) > 1 else 'y'} {', '.join(bad)}: "
                        f"use {', '.join(FAMILIES)}")
    return [f for f in FAMILIES if f in asked]


def _alternation(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


class _Renderer:
    """Hypotheses of one family as find-codes queries, with whether the search's numbers are exact."""

    def __init__(self, view: TokenView, family: str, label: str | None = None) -> None:
        self.view, self.family, self.label = view, family, label
        self.keys, self.grams = view.keys(family, label)
        self._rendered: dict[tuple[int, ...], tuple[str, dict[str, Any], bool, list[Alternative]]] = {}
        if family == "label":
            from cbtool.analysis.features import label_feature

            self.values = label_feature(view.store, label).values  # type: ignore[arg-type]

    def render(self, members: list[int]) -> tuple[str, dict[str, Any], bool, list[Alternative]]:
        """(description, find-codes query, exact, the regex's branches for cbtool/explanations/literal_match.py) of
        a key set (cached: many codes share a key set)."""
        key = tuple(members)
        if key not in self._rendered:
            self._rendered[key] = self._render(members)
        desc, query, exact, branches = self._rendered[key]
        return desc, dict(query), exact, branches

    def _render(self, members: list[int]) -> tuple[str, dict[str, Any], bool, list[Alternative]]:
        v = self.view
        if self.family == "label":
            value = self.values[members[0]]
            return f"{self.label} = {value}", {"labels": self.label, "label": str(value)}, True, []
        parity = self.family.endswith(PARITY)
        family = self.family[: -len(PARITY)] if parity else self.family
        alts: list[tuple[str, str, Alternative]] = []
        tokens: set[int] = set()
        for m in members:
            key = m // 2 if parity else m
            gram = [key] if self.grams is None else [int(t) for t in self.grams[key]]
            tokens.update(gram)
            strings = [v.string(t) for t in gram]
            if family == "prev-token":
                alt, desc = f"(?<={re.escape(strings[0])})[\\s\\S]", f"after {strings[0]!r}"
                branch = Alternative(strings[0], "")
            elif family == "token":
                alt, desc, branch = re.escape(strings[0]), repr(strings[0]), Alternative("", strings[0])
            else:
                alt = f"(?<={''.join(re.escape(x) for x in strings[:-1])}){re.escape(strings[-1])}"
                desc = f"{strings[-1]!r} after {''.join(strings[:-1])!r}"
                branch = Alternative("".join(strings[:-1]), strings[-1])
            if parity:
                alt += PARITY_LOOKAHEAD[m % 2]
                desc += f" at {('even', 'odd')[m % 2]} distance to the end"
                branch = Alternative(branch.before, branch.body, m % 2)
            alts.append((alt, desc, branch))
        alts.sort(key=lambda a: (-len(a[0]), a[0]))
        desc = ("token " if family == "token" else "") + " | ".join(d for _, d, _ in alts)
        exact = all(v.faithful(t) for t in tokens) and (family == "token" or v.tiled)
        return desc, _regex(_alternation([a for a, _, _ in alts])), exact, [b for _, _, b in alts]


def _regex(pattern: str) -> dict[str, Any]:
    return {"regex": pattern, "match_on": "all"}


def masked_features(view: TokenView, family: str) -> list[tuple[str, str]]:
    """(description, regex) of the masks of a masked family."""
    if family == "char-class":
        return list(CHAR_CLASSES.items())
    return [(f"characters [{a},{b}) of the document", position_regex(a, b))
            for a, b in position_buckets(view.max_doc_chars())]


def explain(
    store: Store, *, sites: str | None = None, min_count: int = DEFAULT_MIN_COUNT,
    min_precision: float = DEFAULT_MIN_PRECISION, max_set: int = DEFAULT_MAX_SET, families: str | None = None,
    min_f1_share: float = DEFAULT_MIN_F1_SHARE, max_coverage: float = DEFAULT_MAX_COVERAGE,
) -> dict[str, Any]:
    """The best hypothesis of every live code of the chosen sites (globs, None = all) and the census.
    Returns what `cbtool explain --json` prints (without its schema_version/kind)."""
    if min_count < 1:
        raise UserError("--min-count must be >= 1")
    if not 0.0 <= min_precision <= 1.0:
        raise UserError("--min-precision must be in [0, 1]")
    if not 1 <= max_set <= 64:
        raise UserError("--max-set must be in 1..64")
    if not 0.0 <= min_f1_share <= 1.0:
        raise UserError("--min-f1-share must be in [0, 1]")
    if not 0.0 < max_coverage <= 1.0:
        raise UserError("--max-coverage must be in (0, 1]")
    fams = parse_families(families)
    chosen = store.select_sites(sites)
    t0 = time.perf_counter()
    view = TokenView(store)
    renderers = [_Renderer(view, f, lab) for f in fams if f in KEYED
                 for lab in (store.label_names if f == "label" else [None])]
    max_size = max_coverage * store.num_tokens
    masked, masks = {}, {}
    for f in fams:
        if f not in KEYED:
            feats = [(d, rx, view.regex_mask(rx)) for d, rx in masked_features(view, f)]
            feats = [x for x in feats if x[2].sum() <= max_size]
            masked[f], masks[f] = [(d, rx) for d, rx, _ in feats], [m for _, _, m in feats]
    rows: list[dict[str, Any]] = []
    census: dict[str, dict[str, Any]] = {}
    live_codes = sum(int((store.counts(s) >= min_count).sum()) for s in chosen)
    with progress.track("explain", live_codes, "codes") as bar:  # a line every 30 s in logs
        for site in chosen:
            site_rows = _explain_site(store, site, view, renderers, masked, masks, bar, min_count=min_count,
                                      min_precision=min_precision, max_set=max_set, min_f1_share=min_f1_share,
                                      max_size=max_size)
            rows += site_rows
            census[site] = _census(site_rows, min_precision)
    doc = {
        "store": str(store.path), "tokens": store.num_tokens, "sites": chosen, "families": fams,
        "min_count": min_count, "min_precision": min_precision, "max_set": max_set, "min_f1_share": min_f1_share,
        "max_coverage": max_coverage,
        "census": {**census, "all": _census(rows, min_precision)}, "rows": rows,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return doc


def _explain_site(store: Store, site: str, view: TokenView, renderers: list[_Renderer],
                  masked: dict[str, list[tuple[str, str]]], masks: dict[str, list[np.ndarray]], bar: progress.Tracker,
                  *, min_count: int, min_precision: float, max_set: int, min_f1_share: float,
                  max_size: float) -> list[dict[str, Any]]:
    """The rows of one site's live codes (see `explain`)."""
    codes = np.concatenate([np.asarray(store.codes(s, site)) for s in range(store.num_shards)])
    fires = store.counts(site)
    keyed, precise_keyed = [], []
    for r in renderers:
        ms = 1 if r.family == "label" else max_set
        pre = key_prefixes(codes, r.keys, fires, ms)
        keyed.append((r, best_prefix(pre, fires, ms, max_size=max_size)))
        precise_keyed.append((r, best_prefix(pre, fires, ms, min_precision, max_size)))
    counted = {f: mask_counts(codes, masks[f], len(fires)) for f in masked}
    mbest = [(f, best_mask(*counted[f], fires)) for f in masked]
    precise_mbest = [(f, best_mask(*counted[f], fires, min_precision)) for f in masked]
    exact = _ExactScores(view, codes)
    live = np.flatnonzero(fires >= min_count)
    site_rows: list[dict[str, Any]] = []
    reported = 0
    for n, c in enumerate(live, 1):
        best = _best_hypothesis(int(c), int(fires[c]), keyed, mbest, masked, exact, max_size=max_size)
        if best is not None and best["precision"] < min_precision:
            floor = min_f1_share * best["f1"]
            precise = _best_hypothesis(int(c), int(fires[c]), precise_keyed, precise_mbest, masked, exact,
                                       min_precision, floor, max_size)
            best = {**best, **precise} if precise is not None else best
        site_rows.append(_row(site, int(c), int(fires[c]), best))
        if n % 256 == 0 or n == len(live):  # progress in steps of 256 codes
            bar.advance(n - reported)
            reported = n
    return site_rows


class _ExactScores:
    """Hits of a site's codes on a regex feature: the tokens that hold the code and that the regex selects,
    as find-codes counts them (the feature's tokens cached per regex by the view, shared by the sites; matched by
    cbtool/explanations/literal_match.py). Counted from the code's own firing positions, looked up in the feature's
    sorted positions: work in the code's firings, not in the feature's tokens x k."""

    def __init__(self, view: TokenView, codes: np.ndarray) -> None:
        self.view, self.codes = view, codes
        self._order: np.ndarray | None = None
        self._bounds = np.zeros(0, np.int64)

    def firings(self, code: int) -> np.ndarray:
        """The sorted distinct token positions where `code` fires."""
        if self._order is None:  # once per site, on the first hypothesis that needs its regex's own numbers
            flat = self.codes.reshape(-1)
            self._order = np.argsort(flat, kind="stable")
            self._bounds = np.searchsorted(flat[self._order], np.arange(int(flat.max(initial=0)) + 2))
        if not 0 <= code < len(self._bounds) - 1:
            return np.zeros(0, np.int64)
        pos = self._order[self._bounds[code] : self._bounds[code + 1]] // self.codes.shape[1]
        return pos[np.r_[True, pos[1:] != pos[:-1]]] if len(pos) else pos  # a code twice in a token's k: once

    def __call__(self, pattern: str, code: int, branches: list[Alternative]) -> tuple[int, int]:
        where = self.view.regex_positions(pattern, branches)
        fired = self.firings(code)
        if not len(where) or not len(fired):
            return 0, len(where)
        at = np.minimum(np.searchsorted(where, fired), len(where) - 1)
        return int((where[at] == fired).sum()), len(where)


def _best_hypothesis(code: int, fires: int, keyed: list[tuple[_Renderer, KeyedBest]],
                     mbest: list[tuple[str, MaskedBest]], masked: dict[str, list[tuple[str, str]]],
                     exact: _ExactScores, min_precision: float = 0.0, min_f1: float = 0.0,
                     max_size: float = np.inf) -> dict[str, Any] | None:
    """The best reported hypothesis of one code among its families' best (see the module docstring) with
    precision >= `min_precision`, F1 >= `min_f1` and at most `max_size` feature tokens, with its numbers as
    find-codes computes them; None when there is none. The unconstrained search (`min_precision` 0) also
    records `best_f1` and `best_f1_precision`."""
    cands: list[tuple[float, int, Any]] = []
    for i, (r, kb) in enumerate(keyed):
        if kb.f1[code] > 0:
            cands.append((float(kb.f1[code]), i, ("keyed", r, kb)))
    for j, (f, mb) in enumerate(mbest):
        if mb.f1[code] > 0:
            cands.append((float(mb.f1[code]), len(keyed) + j, ("masked", f, mb)))
    cands.sort(key=lambda c: (-c[0], c[1]))
    best: dict[str, Any] | None = None
    for search_f1, _, (kind, who, res) in cands:
        if (best is not None and search_f1 <= best["f1"]) or search_f1 < min_f1:
            break
        hits, size = int(res.hits[code]), int(res.size[code])
        if kind == "keyed":
            members = [int(m) for m in res.members[code] if m >= 0]
            desc, query, is_exact, branches = who.render(members)
            family = who.family
            if not is_exact:
                hits, size = exact(query["regex"], code, branches)
        else:
            family = who
            desc, pattern = masked[who][int(res.mask[code])]
            query = _regex(pattern)
        row = _scored(hits, fires, size)
        if (best is None or row["f1"] > best["f1"]) and row["precision"] >= min_precision and row["f1"] >= min_f1 \
                and size <= max_size:
            best = {"family": family, "hypothesis": desc, "query": query, **row}
    if best is not None and not min_precision:
        best.update(best_f1=best["f1"], best_f1_precision=best["precision"])
    return best


def _row(site: str, code: int, fires: int, best: dict[str, Any] | None) -> dict[str, Any]:
    base = {"code": f"{site}:{code}", "site": site, "code_id": code, "fires": fires}
    if best is None:
        return {**base, "family": None, "hypothesis": None, "query": None, "precision": 0.0, "recall": 0.0,
                "f1": 0.0, "hits": 0, "feature_tokens": 0, "best_f1": 0.0, "best_f1_precision": 0.0}
    return {**base, **best}


def _scored(hits: int, fires: int, size: int) -> dict[str, Any]:
    """Precision, recall and F1 exactly as find-codes computes them (cbtool/analysis/scoring.py `SiteScores`: the same
    float64 operations in the same order, on one code without numpy's per-call cost)."""
    p = hits / fires if fires > 0 else 0.0
    r = hits / size if size > 0 else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0,
            "hits": hits, "feature_tokens": size}


def _census(rows: list[dict[str, Any]], min_precision: float) -> dict[str, Any]:
    explained = [r for r in rows if r["family"] is not None and r["precision"] >= min_precision]
    strict = sum(r["family"] is not None and r["best_f1_precision"] >= min_precision for r in rows)
    mass = sum(r["fires"] for r in rows)
    by_family: dict[str, int] = {}
    for r in explained:
        by_family[r["family"]] = by_family.get(r["family"], 0) + 1
    return {
        "live_codes": len(rows), "explained": len(explained),
        "explained_share": len(explained) / len(rows) if rows else None,
        "firing_mass_share": sum(r["fires"] for r in explained) / mass if mass else None,
        "best_f1_explained_share": strict / len(rows) if rows else None,
        "mean_f1": float(np.mean([r["f1"] for r in rows])) if rows else None,
        "by_family": dict(sorted(by_family.items(), key=lambda kv: -kv[1])),
    }


def shell_query(query: dict[str, Any]) -> str:
    """A row's find-codes query as shell arguments to paste after `cbtool find-codes STORE`."""
    if "labels" in query:
        return f"--labels {shlex.quote(query['labels'])} --label {shlex.quote(query['label'])}"
    return f"--regex {shlex.quote(query['regex'])}"


def check_explained(doc: dict[str, Any], frac: float) -> list[str]:
    """The sites (with live codes) whose explained share is below `frac` (`--require-explained`)."""
    return [s for s in doc["sites"] if doc["census"][s]["live_codes"]
            and doc["census"][s]["explained_share"] < frac]


# What a code stands for, in one line, from a code store: the label value it fires on most (with its
# precision) and the tokens it fires on most. `cbtool intervene` prints it for every code it forces.

def code_meaning(store: Store, ref: str) -> str:
    """`state 45 (precision 0.99 of 512 firings); most on '5' x300, '4' x212` for a code `SITE:CODE`."""
    site, code = parse_code_ref(ref, store.sites)
    res = code_contexts(store, f"{site.name}:{code}", examples=0)
    if not res["fires"]:
        return f"fires on no token of {store.path}"
    parts = []
    for name in store.label_names:
        values, counts = np.unique(np.concatenate([
            np.asarray(store.labels(s, name))[(np.asarray(store.codes(s, site.name)) == code).any(axis=1)]
            for s in range(store.num_shards)]), return_counts=True)
        keep = values >= 0
        if keep.any():
            i = int(np.argmax(np.where(keep, counts, -1)))
            parts.append(f"{name} {int(values[i])} (precision {counts[i] / res['fires']:.2f} of "
                         f"{res['fires']:,} firings)")
    tokens = ", ".join(f"{t['token']!r} x{t['count']:,}" for t in res["top_tokens"][:3])
    return "; ".join([*parts, f"fires most on {tokens}"])


def matching_store(path: Path, checkpoint_sha256: str) -> Store | None:
    """The store at `path` when it is complete and was embedded from the checkpoint with that hash, else None."""
    if not (path / MANIFEST).is_file():
        return None
    try:
        man = read_manifest(path)
    except UserError:  # an unreadable store just gives no descriptions
        return None
    if not man.get("complete") or (man.get("checkpoint") or {}).get("sha256") != checkpoint_sha256:
        return None
    return Store(path)
