"""Which files of a store shard have had their sha256 checked: `shard-NNNNNN/.verified.json` (docs/formats.md).

A reader checks a shard file against the sha256 in its shard.json once, and records that it did, keyed by the
file's size, mtime, ctime and inode as they were before the hash was read. A later reader (any process) whose
file still has that same identity skips the hash: searching a store larger than memory does not re-read every
byte of it on each command. Writing, truncating, replacing or copying a file changes its identity, so the file
is checked again. What the record does not catch is a change that leaves all four alone (bit rot under the
filesystem); deleting the record makes the next reader check every file again.

The record is a cache: one that is missing, unreadable or malformed counts as empty, and one that cannot be
written (a read-only store) is not written. Ranks under torchrun read disjoint shards, so each shard's record
has one writer at a time in practice; two writers at once lose an entry at worst (checked again next time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cbtool.errors import UserError
from cbtool.util import strict_json
from cbtool.util.files import atomic_write_text

RECORD = ".verified.json"


def identity(path: Path) -> list[int]:
    """What changes when a file's bytes may have: size, mtime, ctime (ns), inode."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class VerifiedFiles:
    """The record of one shard directory: file name -> {"sha256", "identity"} of the checked file."""

    def __init__(self, shard_dir: Path) -> None:
        self.path = Path(shard_dir) / RECORD
        self.files: dict[str, dict[str, object]] = {}
        try:
            doc = strict_json.loads(self.path.read_text(encoding="utf-8"), str(self.path))
        except (OSError, UnicodeDecodeError, UserError):
            return
        files = doc.get("files") if isinstance(doc, dict) else None
        if isinstance(files, dict):
            self.files = {k: v for k, v in files.items() if isinstance(v, dict)}

    def known(self, name: str, sha256: str, ident: list[int]) -> bool:
        """Whether `name`, with this identity now, was checked against this sha256."""
        return self.files.get(name) == {"sha256": sha256, "identity": ident}

    def add(self, name: str, sha256: str, ident: list[int]) -> None:
        self.files[name] = {"sha256": sha256, "identity": ident}
        try:
            atomic_write_text(self.path, json.dumps({"files": self.files}, sort_keys=True))
        except OSError:
            pass  # a store we may read but not write: files are checked again by the next reader
