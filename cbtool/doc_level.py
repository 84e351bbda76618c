"""Document-level features (`find-codes --regex RE --level document`): topic codes.

The unit is the document. The feature is the set of documents whose text has a (non-empty) match of RE; a code
*appears* in a document when it fires on at least one of its tokens. precision = documents where the code
appears that match / documents where it appears; recall = matching documents where it appears / matching
documents. `fires` and `hits` of these rows count documents (docs/definitions.md).
"""

from __future__ import annotations

import numpy as np

from cbtool.features import match_ranges
from cbtool.regexes import UserRegex
from cbtool.scoring import SiteScores
from cbtool.store import Store

LEVELS = ("token", "document")


def matching_documents(store: Store, pattern: str) -> list[np.ndarray]:
    """Per shard: (docs,) bool, whether each document has a non-empty match of `pattern`."""
    regex = UserRegex(pattern)
    out = []
    for s in range(store.num_shards):
        doc_chars = np.asarray(store.doc_chars(s), dtype=np.int64)
        starts, _ = match_ranges(regex, store.text(s), doc_chars)
        hit = np.zeros(len(doc_chars) - 1, dtype=bool)
        hit[np.searchsorted(doc_chars, starts, side="right") - 1] = True
        out.append(hit)
    return out


def document_scores(store: Store, site: str, matching: list[np.ndarray]) -> SiteScores:
    """Per code of `site`: documents it appears in (fires), those that match (hits); |F| = matching documents."""
    c = store.sites[site].num_codes
    fires = np.zeros(c, dtype=np.int64)
    hits = np.zeros(c, dtype=np.int64)
    for s, match in enumerate(matching):
        offs = np.asarray(store.doc_offsets(s), dtype=np.int64)
        doc = np.repeat(np.arange(len(offs) - 1), np.diff(offs))
        ids = np.asarray(store.codes(s, site), dtype=np.int64)
        pairs = np.unique((doc[:, None] * c + ids).reshape(-1))
        fires += np.bincount(pairs % c, minlength=c)
        hits += np.bincount(pairs[match[pairs // c]] % c, minlength=c)
    return SiteScores(site, hits, fires, int(sum(int(m.sum()) for m in matching)))
