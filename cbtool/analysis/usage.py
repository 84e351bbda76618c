"""Code usage over a code store: dead and rare codes, usage entropy (`cbtool dead-codes`; docs/definitions.md)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbtool.errors import UserError
from cbtool.formats.store import Store


def site_usage(store: Store, site: str, min_count: int, top: int) -> dict[str, Any]:
    """Dead/rare counts, share alive, usage entropy (bits) and perplexity, most used codes of a site. An SAE
    store's padding code (its last, docs/formats.md "SAE stores") is not one of them."""
    counts = store.counts(site)
    latents = store.site_entries[site].get("latents")
    if isinstance(latents, int) and 0 < latents < len(counts):
        counts = counts[:latents]
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


def check_options(min_count: int = 5, top: int = 3, max_dead_frac: float | None = None) -> None:
    """Refuse malformed options (one UserError line) before any store is read."""
    if min_count < 1:
        raise UserError(f"--min-count must be >= 1, got {min_count}")
    if top < 0:
        raise UserError(f"--top must be >= 0, got {top}")
    if max_dead_frac is not None and not 0.0 <= max_dead_frac <= 1.0:
        raise UserError(f"--max-dead-frac must be in [0, 1], got {max_dead_frac}")


def dead_codes(store: Store, sites: str | None = None, min_count: int = 5, top: int = 3,
               max_dead_frac: float | None = None) -> dict[str, Any]:
    """`site_usage` of every chosen site (globs, None = all) and the sites with a larger share of dead codes
    than `max_dead_frac` (`failing`). What `cbtool dead-codes --json` prints."""
    check_options(min_count, top, max_dead_frac)
    rows = [site_usage(store, s, min_count, top) for s in store.select_sites(sites)]
    failing = [r["site"] for r in rows if max_dead_frac is not None and r["dead_frac"] > max_dead_frac]
    return {"store": str(store.path), "tokens": store.num_tokens, "min_count": min_count,
            "max_dead_frac": max_dead_frac, "failing": failing, "sites": rows}
