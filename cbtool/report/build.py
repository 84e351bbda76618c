"""`cbtool report`: what goes into the one-file HTML report of a checkpoint and its code store.

This module gathers the data (bounded by `Limits`); `cbtool.report.html` renders it. Everything is computed
from the store's arrays in a few vectorised passes per site: firing counts (stored), label hits for every
(value, code) at once (`scoring.score_labels`), top tokens per code (one `np.unique` over code x token keys)
and the contexts of each code (one stable argsort of the site's ids, then `contexts` positions spread evenly
over each code's firings, as `show-code` picks them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cbtool.analysis.features import LabelFeature, label_feature
from cbtool.analysis.scoring import SiteScores, score_labels
from cbtool.analysis.usage import site_usage
from cbtool.errors import UserError
from cbtool.explanations.explainer import shell_query
from cbtool.formats.store import Store
from cbtool.report.plots import readable
from cbtool.training import metrics_file as metrics_log
from cbtool.util import strict_json
from cbtool.util.files import atomic_write_text, read_text, sha256_file


@dataclass(frozen=True)
class Limits:
    """What bounds the report's size (each is a `cbtool report` option)."""

    codes_per_site: int = 1000  # code cards per site: its most used codes that fired
    contexts: int = 4  # contexts per code card, spread evenly over its firings
    context: int = 8  # tokens of context on each side of the firing token
    context_chars: int = 60  # each side clipped to this many characters
    top_tokens: int = 5  # most frequent tokens per code
    label_mix: int = 8  # most frequent label values per code (precision is exact for these)
    label_rows: int = 1000  # rows of the label (TokFSM state) table
    curve_points: int = 400  # points per usage curve and per training curve
    min_count: int = 5  # a code that fired on fewer tokens is rare
    similar: int = 5  # nearest codes by vector cosine per card (0: none)

    def check(self) -> None:
        for name, value in asdict(self).items():
            low = 0 if name in ("context", "contexts", "top_tokens", "label_mix", "similar") else 1
            if value < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _site_names(meta: dict[str, Any]) -> set[str] | None:
    """The checkpoint's site names as cbtool.json lists them; None when an entry does not list them."""
    names: set[str] = set()
    for cb in meta.get("codebooks") or []:
        if not isinstance(cb, dict) or not isinstance(cb.get("sites"), list):
            return None
        names.update(cb["sites"])
    return names


def checkpoint_part(path: Path) -> dict[str, Any]:
    """Model, sites, training summary and results, and the metrics log of a checkpoint (no weights loaded)."""
    from cbtool.formats.checkpoint import read_meta  # torch, when a report is built (not for --help)
    from cbtool.tasks.tokfsm import TokFSM

    meta = read_meta(path)
    log = metrics_log.FILE
    if log in meta["files"] and (not (path / log).is_file() or sha256_file(path / log) != meta["files"][log]):
        raise UserError(f"checkpoint {path}: {log} does not match its sha256 (corrupt or changed)")
    training = meta.get("training") or {}
    task = meta.get("task")
    is_fsm = isinstance(task, dict) and task.get("name") == "tokfsm"  # only TokFSM has a state graph to show
    neighbours = TokFSM.from_meta(meta, path).neighbours.tolist() if is_fsm else None
    return {
        "path": str(path),
        "sha256": sha256_file(path / "cbtool.json"),
        "cbtool_version": meta.get("cbtool_version"),
        "model": meta.get("model"),
        "task": meta.get("task"),
        "codebooks": meta.get("codebooks"),
        "training": {k: v for k, v in training.items() if k != "config"},
        "config": training.get("config") or {},
        "metrics": metrics_log.read_metrics(path, _site_names(meta)),
        "fsm_neighbours": neighbours,
    }


def _curve(sorted_counts: np.ndarray, points: int) -> list[list[int]]:
    """(rank, count) pairs of a descending count curve, at most `points`, log-spaced in rank, alive only."""
    alive = int((sorted_counts > 0).sum())
    if alive == 0:
        return []
    ranks = np.unique(np.round(np.geomspace(1, alive, num=min(points, alive))).astype(np.int64))
    return [[int(r), int(sorted_counts[r - 1])] for r in ranks]


class _ShardText:
    """One shard's text arrays, loaded on first use."""

    def __init__(self, store: Store, shard: int) -> None:
        self.text = store.text(shard)
        self.tokens = np.asarray(store.tokens(shard))
        self.spans = np.asarray(store.spans(shard)).astype(np.int64)
        self.doc_offsets = np.asarray(store.doc_offsets(shard)).astype(np.int64)


class StoreReader:
    """The store's per-shard text, the token strings, and label indices, shared by every site."""

    def __init__(self, store: Store, labels: str | None) -> None:
        self.store = store
        self.shards: dict[int, _ShardText] = {}
        self.feature: LabelFeature | None = None
        source = labels if labels is not None else (store.label_names[0] if store.label_names else None)
        if source is not None:
            self.feature = label_feature(store, source)
            self.label_index = np.concatenate(self.feature.index)
        self.tokens = np.concatenate([np.asarray(store.tokens(s)).astype(np.int64) for s in range(store.num_shards)])
        self._token_text: dict[int, str] = {}
        self._scores: dict[str, SiteScores] = {}

    def label_scores(self, site: str) -> SiteScores:
        """Hits of every (label value, code) of a site (computed once per site)."""
        assert self.feature is not None
        if site not in self._scores:
            self._scores[site] = score_labels(self.store, site, self.feature.index, len(self.feature.values))
        return self._scores[site]

    def shard(self, s: int) -> _ShardText:
        if s not in self.shards:
            self.shards[s] = _ShardText(self.store, s)
        return self.shards[s]

    def token_text(self, token: int, position: int) -> str:
        """A token's characters at a position where it occurs (or its name for BOS-like tokens)."""
        if token not in self._token_text:
            s = int(np.searchsorted(self.store.token_offsets, position, side="right") - 1)
            sh = self.shard(s)
            p = position - int(self.store.token_offsets[s])
            self._token_text[token] = self.store.token_string(token, sh.text, sh.spans[p])
        return self._token_text[token]

    def contexts(self, positions: np.ndarray, width: int, clip: int) -> list[list[Any]]:
        """[left, token, right, label] around global token positions, each within its document."""
        offsets = self.store.token_offsets
        shard_of = np.searchsorted(offsets, positions, side="right") - 1
        out: list[list[Any]] = [[] for _ in range(len(positions))]
        for s in np.unique(shard_of).tolist():
            idx = np.flatnonzero(shard_of == s)
            sh = self.shard(s)
            p = positions[idx] - offsets[s]
            d = np.searchsorted(sh.doc_offsets, p, side="right") - 1
            lo = np.maximum(sh.doc_offsets[d], p - width)
            hi = np.minimum(sh.doc_offsets[d + 1], p + width + 1)
            a, b = sh.spans[p, 0], sh.spans[p, 1]
            left_start = np.minimum(sh.spans[lo, 0], a)
            right_end = np.maximum(sh.spans[hi - 1, 1], b)
            labels: list[Any] = [None] * len(idx)
            if self.feature is not None:
                v = self.label_index[positions[idx]]
                labels = [str(self.feature.values[x]) if x >= 0 else None for x in v.tolist()]
            text = sh.text
            rows = zip(idx.tolist(), p.tolist(), a.tolist(), b.tolist(), left_start.tolist(), right_end.tolist(),
                       labels, strict=True)
            for i, pos, x, y, ls, re, lab in rows:
                tok = text[x:y] if y > x else self.store.token_string(int(sh.tokens[pos]), text, (x, y))
                out[i] = [text[ls:x][-clip:], tok, text[max(x, y):re][:clip], lab]
        return out


def _spread(fires: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per code, `n` firing indices spread evenly over its `fires` (as show-code picks examples), and a mask of
    the distinct ones (a code with fewer firings than `n` repeats indices)."""
    steps = np.linspace(0.0, 1.0, num=max(n, 1))[None, :n]
    picks = np.round(steps * (fires[:, None] - 1)).astype(np.int64)
    keep = np.ones_like(picks, dtype=bool)
    keep[:, 1:] = np.diff(picks, axis=1) > 0
    return picks, keep


def _top_per_group(group: np.ndarray, count: np.ndarray, tie: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` largest counts within each group (ties by `tie`), grouped, best first."""
    order = np.lexsort((tie, -count, group))
    g = group[order]
    start = np.searchsorted(g, g, side="left")
    return order[np.arange(len(g)) - start < n]


def site_part(reader: StoreReader, site: str, index: int, limits: Limits) -> tuple[dict[str, Any], list[dict]]:
    """One site's usage statistics and its code cards."""
    store = reader.store
    usage = site_usage(store, site, limits.min_count, 0)
    counts = store.counts(site)
    order = np.lexsort((np.arange(len(counts)), -counts))
    usage.pop("most_used", None)
    usage["dead_codes"] = usage["dead_codes"][:200]
    usage["rare_codes"] = usage["rare_codes"][:200]
    usage["curve"] = _curve(counts[order], limits.curve_points)
    chosen = order[: min(limits.codes_per_site, int((counts > 0).sum()))]
    if not len(chosen):
        return usage, []
    ids = np.concatenate([np.asarray(store.codes(s, site)) for s in range(store.num_shards)])
    k = ids.shape[1]
    flat = ids.reshape(-1).astype(np.int64)
    pos_of = np.argsort(flat, kind="stable")  # firings grouped by code, in token order
    starts = np.searchsorted(flat[pos_of], chosen)
    fires = counts[chosen]
    slot = np.full(len(counts), -1, dtype=np.int64)
    slot[chosen] = np.arange(len(chosen))
    # top tokens: counts of (code, token) pairs over the chosen codes' firings, the best few per code
    sel = np.flatnonzero(slot[flat] >= 0)
    vocab = int(reader.tokens.max()) + 1
    keys, first, n = np.unique(flat[sel] * vocab + reader.tokens[sel // k], return_index=True, return_counts=True)
    best = _top_per_group(keys // vocab, n, keys, limits.top_tokens)
    top: list[list[list[Any]]] = [[] for _ in chosen]
    for j, code, tok, cnt in zip(best.tolist(), (keys[best] // vocab).tolist(), (keys[best] % vocab).tolist(),
                                 n[best].tolist(), strict=True):
        top[slot[code]].append([reader.token_text(tok, int(sel[first[j]] // k)), cnt])
    mix: list[list[list[Any]]] = [[] for _ in chosen]
    if reader.feature is not None and limits.label_mix:
        sub = reader.label_scores(site).hits[:, chosen]  # (V, chosen)
        best_v = np.argsort(-sub, axis=0, kind="stable")[: limits.label_mix]
        values = [str(v) for v in reader.feature.values]
        for j, (vs, hs) in enumerate(zip(best_v.T.tolist(), np.take_along_axis(sub, best_v, 0).T.tolist(),
                                         strict=True)):
            mix[j] = [[values[v], h] for v, h in zip(vs, hs, strict=True) if h > 0]
    if store.has_acts(site):  # the strongest firings, strongest first
        acts = np.concatenate([np.asarray(store.acts(s, site)) for s in range(store.num_shards)]).reshape(-1)
        rows, flat_at = [], []
        for r, (st, n) in enumerate(zip(starts.tolist(), fires.tolist(), strict=True)):
            group = pos_of[st:st + n]
            best = group[np.argsort(-acts[group], kind="stable")[:limits.contexts]]
            rows.extend([r] * len(best))
            flat_at.extend(best.tolist())
        rows = np.asarray(rows, dtype=np.int64)
        positions = np.asarray(flat_at, dtype=np.int64) // k
    else:
        picks, keep = _spread(fires, limits.contexts)
        rows, cols = np.nonzero(keep)
        positions = pos_of[starts[rows] + picks[rows, cols]] // k
    found = reader.contexts(positions, limits.context, limits.context_chars)
    ctx: list[list[list[Any]]] = [[] for _ in chosen]
    for r, c in zip(rows.tolist(), found, strict=True):
        ctx[r].append(c)
    return usage, [{"s": index, "c": c, "f": f, "t": t, "x": x, "m": m}
                   for c, f, t, x, m in zip(chosen.tolist(), fires.tolist(), top, ctx, mix, strict=True)]


def label_table(reader: StoreReader, sites: list[str], neighbours: list[list[int]] | None,
                limits: Limits) -> dict[str, Any] | None:
    """Per label value (TokFSM: state): its tokens and its best code over all sites by F1."""
    feat = reader.feature
    if feat is None:
        return None
    nv = min(len(feat.values), limits.label_rows)
    best_f1 = np.full(nv, -1.0)
    rows: list[dict[str, Any]] = [{"value": str(v), "tokens": 0, "code": None, "sites_p90": 0}
                                  for v in feat.values[:nv]]
    for site in sites:
        sc = reader.label_scores(site)
        p, r, f1 = sc.precision[:nv], sc.recall[:nv], sc.f1[:nv]
        best = np.argmax(f1, axis=1)
        sizes = np.asarray(sc.feature_size)[:nv]
        p90 = ((p >= 0.9) & (sc.fires[None, :] >= limits.min_count)).any(axis=1)
        for v in range(nv):
            c = int(best[v])
            rows[v]["tokens"] = int(sizes[v])
            rows[v]["sites_p90"] += int(p90[v])
            if f1[v, c] > max(best_f1[v], 0.0):
                best_f1[v] = f1[v, c]
                rows[v].update(code=f"{site}:{c}", precision=float(p[v, c]), recall=float(r[v, c]),
                               f1=float(f1[v, c]))
    if neighbours is not None and feat.name == "state":
        for row in rows:
            v = int(row["value"])
            if 0 <= v < len(neighbours):
                row["next"] = sorted(neighbours[v])
    return {"name": feat.name, "values": len(feat.values), "shown": nv, "rows": rows}


def read_include(path: Path) -> dict[str, Any]:
    """A `--json` document of another cbtool command (intervene --fsm-eval, intervene, find-codes, ...)."""
    if not Path(path).exists():
        raise UserError(f"--include {path} does not exist")
    doc = strict_json.loads(read_text(Path(path), "--include"), f"--include {path}")
    if not isinstance(doc, dict):
        raise UserError(f"--include {path}: expected one JSON object (a cbtool --json output)")
    return {"file": str(path), "kind": str(doc.get("kind") or "json"), "doc": doc}


def attach_similar(store: Store, cards: list[dict[str, Any]], n: int) -> str | None:
    """Give each card its `n` nearest codes of the same codebook by vector cosine (`cbtool show-code --similar`'s
    cosine column), as `n` = [[code id, cosine, fires], ...]. Returns why there are none when the store's checkpoint
    cannot be read (then the cards have none)."""
    if n <= 0 or not cards:
        return None
    from cbtool.analysis.similar import nearest_by_cosine, store_unit_vectors

    try:
        units = store_unit_vectors(store)
    except UserError as e:
        return f"nearest codes by cosine are not shown: {e}"
    sites = list(store.sites)
    for i, site in enumerate(sites):
        mine = [c for c in cards if c["s"] == i]
        near = nearest_by_cosine(units[site], np.array([c["c"] for c in mine], dtype=np.int64), n)
        fires = store.counts(site)
        for c, nb in zip(mine, near, strict=True):
            c["n"] = [[b, round(v, 4), int(fires[b])] for b, v in nb]
    return None


def attach_explanations(includes: list[dict[str, Any]], store: Store, cards: list[dict[str, Any]]) -> None:
    """Give each card the hypothesis an included `cbtool explain --json` of this store kept for its code, as
    `e` = [family, hypothesis, precision, recall, F1, find-codes arguments, explained (precision >= the run's
    --min-precision)]. An explain output of another store is refused: every row's firing count must be the
    store's own count of that code."""
    index = {site: i for i, site in enumerate(store.sites)}
    counts = {site: store.counts(site) for site in store.sites}
    found: dict[tuple[int, int], list[Any]] = {}
    for inc in includes:
        if inc["kind"] != "explain":
            continue
        doc, name = inc["doc"], inc["file"]
        if not isinstance(doc.get("rows"), list) or not isinstance(doc.get("min_precision"), int | float):
            raise UserError(f"--include {name}: not a `cbtool explain --json` output (no rows / min_precision)")
        for r in doc["rows"]:
            try:
                site, code, fires = r["site"], int(r["code_id"]), int(r["fires"])
                have = int(counts[site][code]) if site in counts and 0 <= code < len(counts[site]) else None
                if have != fires:
                    raise UserError(f"--include {name}: an explain output of another store ({doc.get('store')}): "
                                    f"{r['code']} fires {fires:,} times there, {store.path} has "
                                    f"{'no such code' if have is None else f'{have:,}'}; run `cbtool explain "
                                    f"{store.path} --json`")
                if r["family"] is not None:
                    p = float(r["precision"])
                    found[(index[site], code)] = [str(r["family"]), str(r["hypothesis"]), p, float(r["recall"]),
                                                  float(r["f1"]), shell_query(r["query"]),
                                                  p >= float(doc["min_precision"])]
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise UserError(f"--include {name}: not a `cbtool explain --json` output (a row lacks "
                                f"{e if isinstance(e, KeyError) else 'a valid field'})") from None
    for c in cards:
        if (c["s"], c["c"]) in found:
            c["e"] = found[(c["s"], c["c"])]


def build(checkpoint: Path | None, store: Store | None, includes: list[Path], limits: Limits,
          labels: str | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain JSON-able data."""
    limits.check()
    data: dict[str, Any] = {"limits": asdict(limits), "includes": [read_include(p) for p in includes]}
    data["checkpoint"] = checkpoint_part(Path(checkpoint)) if checkpoint is not None else None
    if store is None:
        data["store"] = None
        return data
    reader = StoreReader(store, labels)
    sites = list(store.sites)
    site_rows, cards = [], []
    for i, site in enumerate(sites):
        usage, site_cards = site_part(reader, site, i, limits)
        entry = store.site_entries[site]
        site_rows.append({**usage, "k": int(entry["k"]), "dim": int(entry["dim"])})
        cards.extend(site_cards)
    neighbours = (data["checkpoint"] or {}).get("fsm_neighbours")
    data["store"] = {
        "path": str(store.path), "tokens": store.num_tokens, "docs": store.num_docs,
        "corpus": store.manifest.get("corpus"), "checkpoint": store.manifest.get("checkpoint"),
        "sites": site_rows, "labels": reader.feature.name if reader.feature else None,
        "label_values": [str(v) for v in reader.feature.values] if reader.feature else [],
        "label_table": label_table(reader, sites, neighbours, limits),
    }
    attach_explanations(data["includes"], store, cards)
    data["store"]["similar_note"] = attach_similar(store, cards, limits.similar)
    data["codes"] = cards
    return data


def write_report(data: dict[str, Any], path: Path) -> int:
    """Render and write the report atomically; returns its size in bytes."""
    from cbtool.report.html import render

    html = render(data)
    try:
        atomic_write_text(path, html)
        readable(path)
    except OSError as e:
        raise UserError(f"cannot write report {path}: {e.strerror or e}") from None
    return len(html.encode("utf-8"))
