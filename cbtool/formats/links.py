"""Symlinks in a code store (cbtool/formats/store.py) never lead outside it.

A store may be copied, shared or unpacked from an archive; a shard file or directory replaced by a symlink
to a file elsewhere would make a reader (and a resuming writer) use bytes that are not the store's. Before
a store's manifest is read, every entry a reader or writer touches (manifest.json, each `shard-*` entry and
the files in each shard directory) that is a symlink must resolve inside the store directory; one that
resolves outside (or cannot be resolved) is refused with one line naming it. Links that stay inside are
fine. Only symlinks are resolved, so the check costs one directory listing per shard.
"""

from __future__ import annotations

import os
from pathlib import Path

from cbtool.errors import UserError


def _outside(entry: os.DirEntry, base: Path) -> str | None:
    """Where a symlink entry leads when that is outside `base` (or cannot be resolved); else None."""
    if not entry.is_symlink():
        return None
    try:
        target = Path(entry.path).resolve(strict=False)
    except (OSError, RuntimeError):  # a loop of links
        return "a loop of symlinks"
    return None if target == base or target.is_relative_to(base) else str(target)


def refuse_links_out(root: Path, manifest: str) -> None:
    """Refuse (UserError) a symlink among the store's manifest, shards and shard files that resolves outside
    `root`."""
    root = Path(root)
    base = root.resolve()

    def refuse(entry: os.DirEntry, target: str) -> None:
        raise UserError(f"store {root}: {os.path.relpath(entry.path, root)} is a symlink to {target}, outside "
                        f"the store; refusing to use it")

    try:
        with os.scandir(root) as top:
            entries = [e for e in top if e.name == manifest or e.name.startswith("shard-")]
    except OSError:
        return  # not a readable directory: the manifest read says so
    for entry in entries:
        target = _outside(entry, base)
        if target is not None:
            refuse(entry, target)
        try:
            if not entry.is_dir():
                continue
            with os.scandir(entry.path) as inner:
                for f in inner:
                    target = _outside(f, base)
                    if target is not None:
                        refuse(f, target)
        except OSError:
            continue  # an unreadable shard: reading it says so
