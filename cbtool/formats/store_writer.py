"""Writing the code store (docs/formats.md "Code store"): `StoreWriter` creates or reopens a store and writes
shards atomically under per-shard claims and the store's writer lock; `write_store` writes a whole small store
in one call (tests, benchmarks). Reading is cbtool/formats/store.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cbtool.errors import UserError
from cbtool.formats.store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SHARD_META,
    ShardArrays,
    Store,
    _read_shard_meta,
    _smallest_uint,
    read_manifest,
    shard_name,
    site_entry,
)
from cbtool.model.specs import Site
from cbtool.util import strict_json
from cbtool.util.files import atomic_write_text, current_umask, save_npy, sha256_file
from cbtool.util.locks import Lock, acquire, read_lock, remove_if_stale
from cbtool.version import __version__

WRITER_LOCK = ".writer.lock"


def writer_lock_name(worker: tuple[int, int] = (0, 1)) -> str:
    """The store lock of one writer's share: `.writer.lock` for the whole store, else `.writer-I-of-N.lock`."""
    return WRITER_LOCK if worker[1] == 1 else f".writer-{worker[0]}-of-{worker[1]}.lock"


def _is_writer_lock(p: Path) -> bool:
    return p.name.startswith(".writer") and p.name.endswith(".lock")


class StoreWriter:
    """Creates or reopens a store and writes shards atomically under a per-shard claim, holding the store's
    writer lock of its share (`writer_lock_name`) until `close`."""

    def __init__(self, path: Path, manifest: dict[str, Any], lock: Lock | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.lock = lock

    def close(self) -> None:
        """Release the store's writer lock (idempotent)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    @classmethod
    def open(cls, path: Path, plan: dict[str, Any], overwrite: bool = False,
             worker: tuple[int, int] = (0, 1)) -> StoreWriter:
        """Create a store for `plan` (the manifest without totals), or reopen a compatible one, under the
        writer lock of `worker`'s share (refused while a live writer holds it; `overwrite` is refused while
        any writer of the store is alive).

        `plan` holds: checkpoint {path, sha256}, corpus, shard_tokens, max_tokens, sites (entries),
        labels (names), token_strings (optional)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"store path {path} exists and is not a directory")
        man_path = path / MANIFEST
        if path.exists() and overwrite and not man_path.is_file() \
                and any(not _is_writer_lock(p) for p in path.iterdir()):
            raise UserError(f"{path} exists and is not a code store; refusing to replace it")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create store {path}: {e.strerror or e}") from None
        lock = acquire(path / writer_lock_name(worker), f"code store {path}")
        try:
            return cls._open(path, plan, overwrite, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def _open(cls, path: Path, plan: dict[str, Any], overwrite: bool, lock: Lock) -> StoreWriter:
        man_path = path / MANIFEST
        if overwrite:
            for other in sorted(p for p in path.iterdir() if _is_writer_lock(p) and p != lock.path):
                if not remove_if_stale(other):
                    holder = read_lock(other)
                    if holder:  # a live writer of another share: replacing the store would cut it off
                        who = f"pid {holder.get('pid')} on {holder.get('host')}"
                        raise UserError(f"code store {path} is being written by {who}; --overwrite refused "
                                        f"(delete {other} if that writer is gone)")
            for entry in path.iterdir():  # everything but our own claim
                if entry == lock.path:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
        if man_path.is_file():
            old = read_manifest(path)
            keys = ("checkpoint", "corpus", "shard_tokens", "max_tokens", "sites", "sae", "base_model")
            for key in keys:
                if _resumable(old.get(key)) != _resumable(plan.get(key)):
                    raise UserError(
                        f"store {path} was written with a different {key} "
                        f"(use --overwrite to start over, or --out for a new store)"
                    )
            return cls(path, old, lock)
        if path.exists() and any(p for p in path.iterdir() if not p.name.startswith(".")):
            if man_path.is_file():  # a concurrent writer (`--worker`) has just created it: reopen
                return cls._open(path, plan, False, lock)
            raise UserError(f"{path} exists and is not a code store; choose another --out")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "cbtool_version": __version__,
            **plan,
            "complete": False,
            "num_shards": None,
            "tokens": None,
            "docs": None,
        }
        try:
            path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(man_path, strict_json.dumps(manifest, indent=2))
        except OSError as e:
            raise UserError(f"cannot create store {path}: {e.strerror or e}") from None
        return cls(path, manifest, lock)

    def is_complete(self, index: int) -> bool:
        return (self.path / shard_name(index) / SHARD_META).is_file()

    @contextmanager
    def claim(self, index: int) -> Iterator[None]:
        """Hold the lock file of shard `index` while writing it; refuse if a live writer holds it."""
        lock = acquire(self.path / f"{shard_name(index)}.lock", f"shard {index} of {self.path}")
        try:
            for stale in self.path.glob(f".{shard_name(index)}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            lock.release()

    def write_shard(self, index: int, arrays: ShardArrays) -> int:
        """Write one shard atomically (temp dir + rename). Returns its token count."""
        final = self.path / shard_name(index)
        if final.exists():
            raise UserError(f"shard {index} of {self.path} already exists")
        n = len(arrays.tokens)
        sites = {e["name"]: e for e in self.manifest["sites"]}
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{shard_name(index)}.tmp-", dir=self.path))
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a store follows the umask
        except OSError as e:
            raise UserError(f"cannot write shard {index} of store {self.path}: {e.strerror or e}") from None
        try:
            vocab_max = int(arrays.tokens.max()) if n else 0
            save_npy(tmp / "tokens.npy", arrays.tokens.astype(_smallest_uint(vocab_max)))
            save_npy(tmp / "doc_offsets.npy", arrays.doc_offsets.astype(np.int64))
            save_npy(tmp / "text.npy", np.frombuffer(arrays.text.encode("utf-8"), dtype=np.uint8))
            save_npy(tmp / "doc_chars.npy", arrays.doc_chars.astype(np.int64))
            span_dt = np.uint32 if len(arrays.text) < 2**32 else np.int64
            save_npy(tmp / "spans.npy", arrays.spans.astype(span_dt))
            for name in self.manifest.get("labels", []):
                lab = arrays.labels.get(name)
                if lab is None or len(lab) != n:
                    raise ValueError(f"shard {index}: labels {name!r} missing or of the wrong length")
                save_npy(tmp / f"labels.{name}.npy", lab.astype(np.int64))
            for name, entry in sites.items():
                ids = arrays.codes[name]
                if ids.shape != (n, entry["k"]):
                    raise ValueError(f"shard {index}: codes of {name} have shape {ids.shape}")
                ids = ids.astype(entry["dtype"])
                save_npy(tmp / f"codes.{name}.npy", ids)
                fired = ids.reshape(-1)
                if entry.get("acts"):
                    acts = arrays.acts[name]
                    if acts.shape != ids.shape:
                        raise ValueError(f"shard {index}: acts of {name} have shape {acts.shape}")
                    acts = acts.astype(np.float16)
                    save_npy(tmp / f"acts.{name}.npy", acts)
                    fired = fired[acts.reshape(-1) > 0]
                counts = np.bincount(fired.astype(np.int64), minlength=entry["num_codes"])
                save_npy(tmp / f"counts.{name}.npy", counts.astype(np.int64))
            meta = {
                "index": index,
                "tokens": n,
                "docs": len(arrays.doc_offsets) - 1,
                "chars": len(arrays.text),
                **arrays.meta,
                # a sha256 per file: readers refuse a truncated or bit-flipped array (exit 2)
                "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir())},
            }
            atomic_write_text(tmp / SHARD_META, strict_json.dumps(meta))
            os.rename(tmp, final)
        except OSError as e:  # disk full, read-only, ...: one line, exit 2, the store stays resumable
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"cannot write shard {index} of store {self.path}: {e.strerror or e}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return n

    def finalize(self, num_shards: int) -> bool:
        """When shards 0..num_shards-1 are all complete, record the totals. Returns completeness."""
        if not all(self.is_complete(i) for i in range(num_shards)):
            return False
        for i in range(num_shards):  # a claim left by a writer killed after its shard was whole
            remove_if_stale(self.path / f"{shard_name(i)}.lock")
        metas = [_read_shard_meta(self.path, i) for i in range(num_shards)]
        sae = self.manifest.get("sae")
        if isinstance(sae, dict) and all(isinstance(m.get("truncation"), dict) for m in metas):
            from cbtool.formats.sae import TruncationCounter

            merged = TruncationCounter.merge([m["truncation"] for m in metas])
            sae["truncation"] = TruncationCounter.stats(merged, int(sae["k"]), bool(sae["k_fixed"]))
        self.manifest.update(
            complete=True,
            num_shards=num_shards,
            tokens=sum(m["tokens"] for m in metas),
            docs=sum(m["docs"] for m in metas),
            # each shard.json's sha256 (it holds the sha256 of every file of its shard): readers refuse a shard
            # that is not the one finalised here, e.g. one copied in from another store of the same size
            shards=[{"index": m["index"], "tokens": m["tokens"], "docs": m["docs"],
                     "sha256": sha256_file(self.path / shard_name(i) / SHARD_META)} for i, m in enumerate(metas)],
        )
        try:
            atomic_write_text(self.path / MANIFEST, strict_json.dumps(self.manifest, indent=2))
        except OSError as e:
            raise UserError(f"cannot write {self.path / MANIFEST}: {e.strerror or e}") from None
        return True


def _resumable(value: Any) -> Any:
    """A manifest value as a resumed store must match it: an SAE record without the truncation stats that
    `finalize` adds."""
    if isinstance(value, dict) and "truncation" in value:
        return {k: v for k, v in value.items() if k != "truncation"}
    return value


def write_store(
    path: Path,
    sites: list[Site],
    shards: list[ShardArrays],
    labels: list[str] | None = None,
    checkpoint: dict[str, Any] | None = None,
    corpus: dict[str, Any] | None = None,
    token_strings: list[str] | None = None,
) -> Store:
    """Write a whole store from in-memory shards (synthetic stores for tests and benchmarks)."""
    plan = {
        "checkpoint": checkpoint or {"path": "", "sha256": None},
        "corpus": corpus or {"kind": "synthetic"},
        "shard_tokens": max(len(s.tokens) for s in shards),
        "max_tokens": None,
        "sites": [site_entry(s) for s in sites],
        "labels": list(labels or []),
        "token_strings": token_strings,
    }
    writer = StoreWriter.open(path, plan, overwrite=True)
    try:
        for i, arrays in enumerate(shards):
            with writer.claim(i):
                writer.write_shard(i, arrays)
        writer.finalize(len(shards))
    finally:
        writer.close()
    return Store(path)
