"""File helpers shared by checkpoints (cbtool/formats/checkpoint.py), code stores (cbtool/formats/store.py) and
Hugging Face
bases (cbtool/model/hf.py): hashing, atomic writes (docs/formats.md)."""

from __future__ import annotations

import hashlib
import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cbtool.errors import UserError

BLOCK = 1 << 20  # bytes read at a time while hashing


def hash_file_into(h: Any, path: Path) -> None:
    """Feed a file's bytes to a hashlib object, a block at a time."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    hash_file_into(h, path)
    return h.hexdigest()


def content_hash(files: list[tuple[str, Path]]) -> str:
    """sha256 over (name, bytes) of files in the given order: one hash for a set of files (a pretrained base's,
    cbtool/model/hf.py; a text corpus's, cbtool/tasks/text.py), so renaming a file changes it as editing one does."""
    h = hashlib.sha256()
    for name, f in files:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
        hash_file_into(h, f)
        h.update(b"\0")
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where the system says (setting and restoring it would
    briefly give every other thread's new files the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temp file in the same directory and an atomic rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file via a temp file in the same directory and an atomic rename; its permissions follow the
    umask, as a plain open() would (mkstemp alone makes 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy(path: Path, array: np.ndarray) -> None:
    """A plain .npy file (never pickled), flushed to disk."""
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def read_bytes(path: Path, what: str = "file") -> bytes:
    """A regular file's bytes; anything else (a FIFO, a device such as /dev/zero, a folder) is refused
    without blocking on it. One UserError line for every failure."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{what} {path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def read_text(path: Path, what: str = "file") -> str:
    """A regular file's UTF-8 text (see `read_bytes`)."""
    data = read_bytes(path, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv") from None


def read_stdin_text(what: str) -> str:
    """Standard input's UTF-8 text, read to its end; closed or unreadable standard input (`0<&-`) or text that
    is not UTF-8 is one UserError line naming `what`."""
    stream = sys.stdin
    if stream is None or stream.closed:
        raise UserError(f"{what}: standard input is closed; give a file instead")
    try:
        data = stream.buffer.read() if hasattr(stream, "buffer") else stream.read().encode("utf-8", "surrogatepass")
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: cannot read standard input: {getattr(e, 'strerror', None) or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what}: standard input is not UTF-8 text (byte {e.start})") from None


def refuse_overwriting_inputs(target: Path, option: str, files: Iterable[Path] = (), dirs: Iterable[Path] = (),
                              replaced_dir: bool = False) -> None:
    """Refuse (one `UserError` line) an output `target` that is one of the command's input `files` (the same
    path after symlinks, or a hard link to it) or lies inside one of its input `dirs` (a checkpoint or store
    directory): no command writes over what it reads. With `replaced_dir` (an output directory that may be
    deleted and written again), no input may lie inside `target` either."""
    out = Path(os.path.realpath(target))
    if replaced_dir:
        for inp in [*files, *dirs]:
            if out in Path(os.path.realpath(inp)).parents:
                raise UserError(f"{option} {target} holds one of the inputs ({inp}); write somewhere else")
    for f in files:
        real = Path(os.path.realpath(f))
        same = out == real
        if not same and out.exists() and real.exists():
            try:
                same = os.path.samefile(out, real)
            except OSError:
                same = False
        if same:
            raise UserError(f"{option} {target} is one of the inputs ({f}); write somewhere else")
    for d in dirs:
        real = Path(os.path.realpath(d))
        if out == real or real in out.parents:
            raise UserError(f"{option} {target} lies inside the input directory {d}; write somewhere else")
