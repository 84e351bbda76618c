"""Finding codes for a feature: every code of the chosen sites scored and ranked (`cbtool find-codes`).

Definitions (precision, recall, F1, features, the ranking) are in docs/definitions.md; the counting is
in cbtool/analysis/scoring.py and the features in cbtool/analysis/features.py. `find_codes` returns the document that
`cbtool find-codes --json` prints (without its schema_version/kind). With `baseline="neurons"` every
code row is also compared with its best single neuron at the same recall (cbtool/analysis/neurons.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cbtool.analysis.features import MATCH_ON, LabelFeature, label_feature, match_ranges, regex_feature
from cbtool.analysis.scoring import SiteScores, score_labels, score_mask
from cbtool.errors import UserError
from cbtool.formats.store import Store
from cbtool.util import distributed
from cbtool.util.regexes import UserRegex

SORTS = ("precision", "recall", "f1")
DEFAULT_TOP = 20  # rows of a code search when `top` is not given
GOOD_PRECISION = 0.9  # the label table counts the values whose best code reaches this precision
BASELINES = ("neurons",)


def candidates(sc: SiteScores, min_precision: float, min_recall: float, min_count: int) -> np.ndarray:
    """Mask of codes that fired on the feature and pass the thresholds (any shape of hits)."""
    return (
        (sc.hits > 0) & (sc.precision >= min_precision) & (sc.recall >= min_recall) & (sc.fires >= min_count)
    )


def order(
    metric: np.ndarray, second: np.ndarray, fires: np.ndarray, site_rank: np.ndarray, code: np.ndarray
) -> np.ndarray:
    """Best first: metric desc, then the other metric desc, fires desc, site order, code id."""
    return np.lexsort((code, site_rank, -fires, -second, -metric))


def best_per_row(metric: np.ndarray, second: np.ndarray, fires: np.ndarray) -> np.ndarray:
    """Per row of (V, C): the column with the best metric, ties by `second`, then fires, then lowest id."""
    tie = metric == metric.max(axis=1, keepdims=True)
    sec = np.where(tie, second, -np.inf)
    tie &= sec == sec.max(axis=1, keepdims=True)
    return np.argmax(np.where(tie, fires[None, :], -1), axis=1)


def example_tokens(
    store: Store, site: str, masks: list[np.ndarray], codes: list[int], n: int
) -> dict[int, list[str]]:
    """For each code: the `n` most frequent token strings among the feature tokens it fires on."""
    counts: dict[int, dict[str, int]] = {c: {} for c in codes}
    want = np.asarray(codes)
    for s, mask in enumerate(masks):
        pos = np.flatnonzero(mask)
        if not len(pos):
            continue
        ids = np.asarray(store.codes(s, site)[pos])
        toks = np.asarray(store.tokens(s)[pos])
        spans = np.asarray(store.spans(s)[pos])
        relevant = np.isin(ids, want).any(1)
        if not relevant.any():
            continue
        text = store.text(s)
        ids, toks, spans = ids[relevant], toks[relevant], spans[relevant]
        for c in codes:
            rows = np.flatnonzero((ids == c).any(1))
            for r in rows[:2000]:
                t = store.token_string(int(toks[r]), text, spans[r])
                counts[c][t] = counts[c].get(t, 0) + 1
    if distributed.world().active:  # every rank's counts of its shards, added
        merged: dict[int, dict[str, int]] = {c: {} for c in codes}
        for part in distributed.gather_json([[c, d] for c, d in counts.items()]):
            for c, d in part:
                for t, k in d.items():
                    merged[c][t] = merged[c].get(t, 0) + k
        counts = merged
    return {
        c: [t for t, _ in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:n]] for c, d in counts.items()
    }


def feature_rows(
    store: Store, sites: list[str], masks: list[np.ndarray], sort: str = "f1", min_precision: float = 0.0,
    min_recall: float = 0.0, min_count: int = 1, scorer: Callable[[str], SiteScores] | None = None,
) -> list[dict[str, Any]]:
    """Every code of `sites` that passes the thresholds for a feature (per-shard masks, or `scorer(site)`),
    best first."""
    parts = []
    for rank, site in enumerate(sites):
        sc = scorer(site) if scorer is not None else score_mask(store, site, masks)
        keep = np.flatnonzero(candidates(sc, min_precision, min_recall, min_count))
        parts.append((rank, site, sc, keep))
    site_rank = np.concatenate([np.full(len(k), r) for r, _, _, k in parts]) if parts else np.zeros(0)
    code = np.concatenate([k for *_, k in parts]).astype(np.int64)
    vals = {m: np.concatenate([sc.metric(m)[k] for _, _, sc, k in parts]) for m in SORTS}
    hits = np.concatenate([sc.hits[k] for _, _, sc, k in parts])
    fires = np.concatenate([sc.fires[k] for _, _, sc, k in parts])
    second = vals["recall"] if sort == "precision" else vals["precision"]
    rows = []
    for i in order(vals[sort], second, fires, site_rank, code):
        site = sites[int(site_rank[i])]
        rows.append({
            "code": f"{site}:{int(code[i])}", "site": site, "code_id": int(code[i]),
            "precision": float(vals["precision"][i]), "recall": float(vals["recall"][i]),
            "f1": float(vals["f1"][i]), "fires": int(fires[i]), "hits": int(hits[i]),
        })
    return rows


def label_table(
    store: Store, sites: list[str], feat: LabelFeature, sort: str = "f1", min_precision: float = 0.0,
    min_recall: float = 0.0, min_count: int = 1, site_rows: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One row per label value with its best code over `sites`, a summary, and per-site summaries.
    `site_rows`, when given, receives each site's best code per value (site, label_index, code_id,
    precision, hits): the codes the neuron baseline compares."""
    nv = len(feat.values)
    if nv == 0:
        raise UserError(f"labels {feat.name!r} have no values on this store")
    best_metric = np.full(nv, -1.0)
    best: list[dict[str, Any] | None] = [None] * nv
    per_site: dict[str, dict[str, Any]] = {}
    sizes = np.zeros(nv, dtype=np.int64)
    good_somewhere = np.zeros(nv, dtype=bool)
    for site in sites:
        sc = score_labels(store, site, feat.index, nv)
        sizes = np.asarray(sc.feature_size)
        ok = candidates(sc, min_precision, min_recall, min_count)
        metric = np.where(ok, sc.metric(sort), -1.0)
        second = np.where(ok, (sc.recall if sort == "precision" else sc.precision), -1.0)
        combo = best_per_row(metric, second, sc.fires)
        rows_v = np.arange(nv)
        has = ok[rows_v, combo]
        p, r, f = sc.precision[rows_v, combo], sc.recall[rows_v, combo], sc.f1[rows_v, combo]
        per_site[site] = {
            "values_with_code": int(has.sum()),
            "mean_best_precision": float(np.where(has, p, 0.0).mean()),
            "mean_best_recall": float(np.where(has, r, 0.0).mean()),
            f"values_with_precision_{GOOD_PRECISION}": int((has & (p >= GOOD_PRECISION)).sum()),
        }
        good_somewhere |= has & (p >= GOOD_PRECISION)
        if site_rows is not None:
            site_rows += [{"site": site, "label_index": int(v), "code_id": int(combo[v]), "precision": float(p[v]),
                           "hits": int(sc.hits[v, combo[v]])} for v in np.flatnonzero(has)]
        for v in np.flatnonzero(has & (metric[rows_v, combo] > best_metric)):
            c = int(combo[v])
            best_metric[v] = metric[v, c]
            best[v] = {
                "code": f"{site}:{c}", "site": site, "code_id": c, "precision": float(p[v]),
                "recall": float(r[v]), "f1": float(f[v]), "fires": int(sc.fires[c]), "hits": int(sc.hits[v, c]),
            }
    rows = [{"label": feat.values[v], "tokens": int(sizes[v]), **(best[v] or {"code": None})} for v in range(nv)]
    summary = {
        "values": nv,
        "values_with_code": sum(b is not None for b in best),
        # as in the per-site table: some chosen site has a code of that precision for the value
        f"values_with_precision_{GOOD_PRECISION}": int(good_somewhere.sum()),
        # the overall best codes (by `sort`, one per value) that reach it
        f"best_codes_with_precision_{GOOD_PRECISION}": sum(1 for b in best if b and b["precision"] >= GOOD_PRECISION),
    }
    return {"mode": "label-table", "labels": feat.name, "summary": summary, "per_site": per_site, "rows": rows}


def check_query(
    *, regex: str | None = None, labels: str | None = None, label: str | None = None, match_on: str = "all",
    sort: str = "f1", min_precision: float = 0.0, min_recall: float = 0.0, min_count: int = 1,
    top: int | None = None, examples: int = 3, baseline: str | None = None, level: str = "token",
    window: int | None = None,
) -> None:
    """Refuse a malformed query (one UserError line) before any store is read."""
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise UserError(f"--window must be a positive number of tokens, got {window}")
        if regex is None or level != "token":
            raise UserError("--window N takes --regex at token level (the N tokens after each match)")
    if level not in LEVELS:
        raise UserError(f"--level must be {' or '.join(LEVELS)}, got {level!r}")
    if level == "document" and (regex is None or baseline):
        raise UserError("--level document takes --regex (documents that match it), without --baseline")
    if baseline not in (None, *BASELINES):
        raise UserError(f"unknown --baseline {baseline!r}: use {', '.join(BASELINES)}")
    if (regex is None) == (labels is None):
        raise UserError("give exactly one feature: --regex RE or --labels NAME|FILE")
    if label is not None and labels is None:
        raise UserError("--label VALUE needs --labels NAME|FILE")
    if match_on not in MATCH_ON:
        raise UserError(f"--match-on must be first or all, got {match_on!r}")
    if sort not in SORTS:
        raise UserError(f"--sort must be precision, recall or f1, got {sort!r}")
    for name, v in (("--min-precision", min_precision), ("--min-recall", min_recall)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{name} must be in [0, 1], got {v}")
    if min_count < 1:
        raise UserError(f"--min-count must be >= 1, got {min_count}")
    if (top is not None and top < 0) or examples < 0:
        raise UserError("--top and --examples must be >= 0")


def find_codes(
    store: Store, *, regex: str | None = None, labels: str | None = None, label: str | None = None,
    sites: str | None = None, match_on: str = "all", sort: str = "f1", min_precision: float = 0.0,
    min_recall: float = 0.0, min_count: int = 1, top: int | None = None, examples: int = 3,
    baseline: str | None = None,
    checkpoint: Path | None = None, device: Any = "cpu", log: Callable[[str], None] | None = None,
    level: str = "token", window: int | None = None,
) -> dict[str, Any]:
    """Score every code of the chosen sites (globs, None = all) against one feature: `regex`, or `labels`
    (a stored label name or a file) with one `label` value. `labels` without `label` gives the label
    table: each value's best code. Returns what `cbtool find-codes --json` prints; `rows` holds the
    `top` best (0 = all; None = 20 codes, or every value of the label table, whose `top` rows are the values
    with the best codes by `sort`) and `matching_codes` how many pass the thresholds.

    `baseline="neurons"`: each row also gets its best neuron (`neuron`, `neuron_precision`, ...) from
    `checkpoint` (default: the store's own) on `device`, and the document a `baseline` summary; in the
    label table every site's best code per value is compared, summarised per site.

    `level="document"` scores the documents that match `regex` instead of tokens (cbtool/analysis/search.py): `fires`,
    `hits` and `feature_documents` count documents. `window` N: the feature is the N tokens after each match
    in its document (context codes: they fire on the text around a topic, not on its word)."""
    check_query(regex=regex, labels=labels, label=label, match_on=match_on, sort=sort,
                min_precision=min_precision, min_recall=min_recall, min_count=min_count, top=top, examples=examples,
                baseline=baseline, level=level, window=window)
    if baseline and distributed.world().active:
        raise UserError("--baseline re-runs the model on the whole store: run it in one process, not under torchrun")
    chosen = store.select_sites(sites)
    thresholds = {"min_precision": min_precision, "min_recall": min_recall, "min_count": min_count}
    base = {"store": str(store.path), "tokens": store.num_tokens, "sites": chosen, "sort": sort,
            "thresholds": thresholds}
    if level == "document":
        matching = matching_documents(store, regex)  # type: ignore[arg-type]
        rows = feature_rows(store, chosen, [], sort, min_precision, min_recall, min_count,
                            scorer=lambda site: document_scores(store, site, matching))
        return {**base, "mode": "regex", "level": "document", "regex": regex, "documents": store.num_docs,
                "feature_documents": int(sum(int(m.sum()) for m in matching)), "matching_codes": len(rows),
                "rows": rows if top == 0 else rows[:DEFAULT_TOP if top is None else top]}
    if labels is not None and label is None:
        feat = label_feature(store, labels)
        site_rows: list[dict[str, Any]] = []
        table = label_table(store, chosen, feat, sort, min_precision, min_recall, min_count, site_rows)
        doc = {**base, **table}
        if baseline:
            _label_baseline(store, doc, feat, site_rows, checkpoint, device, log)
        if top:
            doc["rows"] = sorted(doc["rows"], key=lambda r: -r.get(sort, -1.0))[:top]
        return doc
    if regex is not None:
        masks = regex_feature(store, regex, match_on, window)
        query: dict[str, Any] = {"mode": "regex", "regex": regex, "match_on": match_on}
        if window is not None:
            query["window"] = window
    else:
        feat = label_feature(store, labels)  # type: ignore[arg-type]
        v = feat.value_index(label)  # type: ignore[arg-type]
        masks = [idx == v for idx in feat.index]
        query = {"mode": "label", "labels": feat.name, "label": feat.values[v]}
    rows = feature_rows(store, chosen, masks, sort, min_precision, min_recall, min_count)
    shown = rows if top == 0 else rows[:DEFAULT_TOP if top is None else top]
    if examples:
        for site in dict.fromkeys(r["site"] for r in shown):
            ex = example_tokens(store, site, masks, [r["code_id"] for r in shown if r["site"] == site], examples)
            for r in shown:
                if r["site"] == site:
                    r["examples"] = ex[r["code_id"]]
    size = int(distributed.all_reduce_np(np.array([sum(int(m.sum()) for m in masks)]))[0])
    doc = {**base, **query, "feature_tokens": size, "matching_codes": len(rows), "rows": shown}
    if baseline:
        from cbtool.analysis.neurons import neuron_baseline

        mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
        doc["baseline"] = neuron_baseline(store, checkpoint, device, shown, [mask] * len(shown), log=log)
    return doc


def _label_baseline(store: Store, doc: dict[str, Any], feat: LabelFeature, site_rows: list[dict[str, Any]],
                    checkpoint: Path | None, device: Any, log: Callable[[str], None] | None) -> None:
    """The neuron baseline of a label table: every site's best code per value vs its best neuron; the
    summary in doc["baseline"], per site in doc["per_site"], and each value's overall best code's neuron
    in its row."""
    from cbtool.analysis.neurons import neuron_baseline

    index = np.concatenate(feat.index) if feat.index else np.zeros(0, dtype=np.int64)
    masks = {v: index == v for v in {r["label_index"] for r in site_rows}}
    doc["baseline"] = neuron_baseline(store, checkpoint, device, site_rows,
                                      [masks[r["label_index"]] for r in site_rows], log=log)
    for site, summary in doc["per_site"].items():
        mine = [r for r in site_rows if r["site"] == site]
        summary.update(codes=len(mine), codes_beating_neuron=sum(r["precision"] > r["neuron_precision"] for r in mine),
                       codes_tying_neuron=sum(r["precision"] == r["neuron_precision"] for r in mine),
                       mean_code_precision=float(np.mean([r["precision"] for r in mine])) if mine else None,
                       mean_neuron_precision=float(np.mean([r["neuron_precision"] for r in mine])) if mine else None)
    found = {(r["site"], r["code_id"], r["label_index"]): r for r in site_rows}
    for v, row in enumerate(doc["rows"]):
        if row["code"] is not None:
            m = found[(row["site"], row["code_id"], v)]
            row.update({k: m[k] for k in m if k.startswith("neuron")})


def feature_title(doc: dict[str, Any]) -> str:
    """How a find-codes document names its feature: `/RE/ (match-on all)` or `NAME = VALUE`."""
    if doc.get("level") == "document":
        return f"documents matching /{doc['regex']}/"
    if doc["mode"] == "regex" and doc.get("window") is not None:
        return f"the {doc['window']} tokens after /{doc['regex']}/"
    if doc["mode"] == "regex":
        return f"/{doc['regex']}/ (match-on {doc['match_on']})"
    return f"{doc['labels']} = {doc['label']}"


# Document-level features (`find-codes --regex RE --level document`): topic codes.
#
# The unit is the document. The feature is the set of documents whose text has a (non-empty) match of RE; a code
# *appears* in a document when it fires on at least one of its tokens. precision = documents where the code
# appears that match / documents where it appears; recall = matching documents where it appears / matching
# documents. `fires` and `hits` of these rows count documents (docs/definitions.md).

LEVELS = ("token", "document")


def matching_documents(store: Store, pattern: str) -> list[np.ndarray]:
    """Per shard: (docs,) bool, whether each document has a non-empty match of `pattern`."""
    regex = UserRegex(pattern)
    out = []
    for s in range(store.num_shards):
        doc_chars = np.asarray(store.doc_chars(s), dtype=np.int64)
        starts, _ = match_ranges(regex, store.text(s), doc_chars)
        hit = np.zeros(len(doc_chars) - 1, dtype=bool)
        hit[np.searchsorted(doc_chars, starts, side="right") - 1] = True
        out.append(hit)
    return out


def document_scores(store: Store, site: str, matching: list[np.ndarray]) -> SiteScores:
    """Per code of `site`: documents it appears in (fires), those that match (hits); |F| = matching documents."""
    c = store.sites[site].num_codes
    fires = np.zeros(c, dtype=np.int64)
    hits = np.zeros(c, dtype=np.int64)
    for s, match in enumerate(matching):
        offs = np.asarray(store.doc_offsets(s), dtype=np.int64)
        doc = np.repeat(np.arange(len(offs) - 1), np.diff(offs))
        ids = np.asarray(store.codes(s, site), dtype=np.int64)
        pairs = np.unique((doc[:, None] * c + ids).reshape(-1))
        fires += np.bincount(pairs % c, minlength=c)
        hits += np.bincount(pairs[match[pairs // c]] % c, minlength=c)
    latents = store.site_entries[site].get("latents")
    if isinstance(latents, int) and 0 < latents < c:  # an SAE store's padding code is in many documents' slots
        fires[latents:] = hits[latents:] = 0  # but never fires (docs/formats.md "SAE stores")
    return SiteScores(site, hits, fires, int(sum(int(m.sum()) for m in matching)))
