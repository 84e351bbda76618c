"""Codes near a code (`cbtool show-code --similar N`): by code-vector cosine and by firing-set overlap.

- cosine: between the code's vector and every other code vector of the same codebook (same site), read from
  the checkpoint the store was embedded from (an SAE store: the SAE's decoder rows); omitted (with the reason)
  when it is not available.
- Jaccard: |A n B| / |A u B| between the sets of token positions where the code fires (A) and where another
  code fires (B), over every site of the store (positions are shared across sites; with k = 1 two codes of
  one site never fire on the same token, so the neighbours come from the other sites).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cbtool.errors import UserError
from cbtool.formats.store import Store
from cbtool.model.refs import parse_code_ref


def jaccard_neighbours(store: Store, site: str, code: int, n: int) -> list[dict[str, Any]]:
    """The `n` codes of any site with the largest firing-set Jaccard with `site:code` (> 0), best first."""
    masks = [(np.asarray(store.codes(s, site)) == code).any(axis=1) for s in range(store.num_shards)]
    size = int(sum(int(m.sum()) for m in masks))
    rows = []
    for rank, other in enumerate(store.sites):
        c = store.sites[other].num_codes
        inter = np.zeros(c, dtype=np.int64)
        for s, m in enumerate(masks):
            if m.any():
                inter += np.bincount(np.asarray(store.codes(s, other)[m], dtype=np.int64).reshape(-1), minlength=c)
        fires = store.counts(other)
        union = size + fires - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            jac = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
        if other == site:
            jac[code] = 0.0
        for b in np.flatnonzero(jac > 0):
            rows.append((-float(jac[b]), rank, int(b), other, int(inter[b]), int(fires[b])))
    rows.sort()
    return [{"code": f"{o}:{b}", "site": o, "code_id": b, "jaccard": -j, "both": i, "fires": f}
            for j, _, b, o, i, f in rows[:n]]


def unit_vectors(store: Store, site: str, codebooks: dict[str, Any]) -> np.ndarray:
    """(C, dim) float64: the site's code vectors (from `cbtool.formats.checkpoint.load_codebooks` of the store's
    checkpoint) scaled to unit length."""
    st = store.sites[site]
    if st.spec.tensor_name not in codebooks:
        raise UserError(f"checkpoint {store.checkpoint_path} has no codebook {st.spec.tensor_name} for {site}")
    vectors = codebooks[st.spec.tensor_name][st.group].double().numpy()
    if vectors.shape[0] != st.num_codes:
        raise UserError(f"checkpoint {store.checkpoint_path}: codebook of {site} has {vectors.shape[0]} codes, "
                        f"the store {st.num_codes}")
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def store_unit_vectors(store: Store) -> dict[str, np.ndarray]:
    """Per site of the store, its code vectors at unit length: the codebooks of the store's checkpoint, or for a
    store embedded through an SAE its decoder rows (W_dec), read from the SAE folder the manifest names and
    re-verified by sha256. UserError (why not) when they cannot be read."""
    if isinstance(store.manifest.get("sae"), dict):
        from cbtool.formats.store import store_sae

        dec = store_sae(store).W_dec.double().numpy()
        unit = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12)
        unit = np.concatenate([unit, np.zeros((1, unit.shape[1]))])  # the padding code (formats/store.py)
        return dict.fromkeys(store.sites, unit)
    from cbtool.formats.checkpoint import load_codebooks

    store.check_checkpoint(required=True)
    codebooks = load_codebooks(store.checkpoint_path)
    return {site: unit_vectors(store, site, codebooks) for site in store.sites}


def nearest_by_cosine(unit: np.ndarray, codes: np.ndarray, n: int, chunk: int = 512) -> list[list[tuple[int, float]]]:
    """For each of `codes`, the `n` other codes of `unit` with the largest cosine, best first (ties: lower id,
    as `cosine_neighbours` orders them). Computed in chunks of `chunk` codes at a time."""
    n = min(n, len(unit) - 1)
    out: list[list[tuple[int, float]]] = []
    for lo in range(0, len(codes), chunk):
        part = np.asarray(codes[lo : lo + chunk], dtype=np.int64)
        cos = unit[part] @ unit.T
        cos[np.arange(len(part)), part] = -np.inf
        if n <= 0:
            out += [[] for _ in part]
            continue
        kth = np.partition(cos, len(unit) - n, axis=1)[:, len(unit) - n]  # the n-th largest of each row
        for row, v in zip(cos, kth, strict=True):
            cand = np.flatnonzero(row >= v)  # ties at the boundary all compete, by id
            best = cand[np.lexsort((cand, -row[cand]))][:n]
            out.append([(int(b), float(row[b])) for b in best])
    return out


def cosine_neighbours(store: Store, site: str, code: int, n: int) -> list[dict[str, Any]]:
    """The `n` codes of the same codebook whose vectors have the largest cosine with the code's, best first."""
    unit = store_unit_vectors(store)[site]
    cos = unit @ unit[code]
    cos[code] = -np.inf
    fires = store.counts(site)
    order = np.lexsort((np.arange(len(cos)), -cos))[: min(n, len(cos) - 1)]
    return [{"code": f"{site}:{int(b)}", "site": site, "code_id": int(b), "cosine": float(cos[b]),
             "fires": int(fires[b])} for b in order]


def similar_codes(store: Store, ref: str, n: int = 10) -> dict[str, Any]:
    """Nearest codes to `ref` by vector cosine (same site) and by firing-set Jaccard (every site)."""
    if n < 1:
        raise UserError("--similar must be >= 1")
    st, code = parse_code_ref(ref, store.sites)
    out: dict[str, Any] = {"jaccard": jaccard_neighbours(store, st.name, code, n)}
    try:
        out["cosine"] = cosine_neighbours(store, st.name, code, n)
    except UserError as e:
        out["cosine"] = None
        out["cosine_unavailable"] = str(e)
    return out
