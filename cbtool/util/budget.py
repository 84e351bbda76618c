"""Requests that cannot fit, refused before they start (docs/cli.md "Exit codes").

Each estimate is a lower bound of what a request needs (the arrays it must hold at once, or the bytes it must
write), so a refusal is never wrong: a request is refused when even that bound exceeds the machine's physical
memory (MemTotal in /proc/meminfo, else os.sysconf) or the free space of the filesystem it writes to. Sizes
that fit the bound may still be slow or fail later; sizes beyond it cannot succeed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cbtool.errors import UserError

GIB = 2**30


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine (None when unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, AttributeError):
        return None


def free_disk(path: Path) -> int | None:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"


def check_memory(need: float, what: str, hint: str, limit: int | None = None) -> None:
    """Refuse when `need` bytes (a lower bound) exceed `limit` (default: physical memory)."""
    limit = physical_memory() if limit is None else limit
    if limit is not None and need > limit:
        raise UserError(f"{what} needs at least {_gib(need)} of memory (a lower bound), more than the "
                        f"{_gib(limit)} this machine has; {hint}")


def check_disk(need: float, path: Path, what: str, hint: str) -> None:
    """Refuse when writing `need` bytes (a lower bound) under `path` cannot fit its filesystem's free space."""
    free = free_disk(path)
    if free is not None and need > free:
        raise UserError(f"{what} would write at least {_gib(need)} (a lower bound) to {path}, more than the "
                        f"{_gib(free)} free there; {hint}")
