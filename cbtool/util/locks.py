"""Lock files: a writer's claim on something it is writing (a code store's shard, a checkpoint directory).

A lock is a file created with O_EXCL holding {"host", "pid", "time"}, on which its writer also holds an
exclusive `flock` for as long as the lock is held. A second writer is refused with one `UserError` line while
the holder is alive, and takes over a lock whose holder was on this host and is gone (a killed run).

Taking over is atomic: a taker must first win the `flock` of the lock file (which the kernel releases when its
holder dies, and which only one process can hold), then check that the file it locked is still the one at the
path and still names a dead holder; only then does it write itself into that same file and keep it. Two takers
of one stale lock can therefore never both win (read, unlink and recreate would let them). Release unlinks the
path while still holding the `flock`, so a taker that locked the old file sees it gone and starts over.
Used by cbtool/formats/store.py (one lock per shard) and cbtool/training/start.py (one per --out)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Any

from cbtool.errors import UserError
from cbtool.util import strict_json

_MAX_LOCK_BYTES = 4096
_SETTLE_TRIES = 100  # 10 ms each: how long a lock being taken over or created may take to name its holder


class Lock:
    """A held lock file; `release()` removes it (idempotent)."""

    def __init__(self, path: Path, fd: int | None = None) -> None:
        self.path = path
        self.fd = fd
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.fd is None or _same_file(self.fd, self.path):
                self.path.unlink(missing_ok=True)
        finally:
            if self.fd is not None:
                os.close(self.fd)  # drops the flock, after the path is gone
                self.fd = None


def acquire(lock: Path, what: str) -> Lock:
    """Create `lock` for this process, or refuse: "`what` is being written by pid N on HOST"."""
    me = strict_json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}).encode()
    for _ in range(20):  # another round only when the file changed under us (released or replaced meanwhile)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
        except FileExistsError:
            taken = _take_over(lock, what, me)
            if taken is not None:
                return taken
            continue
        except OSError as e:
            raise UserError(f"cannot lock {what}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # at most a brief wait: a taker looking at our still-empty file
            if not _same_file(fd, lock):  # pragma: no cover - our new file was unlinked by a foreign hand
                os.close(fd)
                continue
            os.write(fd, me)
        except OSError as e:
            lock.unlink(missing_ok=True)
            os.close(fd)
            raise UserError(f"cannot lock {what}: {e.strerror or e}") from None
        return Lock(lock, fd)
    raise UserError(f"could not lock {what}; other writers keep replacing {lock}")  # pragma: no cover


def _take_over(lock: Path, what: str, me: bytes) -> Lock | None:
    """The existing `lock` taken over when its holder is gone; None to try again from the start; else refuse."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None  # released meanwhile
    except OSError as e:
        raise UserError(f"cannot lock {what}: {lock}: {e.strerror or e}") from None
    keep = False
    try:
        for attempt in range(_SETTLE_TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock {what}: {lock}: {e.strerror or e}") from None
                holder = _read_fd(fd)
                if (holder and not lock_is_stale(holder)) or attempt == _SETTLE_TRIES - 1:
                    _refuse(lock, what, holder)  # a live holder has it
                time.sleep(0.01)  # a taker or a new holder is writing itself in: see who it was
        if not _same_file(fd, lock):
            return None  # the holder released it (or a taker replaced it) before we locked it
        holder = _read_fd(fd)
        if not lock_is_stale(holder):
            _refuse(lock, what, holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        keep = True
        return Lock(lock, fd)
    finally:
        if not keep:
            os.close(fd)


def _refuse(lock: Path, what: str, holder: dict[str, Any]) -> None:
    who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another writer"
    raise UserError(f"{what} is being written by {who} (delete {lock} if that writer is gone)")


def remove_if_stale(lock: Path) -> bool:
    """Remove `lock` when its holder is gone (a claim left by a killed writer); True when removed."""
    try:
        lk = _take_over(lock, "", b"")
    except UserError:
        return False
    if lk is None:
        return False
    lk.release()
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_fd(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, _MAX_LOCK_BYTES, 0)
        holder = strict_json.loads(data.decode("utf-8"), "lock")
    except (OSError, UnicodeDecodeError, UserError):
        return {}
    return holder if isinstance(holder, dict) else {}


def read_lock(lock: Path) -> dict[str, Any]:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


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
