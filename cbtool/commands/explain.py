"""`cbtool explain`: the best symbolic hypothesis of every live code and the census, and
with `--fsm` the TokFSM automaton recovered from each site's codes (docs/explain.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from cbtool.commands.common import RUN_OPTION_HELP, emit_json, emit_jsonl, keep_whole, open_run_store, out
from cbtool.errors import CheckFailed, UserError
from cbtool.explanations.automaton import DEFAULT_MIN_EDGE_COUNT, recover_automaton
from cbtool.explanations.explainer import (
    DEFAULT_MAX_COVERAGE,
    DEFAULT_MAX_SET,
    DEFAULT_MIN_COUNT,
    DEFAULT_MIN_F1_SHARE,
    DEFAULT_MIN_PRECISION,
    FAMILIES,
    check_explained,
    shell_query,
)
from cbtool.explanations.explainer import explain as explain_store


def explain(
    store_path: Path | None = typer.Argument(None, metavar="[STORE]", help="Code store (default RUN/codes)."),  # noqa: B008
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),  # noqa: B008
    sites: str | None = typer.Option(None, "--sites", help="Site globs, e.g. '*.mlp'."),
    min_count: int = typer.Option(DEFAULT_MIN_COUNT, "--min-count", help="Live codes: firing on >= this many "
                                  "tokens (the ones explained)."),
    min_precision: float = typer.Option(DEFAULT_MIN_PRECISION, "--min-precision",
                                        help="A code is explained when its kept hypothesis has this precision."),
    min_f1_share: float = typer.Option(DEFAULT_MIN_F1_SHARE, "--min-f1-share",
                                       help="Keep the best-F1 hypothesis of precision >= --min-precision over the "
                                       "best-F1 one when its F1 is >= this share of it (1: the best F1 only)."),
    max_set: int = typer.Option(DEFAULT_MAX_SET, "--max-set", help="At most this many tokens / n-grams per "
                                "hypothesis."),
    max_coverage: float = typer.Option(DEFAULT_MAX_COVERAGE, "--max-coverage",
                                       help="Hypotheses true of more than this share of the store's tokens are "
                                       "not explanations (1: no limit)."),
    families: str | None = typer.Option(None, "--families", help=f"Comma-separated subset of {', '.join(FAMILIES)} "
                                        "(default all)."),
    top: int = typer.Option(20, "--top", help="Codes to list in the table, most firing first (0 = all)."),
    require_explained: float | None = typer.Option(
        None, "--require-explained", help="Exit 1 when a site explains a smaller share of its live codes (CI)."),
    fsm: bool = typer.Option(False, "--fsm", help="TokFSM: also recover the automaton from each site's codes "
                             "and score its edges against the true FSM."),
    fsm_min_edge_count: int = typer.Option(DEFAULT_MIN_EDGE_COUNT, "--fsm-min-edge-count",
                                           help="--fsm: keep code-to-code edges seen at least this often."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
    as_jsonl: bool = typer.Option(False, "--jsonl", help="One JSON row per code on stdout."),
) -> None:
    """The best hypothesis of every live code (token, previous token, n-gram, character class, position,
    label), as a find-codes query that reproduces its precision, recall and F1; and the census per site.

    Examples:
      cbtool explain --sites '*.mlp'
      cbtool explain --require-explained 0.95 --sites 0.mlp      # CI: exit 1 below 95% explained
      cbtool explain --fsm --sites '*.mlp'                       # TokFSM: recover the automaton
      cbtool explain runs/a/codes --jsonl | jq -c 'select(.precision < 0.8)'
    """
    if as_json and as_jsonl:
        raise UserError("choose one of --json and --jsonl")
    if require_explained is not None and not 0.0 <= require_explained <= 1.0:
        raise UserError("--require-explained must be in [0, 1]")
    if top < 0:
        raise UserError("--top must be >= 0")
    store = open_run_store(store_path, run)
    doc = explain_store(store, sites=sites, min_count=min_count, min_precision=min_precision, max_set=max_set,
                        families=families, min_f1_share=min_f1_share, max_coverage=max_coverage)
    if fsm:
        doc["automaton"] = [recover_automaton(store, s, fsm_min_edge_count) for s in doc["sites"]]
    if as_json:
        emit_json("explain", doc)
    elif as_jsonl:
        emit_jsonl(doc["rows"])
    else:
        _print(doc, top)
    if require_explained is not None:
        low = check_explained(doc, require_explained)
        if low:
            raise CheckFailed(f"{len(low)} site(s) explain less than {require_explained:.1%} of their live codes "
                              f"at precision >= {min_precision}: {', '.join(low[:8])}{' ...' if len(low) > 8 else ''}")


def _fit(cells: dict[str, list[str]], width: int) -> tuple[list[str], list[str], bool]:
    """The columns of the code table that fit `width` beside the whole code ids and queries: the hypothesis
    (wrapped, >= 12 wide) first, then F1, precision, recall, fires and family, each at its widest cell; and
    whether the queries go below the table instead (one too long for a column of this width)."""
    def wide(col: str) -> int:  # a column's widest cell, or its header's longest word; + padding and border
        return max([len(c) for c in cells[col]] + [max(map(len, col.split()))]) + 3

    below = width - 1 - wide("code") - wide("find-codes query") < 0
    room = width - 1 - wide("code") - (0 if below else wide("find-codes query"))
    kept = {"code"} if below else {"code", "find-codes query"}
    for col in ("hypothesis", "F1", "precision", "recall", "fires", "family"):
        need = min(wide(col), 15) if col == "hypothesis" else wide(col)
        if need <= room:
            kept.add(col)
            room -= need
    order = list(cells)
    return [c for c in order if c in kept], [c for c in order if c not in kept and c != "find-codes query"], below


def _share(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _print(doc: dict[str, Any], top: int) -> None:
    rows = sorted(doc["rows"], key=lambda r: (-r["fires"], r["code"]))
    if top:
        rows = rows[:top]
    table = Table(title=f"best hypothesis per code (live: >= {doc['min_count']} fires), most firing first")
    queries = [shell_query(r["query"]) if r["query"] else "-" for r in rows]
    cells = {"code": [r["code"] for r in rows], "fires": [f"{r['fires']:,}" for r in rows],
             "family": [r["family"] or "-" for r in rows], "hypothesis": [r["hypothesis"] or "-" for r in rows],
             "find-codes query": queries, "precision": [f"{r['precision']:.3f}" for r in rows],
             "recall": [f"{r['recall']:.3f}" for r in rows], "F1": [f"{r['f1']:.3f}" for r in rows]}
    shown, dropped, below = _fit(cells, out.width)
    for col in shown:
        table.add_column(col, justify="right" if col in ("fires", "precision", "recall", "F1") else "left",
                         overflow="fold")
    for i in range(len(rows)):
        table.add_row(*(escape(cells[col][i]) for col in shown))
    out.print(keep_whole(table, "code", "find-codes query"))
    if below:  # a query longer than the table can hold: one line each, whole, to paste
        code_w = max(map(len, cells["code"]), default=0)
        out.print("find-codes queries, ready to paste:", markup=False)
        for code, query in zip(cells["code"], queries, strict=True):
            out.print(f"  {code:<{code_w}}  {query}", markup=False, highlight=False, soft_wrap=True)
    if dropped:
        out.print(f"(not shown at {out.width} columns, to keep every query whole on one line: {', '.join(dropped)}; "
                  f"a wider terminal, --json or --jsonl has every field)")
    census = Table(title=f"census: live codes explained at precision >= {doc['min_precision']} "
                         f"({doc['seconds']:.1f} s)")
    for col in ("site", "live codes", "explained", "share", "firing mass", "best-F1 share", "mean F1", "by family"):
        census.add_column(col, justify="left" if col in ("site", "by family") else "right")
    for site in [*doc["sites"], "all"]:
        c = doc["census"][site]
        fams = ", ".join(f"{f} {n}" for f, n in c["by_family"].items())
        census.add_row(site, f"{c['live_codes']:,}", f"{c['explained']:,}", _share(c["explained_share"]),
                       _share(c["firing_mass_share"]), _share(c["best_f1_explained_share"]),
                       "-" if c["mean_f1"] is None else f"{c['mean_f1']:.3f}", fams)
    out.print(keep_whole(census, "site"))
    if "automaton" in doc:
        at = Table(title="automaton recovered from codes (edges seen >= "
                         f"{doc['automaton'][0]['min_edge_count'] if doc['automaton'] else '-'} times)")
        for col in ("site", "codes", "kept code edges", "states mapped", "predicted edges", "edge precision",
                    "edge recall"):
            at.add_column(col, justify="left" if col == "site" else "right")
        for a in doc["automaton"]:
            at.add_row(a["site"], f"{a['codes']:,}", f"{a['kept_code_edges']:,}", str(a["states_mapped"]),
                       f"{a['predicted_edges']:,}", f"{a['edge_precision']:.3f}", f"{a['edge_recall']:.3f}")
        out.print(keep_whole(at, "site"))


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
