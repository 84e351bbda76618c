"""`cbtool find-codes`: precision/recall of every stored code against a regex or label feature."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from cbtool.commands.common import DEVICE_HELP, RUN_OPTION_HELP, default_store, emit_json, emit_jsonl, err, out
from cbtool.errors import CheckFailed, UserError
from cbtool.features import MATCH_ON, LabelFeature, label_feature, regex_feature
from cbtool.scoring import SiteScores, score_labels, score_mask
from cbtool.store import Store

SORTS = ("precision", "recall", "f1")


def open_store(path: Path | None, run: Path | None) -> Store:
    """Open a complete store and refuse it when its checkpoint has changed since (warn if moved)."""
    store = Store(default_store(path, run))
    warning = store.check_checkpoint(required=False)
    if warning:
        err.print(f"warning: {warning}", soft_wrap=True)
    return store


def _candidates(sc: SiteScores, min_precision: float, min_recall: float, min_count: int) -> np.ndarray:
    """Mask of codes that fired on the feature and pass the thresholds (any shape of hits)."""
    return (
        (sc.hits > 0) & (sc.precision >= min_precision) & (sc.recall >= min_recall) & (sc.fires >= min_count)
    )


def _order(
    metric: np.ndarray, second: np.ndarray, fires: np.ndarray, site_rank: np.ndarray, code: np.ndarray
) -> np.ndarray:
    """Best first: metric desc, then the other metric desc, fires desc, site order, code id."""
    return np.lexsort((code, site_rank, -fires, -second, -metric))


def _best_per_row(metric: np.ndarray, second: np.ndarray, fires: np.ndarray) -> np.ndarray:
    """Per row of (V, C): the column with the best metric, ties by `second`, then fires, then lowest id."""
    tie = metric == metric.max(axis=1, keepdims=True)
    sec = np.where(tie, second, -np.inf)
    tie &= sec == sec.max(axis=1, keepdims=True)
    return np.argmax(np.where(tie, fires[None, :], -1), axis=1)


def _example_tokens(
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
    return {
        c: [t for t, _ in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:n]] for c, d in counts.items()
    }


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def _feature_rows(
    store: Store,
    sites: list[str],
    masks: list[np.ndarray],
    sort: str,
    min_precision: float,
    min_recall: float,
    min_count: int,
) -> tuple[list[dict[str, Any]], int]:
    parts = []
    for rank, site in enumerate(sites):
        sc = score_mask(store, site, masks)
        keep = np.flatnonzero(_candidates(sc, min_precision, min_recall, min_count))
        parts.append((rank, site, sc, keep))
    site_rank = np.concatenate([np.full(len(k), r) for r, _, _, k in parts]) if parts else np.zeros(0)
    code = np.concatenate([k for *_, k in parts]).astype(np.int64)
    vals = {m: np.concatenate([sc.metric(m)[k] for _, _, sc, k in parts]) for m in SORTS}
    hits = np.concatenate([sc.hits[k] for _, _, sc, k in parts])
    fires = np.concatenate([sc.fires[k] for _, _, sc, k in parts])
    second = vals["recall"] if sort == "precision" else vals["precision"]
    order = _order(vals[sort], second, fires, site_rank, code)
    rows = []
    for i in order:
        site = sites[int(site_rank[i])]
        rows.append(
            {
                "code": f"{site}:{int(code[i])}",
                "site": site,
                "code_id": int(code[i]),
                "precision": float(vals["precision"][i]),
                "recall": float(vals["recall"][i]),
                "f1": float(vals["f1"][i]),
                "fires": int(fires[i]),
                "hits": int(hits[i]),
            }
        )
    return rows, len(rows)


def find_codes(
    store_path: Path | None = typer.Argument(None, metavar="[STORE]", help="Code store (default RUN/codes)."),  # noqa: B008
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),  # noqa: B008
    regex: str | None = typer.Option(
        None, "--regex", help="Feature: tokens overlapping a match in the text."
    ),
    match_on: str = typer.Option("all", "--match-on", help="Regex: 'all' tokens of a match or its 'first'."),
    labels: str | None = typer.Option(
        None,
        "--labels",
        help="Feature from labels: a stored label name "
        "(TokFSM: state) or a file (.npy, or text with one label per token).",
    ),
    label: str | None = typer.Option(
        None, "--label", help="One label value (default: a table of every value)."
    ),
    sites: str | None = typer.Option(None, "--sites", help="Site globs, e.g. '*.mlp' or '1.mlp,0.attn.h*'."),
    min_precision: float = typer.Option(0.0, "--min-precision", help="Only codes with precision >= this."),
    min_recall: float = typer.Option(0.0, "--min-recall", help="Only codes with recall >= this."),
    min_count: int = typer.Option(1, "--min-count", help="Only codes that fire on >= this many tokens."),
    top: int = typer.Option(20, "--top", help="Rows to show (0 = all)."),
    sort: str = typer.Option("f1", "--sort", help="precision, recall or f1."),
    examples: int = typer.Option(3, "--examples", help="Example tokens per code (regex / --label)."),
    require: bool = typer.Option(False, "--require", help="Exit 1 when no code meets the thresholds (CI)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    as_jsonl: bool = typer.Option(False, "--jsonl", help="One JSON row per line on stdout."),
    baseline: str | None = typer.Option(None, "--baseline", help="neurons: each row also gets the neuron "
                                        "with the highest precision at the code's recall (re-runs the model)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="--baseline: the store's checkpoint "  # noqa: B008
                                           "(default: the one it was embedded from)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Precision, recall and F1 of every code against a feature; best codes first.

    Examples:
      cbtool find-codes --regex "January|February" --min-precision 0.9
      cbtool find-codes --labels state                  # every TokFSM state -> its best code
      cbtool find-codes --labels state --label 42 --sites '*.mlp' --top 5
      cbtool find-codes --labels my_labels.npy --require --min-precision 0.8   # CI check (exit 1)
      cbtool find-codes --labels state --baseline neurons   # codes vs the best single neuron
    """
    if baseline not in (None, "neurons"):
        raise UserError(f"unknown --baseline {baseline!r}: use neurons")
    neurons = _NeuronBaseline(device) if baseline else None
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
    if top < 0 or examples < 0:
        raise UserError("--top and --examples must be >= 0")
    if as_json and as_jsonl:
        raise UserError("choose one of --json and --jsonl")
    store = open_store(store_path, run)
    chosen = store.select_sites(sites)
    thresholds = {"min_precision": min_precision, "min_recall": min_recall, "min_count": min_count}
    base = {
        "store": str(store.path),
        "tokens": store.num_tokens,
        "sites": chosen,
        "sort": sort,
        "thresholds": thresholds,
    }

    if labels is not None and label is None:
        feat = label_feature(store, labels)
        _label_table(
            store, chosen, feat, sort, min_precision, min_recall, min_count, require, as_json, as_jsonl, base,
            neurons and neurons.bind(store, checkpoint),
        )
        return

    if regex is not None:
        masks = regex_feature(store, regex, match_on)
        query = {"mode": "regex", "regex": regex, "match_on": match_on}
        title = f"/{regex}/ (match-on {match_on})"
    else:
        feat = label_feature(store, labels)  # type: ignore[arg-type]
        v = feat.value_index(label)  # type: ignore[arg-type]
        masks = [idx == v for idx in feat.index]
        query = {"mode": "label", "labels": feat.name, "label": feat.values[v]}
        title = f"{feat.name} = {feat.values[v]}"
    size = int(sum(int(m.sum()) for m in masks))
    if size == 0:
        err.print(f"warning: the feature {title} selects no token of the store", soft_wrap=True)
    rows, total = _feature_rows(store, chosen, masks, sort, min_precision, min_recall, min_count)
    shown = rows if top == 0 else rows[:top]
    if examples and (not as_jsonl or shown):
        for site in dict.fromkeys(r["site"] for r in shown):
            ex = _example_tokens(
                store, site, masks, [r["code_id"] for r in shown if r["site"] == site], examples
            )
            for r in shown:
                if r["site"] == site:
                    r["examples"] = ex[r["code_id"]]
    if neurons:
        mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
        base["baseline"] = neurons.bind(store, checkpoint)(shown, [mask] * len(shown))
    if as_json:
        emit_json(
            "find-codes", {**base, **query, "feature_tokens": size, "matching_codes": total, "rows": shown}
        )
    elif as_jsonl:
        emit_jsonl(shown)
    else:
        table = Table(
            title=f"codes for {title}: {size:,} of {store.num_tokens:,} tokens; "
            f"{total} code(s) pass the thresholds"
        )
        cols = ["code", "precision", "recall", "F1", "fires", "hits", "examples"]
        cols += ["best neuron", "its precision"] if neurons else []
        for col in cols:
            table.add_column(col, justify="left" if col in ("code", "examples", "best neuron") else "right")
        for r in shown:
            table.add_row(
                r["code"],
                _fmt(r["precision"]),
                _fmt(r["recall"]),
                _fmt(r["f1"]),
                f"{r['fires']:,}",
                f"{r['hits']:,}",
                " ".join(repr(t) for t in r.get("examples", [])),
                *([r["neuron"], _fmt(r["neuron_precision"])] if neurons else []),
            )
        out.print(table)
        if neurons:
            out.print(_beat_line(base["baseline"]))
    if require and total == 0:
        raise CheckFailed(
            f"no code has precision >= {min_precision}, recall >= {min_recall} and "
            f">= {min_count} fires for {title}"
        )


def _label_table(
    store: Store,
    sites: list[str],
    feat: LabelFeature,
    sort: str,
    min_precision: float,
    min_recall: float,
    min_count: int,
    require: bool,
    as_json: bool,
    as_jsonl: bool,
    base: dict[str, Any],
    neurons: Any = None,
) -> None:
    """One row per label value with its best code over the selected sites, plus per-site summaries;
    `neurons` (a bound _NeuronBaseline): each site's best code per value vs its best neuron."""
    nv = len(feat.values)
    if nv == 0:
        raise UserError(f"labels {feat.name!r} have no values on this store")
    best_metric = np.full(nv, -1.0)
    best: list[dict[str, Any] | None] = [None] * nv
    per_site: dict[str, dict[str, Any]] = {}
    sizes = np.zeros(nv, dtype=np.int64)
    site_rows: list[dict[str, Any]] = []  # each site's best code per value (for the neuron baseline)
    for site in sites:
        sc = score_labels(store, site, feat.index, nv)
        sizes = np.asarray(sc.feature_size)
        ok = _candidates(sc, min_precision, min_recall, min_count)
        metric = np.where(ok, sc.metric(sort), -1.0)
        second = np.where(ok, (sc.recall if sort == "precision" else sc.precision), -1.0)
        combo = _best_per_row(metric, second, sc.fires)
        rows_v = np.arange(nv)
        has = ok[rows_v, combo]
        p, r, f = sc.precision[rows_v, combo], sc.recall[rows_v, combo], sc.f1[rows_v, combo]
        per_site[site] = {
            "values_with_code": int(has.sum()),
            "mean_best_precision": float(np.where(has, p, 0.0).mean()),
            "mean_best_recall": float(np.where(has, r, 0.0).mean()),
            "values_with_precision_0.9": int((has & (p >= 0.9)).sum()),
        }
        site_rows += [{"site": site, "label_index": int(v), "code_id": int(combo[v]), "precision": float(p[v]),
                       "hits": int(sc.hits[v, combo[v]])} for v in np.flatnonzero(has)]
        for v in np.flatnonzero(has & (metric[rows_v, combo] > best_metric)):
            c = int(combo[v])
            best_metric[v] = metric[v, c]
            best[v] = {
                "code": f"{site}:{c}",
                "site": site,
                "code_id": c,
                "precision": float(p[v]),
                "recall": float(r[v]),
                "f1": float(f[v]),
                "fires": int(sc.fires[c]),
                "hits": int(sc.hits[v, c]),
            }
    if neurons:
        index = np.concatenate(feat.index) if feat.index else np.zeros(0, dtype=np.int64)
        masks = {v: index == v for v in {r["label_index"] for r in site_rows}}
        base["baseline"] = neurons(site_rows, [masks[r["label_index"]] for r in site_rows])
        for site in sites:
            mine = [r for r in site_rows if r["site"] == site]
            per_site[site].update(_site_beat(mine))
        found = {(r["site"], r["code_id"], r["label_index"]): r for r in site_rows}
        for v, b in enumerate(best):
            if b is not None:
                m = found[(b["site"], b["code_id"], v)]
                b.update({k: m[k] for k in m if k.startswith("neuron")})
    rows = [
        {"label": feat.values[v], "tokens": int(sizes[v]), **(best[v] or {"code": None})} for v in range(nv)
    ]
    with_code = sum(b is not None for b in best)
    summary = {
        "values": nv,
        "values_with_code": with_code,
        "values_with_precision_0.9": sum(1 for b in best if b and b["precision"] >= 0.9),
    }
    if as_json:
        emit_json(
            "find-codes",
            {
                **base,
                "mode": "label-table",
                "labels": feat.name,
                "summary": summary,
                "per_site": per_site,
                "rows": rows,
            },
        )
    elif as_jsonl:
        emit_jsonl(rows)
    else:
        table = Table(title=f"best code per value of {feat.name!r} (by {sort})")
        for col in ("label", "tokens", "code", "precision", "recall", "F1", "fires"):
            table.add_column(col, justify="left" if col in ("label", "code") else "right")
        for row in rows:
            if row["code"] is None:
                table.add_row(str(row["label"]), f"{row['tokens']:,}", "-", "", "", "", "")
            else:
                table.add_row(
                    str(row["label"]),
                    f"{row['tokens']:,}",
                    row["code"],
                    _fmt(row["precision"]),
                    _fmt(row["recall"]),
                    _fmt(row["f1"]),
                    f"{row['fires']:,}",
                )
        out.print(table)
        st = Table(title="per site: each value's best code at that site")
        cols = ["site", "values with a code", "precision >= 0.9", "mean precision", "mean recall"]
        cols += ["neuron precision (matched recall)", "codes beating / tying neuron"] if neurons else []
        for col in cols:
            st.add_column(col, justify="left" if col == "site" else "right")
        for site, d in per_site.items():
            st.add_row(
                site,
                f"{d['values_with_code']}/{nv}",
                f"{d['values_with_precision_0.9']}/{nv}",
                _fmt(d["mean_best_precision"]),
                _fmt(d["mean_best_recall"]),
                *([_fmt(d["mean_neuron_precision"]) if d["codes"] else "-",
                   f"{d['codes_beating_neuron']} / {d['codes_tying_neuron']} of {d['codes']}"] if neurons else []),
            )
        out.print(st)
        if neurons:
            out.print(_beat_line(base["baseline"]))
        out.print(
            f"{with_code} of {nv} values of {feat.name!r} have a code with precision >= {min_precision}, "
            f"recall >= {min_recall} and >= {min_count} fires; "
            f"{summary['values_with_precision_0.9']} have one with precision >= 0.9"
        )
    if require and with_code == 0:
        raise CheckFailed(
            f"no code has precision >= {min_precision}, recall >= {min_recall} and "
            f">= {min_count} fires for any value of {feat.name!r}"
        )


class _NeuronBaseline:
    """`--baseline neurons`, bound to a store and checkpoint: rows + features -> summary (cbtool.neurons)."""

    def __init__(self, device: str) -> None:
        from cbtool.train import resolve_device

        self.device = resolve_device(device)

    def bind(self, store: Store, checkpoint: Path | None):
        from cbtool.neurons import neuron_baseline

        return lambda rows, features: neuron_baseline(store, checkpoint, self.device, rows, features,
                                                      log=lambda m: err.print(f"[dim]{m}[/dim]"))


def _site_beat(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {"codes": n, "codes_beating_neuron": sum(r["precision"] > r["neuron_precision"] for r in rows),
            "codes_tying_neuron": sum(r["precision"] == r["neuron_precision"] for r in rows),
            "mean_code_precision": float(np.mean([r["precision"] for r in rows])) if n else None,
            "mean_neuron_precision": float(np.mean([r["neuron_precision"] for r in rows])) if n else None}


def _beat_line(summary: dict[str, Any]) -> str:
    if not summary["codes"]:
        return "no code to compare with neurons"
    return (f"{summary['codes_beating_neuron']} of {summary['codes']} codes "
            f"({summary['share_beating_neuron']:.1%}) are more precise than their best neuron at the same recall, "
            f"{summary['codes_tying_neuron']} as precise "
            f"(mean precision codes {summary['mean_code_precision']:.3f}, neurons "
            f"{summary['mean_neuron_precision']:.3f}; {summary['neurons']:,} neurons of {summary['checkpoint']})")


def register(app: typer.Typer) -> None:
    app.command("find-codes")(find_codes)
