"""Lock files: a writer's claim on something it is writing (a code store's shard, a checkpoint directory).

A lock is a file created with O_EXCL holding {"host", "pid", "time"}; a second writer is refused with one
`UserError` line while the holder is alive, and takes over a lock whose holder was on this host and is gone
(a killed run). Used by cbtool/formats/store.py (one lock per shard) and cbtool/training/start.py (one per --out)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from cbtool.errors import UserError
from cbtool.util import strict_json
from cbtool.util.files import read_text


class Lock:
    """A held lock file; `release()` removes it (idempotent)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def acquire(lock: Path, what: str) -> Lock:
    """Create `lock` for this process, or refuse: "`what` is being written by pid N on HOST"."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            holder = read_lock(lock)
            if lock_is_stale(holder):
                lock.unlink(missing_ok=True)
                continue
            who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another writer"
            raise UserError(f"{what} is being written by {who} (delete {lock} if that writer is gone)") from None
        except OSError as e:
            raise UserError(f"cannot lock {what}: {e.strerror or e}") from None
        try:
            with os.fdopen(fd, "w") as f:
                f.write(strict_json.dumps(me))
        except OSError as e:
            lock.unlink(missing_ok=True)
            raise UserError(f"cannot lock {what}: {e.strerror or e}") from None
        return Lock(lock)
    raise UserError(f"could not lock {what}; another writer is active")  # pragma: no cover - lost a race twice


def read_lock(lock: Path) -> dict[str, Any]:
    try:
        holder = strict_json.loads(read_text(lock, "lock"), str(lock))
    except UserError:
        return {}
    return holder if isinstance(holder, dict) else {}


def lock_is_stale(holder: dict[str, Any]) -> bool:
    """A lock is stale when its writer was on this host and that process no longer exists."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    return False
