"""File helpers shared by checkpoints (cbtool/checkpoint.py), code stores (cbtool/store.py) and Hugging Face
bases (cbtool/hf.py): hashing, atomic writes, versioned JSON metadata (docs/formats.md)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
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


def read_versioned_json(doc: Path, fmt: str, version: int, what: str) -> dict[str, Any]:
    """Parse a cbtool metadata file and check its format name and version (one UserError line each)."""
    try:
        data = json.loads(doc.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{doc} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{doc} is not a cbtool {what} (format != {fmt!r})")
    if data.get("format_version") != version:
        raise UserError(f"{doc}: {what} format version {data.get('format_version')!r} is not supported "
                        f"(this cbtool reads {version})")
    return data
