"""Code references `SITE:CODE` (docs/definitions.md)."""

from __future__ import annotations

import json
import re

from cbtool.errors import UserError
from cbtool.model.specs import Site
from cbtool.util import strict_json
from cbtool.util.limits import MAX_INT_DIGITS


def resolve_site(text: str, sites: dict[str, Site]) -> Site:
    """`L.mlp`, `L.attn`, `L.attn.hH`, or a bare layer `L` (its MLP site, else its only site)."""
    name = text.strip()
    if name in sites:
        return sites[name]
    if re.fullmatch(r"[0-9]+", name):
        layer = int(name) if len(name) <= MAX_INT_DIGITS else -1  # (no int() of thousands of digits: it raises)
        layer_sites = [s for s in sites.values() if s.spec.layer == layer]
        mlp = [s for s in layer_sites if s.spec.component == "mlp"]
        if mlp:
            return mlp[0]
        if len(layer_sites) == 1:
            return layer_sites[0]
        if not layer_sites:
            raise UserError(f"layer {name} has no codebook; sites: {_listing(sites)}")
        raise UserError(
            f"bare layer {name} is ambiguous: use one of {', '.join(s.name for s in layer_sites)}"
        )
    raise UserError(f"unknown site {name!r}; sites: {_listing(sites)}")


def parse_code_ref(text: str, sites: dict[str, Site]) -> tuple[Site, int]:
    """`SITE:CODE` -> (site, code), refusing malformed text and out-of-range codes."""
    m = re.fullmatch(r"\s*([^:\s]+)\s*:\s*(\S+)\s*", text)
    if not m:
        raise UserError(f"bad code reference {text!r}: expected SITE:CODE, e.g. 1.mlp:42")
    site = resolve_site(m.group(1), sites)
    if not re.fullmatch(r"[0-9]+", m.group(2)):
        raise UserError(f"bad code number {m.group(2)!r} in {text!r}: expected an integer >= 0")
    digits = m.group(2).lstrip("0") or "0"
    if len(digits) > MAX_INT_DIGITS or int(digits) >= site.num_codes:
        shown = digits if len(digits) <= 24 else f"{digits[:12]}...({len(digits)} digits)"
        raise UserError(f"code {shown} out of range for site {site.name} (0-{site.num_codes - 1})")
    return site, int(digits)


def _listing(sites: dict[str, Site], limit: int = 12) -> str:
    names = list(sites)
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def codes_from_results(text: str, where: str, pick: int, per_site: bool = False, best_sites: int | None = None
                       ) -> list[str]:
    """The `code` of the first `pick` rows of `find-codes` output (`--json` document or `--jsonl` rows), in the
    order find-codes ranked them: how `intervene --codes-from` takes its codes without hand-picking.
    `per_site`: the first `pick` rows of every site instead (codes at several layers, as the paper steers).
    `best_sites` N: the first `pick` rows of each of the N first sites (in the order of their best row) that
    have `pick` rows in the output: a head's whole code set, as the paper's topic steering replaces."""
    text = text.strip()
    if not text:
        raise UserError(f"{where}: empty; expected find-codes --json or --jsonl output")
    try:
        if text.startswith("{") and "\n{" not in text:
            doc = strict_json.loads(text, where)
            rows = doc.get("rows") if isinstance(doc, dict) and "rows" in doc else [doc]
        else:
            rows = [strict_json.loads(line, where) for line in strict_json.lines(text) if line.strip()]
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{where}: not find-codes JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
    if not isinstance(rows, list):
        raise UserError(f"{where}: 'rows' is not a list")
    codes = [r["code"] for r in rows if isinstance(r, dict) and isinstance(r.get("code"), str)]
    if not codes:
        raise UserError(f"{where}: no rows with a 'code' (did find-codes find any code?)")
    if best_sites is not None:
        by_site: dict[str, list[str]] = {}
        for code in codes:
            by_site.setdefault(code.rpartition(":")[0], []).append(code)
        full = [site for site, cs in by_site.items() if len(cs) >= pick]
        if not full:
            raise UserError(f"{where}: no site has {pick} rows (--pick); give find-codes --top 0 (all rows) or a "
                            f"smaller --pick")
        return [c for site in full[:best_sites] for c in by_site[site][:pick]]
    if not per_site:
        return codes[:pick]
    seen: dict[str, int] = {}
    out = []
    for code in codes:
        site = code.rpartition(":")[0]
        seen[site] = seen.get(site, 0) + 1
        if seen[site] <= pick:
            out.append(code)
    return out
