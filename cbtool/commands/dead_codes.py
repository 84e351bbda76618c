"""`cbtool dead-codes`: codes that never (or rarely) fire over the stored corpus, and usage entropy."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from cbtool.analysis.usage import check_options
from cbtool.analysis.usage import dead_codes as dead_codes_of
from cbtool.commands.common import RUN_OPTION_HELP, emit_json, err, keep_whole, open_run_store, out
from cbtool.errors import CheckFailed
from cbtool.report import plots
from cbtool.report.plots import check_plot_path
from cbtool.util import distributed


def dead_codes(
    store_path: Path | None = typer.Argument(None, metavar="[STORE]", help="Code store (default RUN/codes)."),  # noqa: B008
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),  # noqa: B008
    sites: str | None = typer.Option(None, "--sites", help="Site globs, e.g. '*.mlp'."),
    min_count: int = typer.Option(5, "--min-count", help="Alive codes firing on fewer tokens count as rare."),
    top: int = typer.Option(3, "--top", help="Most used codes to list per site."),
    max_dead_frac: float | None = typer.Option(
        None,
        "--max-dead-frac",
        help="Exit 1 when any selected site has a larger share of dead codes (CI check).",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout (with dead code ids)."),
    plot: Path | None = typer.Option(  # noqa: B008
        None, "--plot", help="Also draw each site's sorted code usage to FILE.png or FILE.svg (needs matplotlib)."
    ),
) -> None:
    """Per site: codes, dead (never fired), rare (fired on < --min-count tokens), share alive, usage
    entropy and perplexity, and the most used codes.

    Examples:
      cbtool dead-codes
      cbtool dead-codes --sites '*.mlp' --max-dead-frac 0.1      # CI: exit 1 above 10% dead
      cbtool dead-codes runs/a/codes --json | jq '.sites[].dead'
      cbtool dead-codes --sites '*.mlp' --plot usage.png
    """
    plot = check_plot_path(plot)
    check_options(min_count, top, max_dead_frac)
    store = open_run_store(store_path, run)
    doc = dead_codes_of(store, sites, min_count, top, max_dead_frac)
    rows, failing = doc["sites"], doc["failing"]
    if as_json:
        emit_json("dead-codes", doc)
    else:
        table = Table(
            title=f"code usage over {store.num_tokens:,} stored tokens ({store.path}); "
            f"entropy in bits (max log2 C), perplexity = 2^entropy"
        )
        for col in ("site", "codes", "dead", f"rare<{min_count}", "alive", "entropy", "perplexity"):
            table.add_column(col, justify="left" if col == "site" else "right")
        for r in rows:
            table.add_row(
                r["site"],
                str(r["codes"]),
                str(r["dead"]),
                str(r["rare"]),
                f"{r['alive_frac']:.1%}",
                f"{r['entropy_bits']:.2f}",
                f"{r['perplexity']:.0f}",
            )
        out.print(keep_whole(table, "site"))
        if top:
            for r in rows:
                most = ", ".join(f"{m['code']} ({m['share_of_tokens']:.1%})" for m in r["most_used"])
                out.print(f"most used at {r['site']}: {most or 'none'}")
    if plot is not None:
        counts = {r["site"]: store.counts(r["site"]) for r in rows}  # under torchrun: on every rank
        if distributed.world().is_main:
            plots.usage_curves(counts, plot, f"code usage over {store.num_tokens:,} tokens of {store.path}")
            err.print(f"plot written to {plot}")
    if failing:
        raise CheckFailed(
            f"{len(failing)} site(s) have more than {max_dead_frac:.1%} dead codes: "
            f"{', '.join(failing[:8])}{' ...' if len(failing) > 8 else ''}"
        )


def register(app: typer.Typer) -> None:
    app.command("dead-codes")(dead_codes)
