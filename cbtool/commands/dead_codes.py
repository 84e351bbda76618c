"""`cbtool dead-codes`: codes that never (or rarely) fire over the stored corpus, and usage entropy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.table import Table

from cbtool import plots
from cbtool.commands.common import RUN_OPTION_HELP, emit_json, err, out
from cbtool.commands.find_codes import open_store
from cbtool.errors import CheckFailed, UserError
from cbtool.plots import check_plot_path
from cbtool.store import Store


def site_usage(store: Store, site: str, min_count: int, top: int) -> dict[str, Any]:
    """Dead/rare counts, share alive, usage entropy (bits) and perplexity, most used codes of a site."""
    counts = store.counts(site)
    c = len(counts)
    total = int(counts.sum())
    dead = np.flatnonzero(counts == 0)
    rare = np.flatnonzero((counts > 0) & (counts < min_count))
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log2(p)).sum()) if total else 0.0
    order = np.lexsort((np.arange(c), -counts))[:top]
    return {
        "site": site,
        "codes": c,
        "dead": len(dead),
        "rare": len(rare),
        "alive_frac": 1 - len(dead) / c,
        "dead_frac": len(dead) / c,
        "entropy_bits": entropy,
        "perplexity": float(2.0**entropy),
        "max_entropy_bits": float(np.log2(c)),
        "fires_total": total,
        "most_used": [
            {
                "code": f"{site}:{int(i)}",
                "fires": int(counts[i]),
                "share_of_tokens": int(counts[i]) / max(store.num_tokens, 1),
            }
            for i in order
            if counts[i] > 0
        ],
        "dead_codes": dead.tolist(),
        "rare_codes": rare.tolist(),
    }


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
        None, "--plot", help="Also draw each site's sorted code usage to FILE.png or FILE.svg (needs cbtool[plot])."
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
    if min_count < 1:
        raise UserError(f"--min-count must be >= 1, got {min_count}")
    if top < 0:
        raise UserError(f"--top must be >= 0, got {top}")
    if max_dead_frac is not None and not 0.0 <= max_dead_frac <= 1.0:
        raise UserError(f"--max-dead-frac must be in [0, 1], got {max_dead_frac}")
    store = open_store(store_path, run)
    rows = [site_usage(store, s, min_count, top) for s in store.select_sites(sites)]
    failing = [r["site"] for r in rows if max_dead_frac is not None and r["dead_frac"] > max_dead_frac]
    if as_json:
        emit_json(
            "dead-codes",
            {
                "store": str(store.path),
                "tokens": store.num_tokens,
                "min_count": min_count,
                "max_dead_frac": max_dead_frac,
                "failing": failing,
                "sites": rows,
            },
        )
    else:
        table = Table(
            title=f"code usage over {store.num_tokens:,} stored tokens ({store.path}); "
            f"entropy in bits (max log2 C), perplexity = 2^entropy"
        )
        for col in ("site", "codes", "dead", f"rare<{min_count}", "alive", "entropy", "perplexity"):
            table.add_column(col, justify="left" if col == "site" else "right", no_wrap=True)
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
        out.print(table)
        if top:
            for r in rows:
                most = ", ".join(f"{m['code']} ({m['share_of_tokens']:.1%})" for m in r["most_used"])
                out.print(f"most used at {r['site']}: {most or 'none'}")
    if plot is not None:
        counts = {r["site"]: store.counts(r["site"]) for r in rows}
        plots.usage_curves(counts, plot, f"code usage over {store.num_tokens:,} tokens of {store.path}")
        err.print(f"plot written to {plot}")
    if failing:
        raise CheckFailed(
            f"{len(failing)} site(s) have more than {max_dead_frac:.1%} dead codes: "
            f"{', '.join(failing[:8])}{' ...' if len(failing) > 8 else ''}"
        )


def register(app: typer.Typer) -> None:
    app.command("dead-codes")(dead_codes)
