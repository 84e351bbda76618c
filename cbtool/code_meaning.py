"""What a code stands for, in one line, from a code store: the label value it fires on most (with its
precision) and the tokens it fires on most. `cbtool intervene` prints it for every code it forces."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbtool.contexts import code_contexts
from cbtool.errors import UserError
from cbtool.refs import parse_code_ref
from cbtool.store import MANIFEST, Store, read_manifest


def code_meaning(store: Store, ref: str) -> str:
    """`state 45 (precision 0.99 of 512 firings); most on '5' x300, '4' x212` for a code `SITE:CODE`."""
    site, code = parse_code_ref(ref, store.sites)
    res = code_contexts(store, f"{site.name}:{code}", examples=0)
    if not res["fires"]:
        return f"fires on no token of {store.path}"
    parts = []
    for name in store.label_names:
        values, counts = np.unique(np.concatenate([
            np.asarray(store.labels(s, name))[(np.asarray(store.codes(s, site.name)) == code).any(axis=1)]
            for s in range(store.num_shards)]), return_counts=True)
        keep = values >= 0
        if keep.any():
            i = int(np.argmax(np.where(keep, counts, -1)))
            parts.append(f"{name} {int(values[i])} (precision {counts[i] / res['fires']:.2f} of "
                         f"{res['fires']:,} firings)")
    tokens = ", ".join(f"{t['token']!r} x{t['count']:,}" for t in res["top_tokens"][:3])
    return "; ".join([*parts, f"fires most on {tokens}"])


def matching_store(path: Path, checkpoint_sha256: str) -> Store | None:
    """The store at `path` when it is complete and was embedded from the checkpoint with that hash, else None."""
    if not (path / MANIFEST).is_file():
        return None
    try:
        man = read_manifest(path)
    except UserError:  # an unreadable store just gives no descriptions
        return None
    if not man.get("complete") or (man.get("checkpoint") or {}).get("sha256") != checkpoint_sha256:
        return None
    return Store(path)
