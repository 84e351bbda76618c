"""`cbtool find-codes`: precision/recall of every stored code against a regex or label feature (docs/analyse.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from cbtool.analysis.search import GOOD_PRECISION, check_query, feature_title
from cbtool.analysis.search import find_codes as search
from cbtool.commands.common import (
    DEVICE_HELP,
    RUN_OPTION_HELP,
    emit_json,
    emit_jsonl,
    err,
    keep_whole,
    open_run_store,
    out,
)
from cbtool.errors import CheckFailed, UserError
from cbtool.report import plots
from cbtool.report.plots import check_plot_path
from cbtool.util import distributed


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def find_codes(
    store_path: Path | None = typer.Argument(None, metavar="[STORE]", help="Code store (default RUN/codes)."),  # noqa: B008
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),  # noqa: B008
    regex: str | None = typer.Option(
        None, "--regex", help="Feature: tokens overlapping a match in the text."
    ),
    match_on: str = typer.Option("all", "--match-on", help="Regex: 'all' tokens of a match or its 'first'."),
    window: int | None = typer.Option(None, "--window", help="Regex: the feature is the N tokens after each "
                                      "match in its document (context codes; rank with --sort precision "
                                      "--min-count)."),
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
    top: int | None = typer.Option(None, "--top", show_default=False, help="Rows to show, best first (0 = all). "
                                   "(default: 20 codes; every value of a --labels table)"),
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
    level: str = typer.Option("token", "--level", help="token, or document: codes appearing in the documents "
                              "that match --regex (fires and hits count documents)."),
    plot: Path | None = typer.Option(  # noqa: B008
        None, "--plot", help="Also draw precision vs recall of the candidate codes to FILE.png or FILE.svg."
    ),
) -> None:
    """Precision, recall and F1 of every code against a feature; best codes first.

    Examples:
      cbtool find-codes --regex "January|February" --min-precision 0.9
      cbtool find-codes --labels state                  # every TokFSM state -> its best code
      cbtool find-codes --labels state --label 42 --sites '*.mlp' --top 5
      cbtool find-codes --labels my_labels.npy --require --min-precision 0.8   # CI check (exit 1)
      cbtool find-codes --labels state --baseline neurons   # codes vs the best single neuron
      cbtool find-codes --regex "42" --plot pr.png
      cbtool find-codes --regex "(?i)king" --level document   # topic codes: documents that match
      cbtool find-codes --regex "(?i)\\b(sea|ships?)\\b" --window 64 --sort precision --min-count 50 --sites '0.attn.*'
    """
    plot = check_plot_path(plot)
    check_query(regex=regex, labels=labels, label=label, match_on=match_on, sort=sort, min_precision=min_precision,
                min_recall=min_recall, min_count=min_count, top=top, examples=examples, baseline=baseline,
                level=level, window=window)
    if as_json and as_jsonl:
        raise UserError("choose one of --json and --jsonl")
    dev: Any = "cpu"
    if baseline:
        from cbtool.model.devices import resolve_device

        dev = resolve_device(device)
    store = open_run_store(store_path, run)
    doc = search(store, regex=regex, labels=labels, label=label, sites=sites, match_on=match_on, sort=sort,
                 min_precision=min_precision, min_recall=min_recall, min_count=min_count, top=top,
                 examples=examples, baseline=baseline, checkpoint=checkpoint, device=dev,
                 log=lambda m: err.print(f"[dim]{m}[/dim]"), level=level, window=window)
    wanted = f"precision >= {min_precision}, recall >= {min_recall} and >= {min_count} fires"
    if doc["mode"] == "label-table":
        if as_json:
            emit_json("find-codes", doc)
        elif as_jsonl:
            emit_jsonl(doc["rows"])
        else:
            _print_label_table(doc, sort, wanted)
        _plot(doc["rows"], plot, f"each value of {doc['labels']!r}: its best code")
        if require and doc["summary"]["values_with_code"] == 0:
            raise CheckFailed(f"no code has {wanted} for any value of {doc['labels']!r}")
        return
    title = feature_title(doc)
    by_doc = doc.get("level") == "document"
    size, total, unit = ((doc["feature_documents"], doc["documents"], "documents") if by_doc
                         else (doc["feature_tokens"], store.num_tokens, "tokens"))
    if size == 0:
        err.print(f"warning: the feature {title} selects no {unit[:-1]} of the store", soft_wrap=True)
    if as_json:
        emit_json("find-codes", doc)
    elif as_jsonl:
        emit_jsonl(doc["rows"])
    else:
        table = Table(
            title=f"codes for {title}: {size:,} of {total:,} {unit}; "
            f"{doc['matching_codes']} code(s) pass the thresholds"
        )
        neurons = "baseline" in doc
        cols = ["code", "precision", "recall", "F1", *(("documents", "matching") if by_doc else ("fires", "hits")),
                "examples"]
        cols += ["best neuron", "its precision"] if neurons else []
        for col in cols:
            table.add_column(col, justify="left" if col in ("code", "examples", "best neuron") else "right")
        for r in doc["rows"]:
            table.add_row(r["code"], _fmt(r["precision"]), _fmt(r["recall"]), _fmt(r["f1"]), f"{r['fires']:,}",
                          f"{r['hits']:,}", " ".join(repr(t) for t in r.get("examples", [])),
                          *([r["neuron"], _fmt(r["neuron_precision"])] if neurons else []))
        out.print(keep_whole(table, "code", "best neuron"))
        if neurons:
            out.print(_beat_line(doc["baseline"]))
    _plot(doc["rows"], plot, f"candidate codes for {title}")
    if require and doc["matching_codes"] == 0:
        raise CheckFailed(f"no code has {wanted} for {title}")


def _plot(rows: list[dict[str, Any]], plot: Path | None, title: str) -> None:
    if plot is not None and distributed.world().is_main:  # under torchrun rank 0 writes files
        plots.precision_recall(rows, plot, title)
        err.print(f"plot written to {plot}")


def _print_label_table(doc: dict[str, Any], sort: str, wanted: str) -> None:
    nv, name, good = doc["summary"]["values"], doc["labels"], f"values_with_precision_{GOOD_PRECISION}"
    table = Table(title=f"best code per value of {name!r} (by {sort})")
    for col in ("label", "tokens", "code", "precision", "recall", "F1", "fires"):
        table.add_column(col, justify="left" if col in ("label", "code") else "right")
    for row in doc["rows"]:
        if row["code"] is None:
            table.add_row(str(row["label"]), f"{row['tokens']:,}", "-", "", "", "", "")
        else:
            table.add_row(str(row["label"]), f"{row['tokens']:,}", row["code"], _fmt(row["precision"]),
                          _fmt(row["recall"]), _fmt(row["f1"]), f"{row['fires']:,}")
    out.print(keep_whole(table, "code"))
    if len(doc["rows"]) < nv:
        out.print(f"{len(doc['rows'])} of {nv} values shown: those with the best codes by {sort} (--top 0 for all)")
    neurons = "baseline" in doc
    st = Table(title="per site: each value's best code at that site")
    cols = ["site", "values with a code", f"precision >= {GOOD_PRECISION}", "mean precision", "mean recall"]
    cols += ["neuron precision (matched recall)", "codes beating / tying neuron"] if neurons else []
    for col in cols:
        st.add_column(col, justify="left" if col == "site" else "right")
    for site, d in doc["per_site"].items():
        st.add_row(site, f"{d['values_with_code']}/{nv}", f"{d[good]}/{nv}", _fmt(d["mean_best_precision"]),
                   _fmt(d["mean_best_recall"]),
                   *([_fmt(d["mean_neuron_precision"]) if d["codes"] else "-",
                      f"{d['codes_beating_neuron']} / {d['codes_tying_neuron']} of {d['codes']}"] if neurons else []))
    out.print(keep_whole(st, "site"))
    if neurons:
        out.print(_beat_line(doc["baseline"]))
    best_good = doc["summary"][f"best_codes_with_precision_{GOOD_PRECISION}"]
    out.print(f"{doc['summary']['values_with_code']} of {nv} values of {name!r} have a code with {wanted}; "
              f"{doc['summary'][good]} have one of precision >= {GOOD_PRECISION} at some site (per-site table), "
              f"and for {best_good} the best code by {sort} (first table) reaches it")


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
