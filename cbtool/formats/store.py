"""The code store written by `cbtool embed` (docs/formats.md "Code store").

A store is a directory::

    manifest.json            format, checkpoint path + sha256, corpus, sites, shard plan, totals
    shard-000000/            one complete shard (renamed into place only when fully written)
        shard.json           index, tokens, docs, chars, a sha256 per file (checked on read)
        tokens.npy           (n,) token ids, smallest unsigned dtype
        doc_offsets.npy      (docs + 1,) token offsets of the documents within the shard
        text.npy             utf-8 bytes of the shard's documents' texts, concatenated
        doc_chars.npy        (docs + 1,) character offsets of the documents in the decoded text
        spans.npy            (n, 2) character [start, end) of every token in the decoded text
        labels.NAME.npy      (n,) per-token labels (-1 = none), e.g. labels.state.npy for TokFSM
        codes.SITE.npy       (n, k) top-k code ids, smallest unsigned dtype that fits C
        acts.SITE.npy        (n, k) float16 activations of those ids (SAE stores only: sites whose entry has
                             "acts"); a slot whose activation is 0 holds the padding code d_sae (C = d_sae + 1)
        counts.SITE.npy      (C,) how many tokens each code fired on (SAE stores: with a nonzero activation)
    shard-000001/ ...
    shard-000002.lock        a writer's claim on a shard it is writing (host, pid)
    .writer.lock             a running `embed`'s claim on the store (.writer-I-of-N.lock for `--worker I/N`
                             or rank I of N): a second writer of the same share is refused, and so is
                             `--overwrite` while any writer is alive

Everything is plain .npy, read with ``np.load(mmap_mode="r", allow_pickle=False)``, so a store much larger
than memory is read shard by shard. A shard is written into a temporary directory and renamed into
place, so a crash leaves either a whole shard or none; `embed` resumes by skipping complete shards,
and several processes may write disjoint shards of one store (a second writer of the same shard is
refused while the first is alive).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cbtool.errors import UserError
from cbtool.formats import schema
from cbtool.formats.checkpoint_names import META
from cbtool.formats.links import refuse_links_out
from cbtool.formats.schema import read_versioned_json
from cbtool.formats.verified import VerifiedFiles, identity
from cbtool.model.specs import CodebookSpec, Site
from cbtool.tasks.base import Document
from cbtool.util import distributed, strict_json
from cbtool.util.files import atomic_write_text, current_umask, read_text, save_npy, sha256_file
from cbtool.util.locks import Lock, acquire, read_lock, remove_if_stale
from cbtool.version import __version__

FORMAT = "cbtool-codes"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_META = "shard.json"


def code_dtype(num_codes: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds ids 0..num_codes-1."""
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_codes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


@dataclass
class ShardArrays:
    """One shard's contents before it is written."""

    tokens: np.ndarray  # (n,)
    doc_offsets: np.ndarray  # (docs + 1,)
    text: str
    doc_chars: np.ndarray  # (docs + 1,)
    spans: np.ndarray  # (n, 2), offsets into `text`
    labels: dict[str, np.ndarray]  # name -> (n,)
    codes: dict[str, np.ndarray]  # site -> (n, k)
    acts: dict[str, np.ndarray] = field(default_factory=dict)  # site -> (n, k) activations (SAE stores)
    meta: dict[str, Any] = field(default_factory=dict)  # extra keys of shard.json (SAE: truncation counts)


def documents_to_arrays(docs: list[Document], label_name: str = "state") -> ShardArrays:
    """Concatenate documents into shard arrays (codes are added by the caller)."""
    if not docs:
        raise ValueError("a shard needs at least one document")
    lengths = np.array([len(d.tokens) for d in docs], dtype=np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(lengths)])
    text = "".join(d.text for d in docs)
    doc_chars = np.concatenate([[0], np.cumsum([len(d.text) for d in docs])]).astype(np.int64)
    tokens = np.concatenate([np.asarray(d.tokens, dtype=np.int64) for d in docs])
    spans = np.concatenate(
        [np.asarray(d.spans, dtype=np.int64) + base for d, base in zip(docs, doc_chars[:-1], strict=True)]
    )
    labels: dict[str, np.ndarray] = {}
    if all(d.labels is not None for d in docs):
        labels[label_name] = np.concatenate([np.asarray(d.labels, dtype=np.int64) for d in docs])
    return ShardArrays(tokens, doc_offsets, text, doc_chars, spans, labels, {})


def site_entry(site: Site) -> dict[str, Any]:
    s = site.spec
    return {
        "name": site.name,
        "layer": s.layer,
        "component": s.component,
        "group": site.group,
        "groups": s.groups,
        "dim": s.dim,
        "num_codes": s.num_codes,
        "k": s.k,
        "dtype": code_dtype(s.num_codes).name,
    }


def sae_site_entry(name: str, layer: int, component: str, group: int, groups: int, dim: int, latents: int,
                   k: int) -> dict[str, Any]:
    """The manifest entry of a site read through an SAE of `latents` latents: they are codes 0..latents-1, and code
    `latents` (C = latents + 1) pads the slots of tokens with fewer than k active latents; it never fires (count
    0). Each stored id also has its activation (`acts.SITE.npy`, float16)."""
    return {"name": name, "layer": layer, "component": component, "group": group, "groups": groups, "dim": dim,
            "num_codes": latents + 1, "latents": latents, "k": k, "dtype": code_dtype(latents + 1).name,
            "acts": "float16"}


def match_sites(names: list[str], pattern: str | None, what: str = "the store") -> list[str]:
    """`--sites` globs (comma-separated, e.g. `*.mlp,0.attn.h*`) over site names, in their order."""
    if pattern is None or not pattern.strip():
        return list(names)
    chosen: set[str] = set()
    for glob in (g.strip() for g in pattern.split(",")):
        if not glob:
            continue
        hit = fnmatch.filter(names, glob)
        if not hit:
            raise UserError(f"--sites {glob!r} matches no site of {what}; sites: {_short(names)}")
        chosen.update(hit)
    if not chosen:
        raise UserError("--sites selects no site")
    return [n for n in names if n in chosen]


def _short(names: list[str], limit: int = 12) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _smallest_uint(max_value: int) -> np.dtype:
    return code_dtype(max_value + 1)


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


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"code store {path} does not exist (create one with `cbtool embed`)")
    man_path = path / MANIFEST
    if not path.is_dir() or not man_path.is_file():
        raise UserError(f"{path} is not a code store: no {MANIFEST}")
    refuse_links_out(path, MANIFEST)
    man = read_versioned_json(man_path, FORMAT, FORMAT_VERSION, "code store", schema.MANIFEST)
    if man.get("complete") and any(man.get(k) is None for k in ("num_shards", "tokens", "docs", "shards")):
        raise UserError(f"{man_path}: malformed: a complete store needs num_shards, tokens, docs and shards")
    return man


def _read_shard_meta(path: Path, index: int) -> dict[str, Any]:
    f = path / shard_name(index) / SHARD_META
    try:
        meta = strict_json.loads(read_text(f, "shard metadata"), str(f))
        int(meta["tokens"]), int(meta["docs"])
    except (UserError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"store {path}: shard {index} is missing or corrupt ({e})") from None
    return meta


class Store:
    """A complete code store, read lazily (memory-mapped, shard by shard)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        man = self.manifest
        if not man.get("complete"):
            done = len(list(self.path.glob("shard-*/" + SHARD_META)))
            raise UserError(
                f"code store {self.path} is incomplete ({done} shard(s) written); "
                f"re-run `cbtool embed` to finish it"
            )
        self.sites: dict[str, Site] = {}
        self.site_entries: dict[str, dict[str, Any]] = {}
        try:
            for e in man["sites"]:
                spec = CodebookSpec.from_dict(e)
                self.sites[e["name"]] = Site(str(e["name"]), spec, int(e["group"]))
                self.site_entries[e["name"]] = e
            self.shard_tokens = [int(s["tokens"]) for s in man["shards"]]
            self.shard_docs = [int(s["docs"]) for s in man["shards"]]
            if not isinstance(man["checkpoint"].get("path", ""), str):
                raise TypeError("checkpoint path is not a string")
            self.num_tokens = int(man["tokens"])
            self.num_docs = int(man["docs"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.path / MANIFEST}: malformed manifest ({e})") from None
        for name in [*self.sites, *(man.get("labels") or [])]:
            if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
                raise UserError(f"{self.path / MANIFEST}: name {name!r} would point outside the store")
        self.num_shards = len(self.shard_tokens)
        if min([*self.shard_tokens, *self.shard_docs, 0]) < 0 or sum(self.shard_tokens) != self.num_tokens \
                or sum(self.shard_docs) != self.num_docs:
            raise UserError(f"{self.path / MANIFEST}: malformed manifest (the shards' tokens and docs do not add up "
                            f"to its totals, {self.num_tokens} tokens in {self.num_docs} documents)")
        self.token_offsets = np.concatenate([[0], np.cumsum(self.shard_tokens)]).astype(np.int64)
        self._verified: set[tuple[int, str]] = set()
        self._shard_files: dict[int, Any] = {}
        self._records: dict[int, VerifiedFiles] = {}
        self._in_range: set[tuple[int, str]] = set()
        self._arrays_ok: set[tuple[int, str]] = set()
        self.label_names: list[str] = list(man.get("labels") or [])
        self.token_strings: list[str] | None = man.get("token_strings")

    # -- checkpoint identity -------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return checkpoint_dir(self.path, self.manifest)

    def check_checkpoint(self, required: bool = False) -> str | None:
        """Refuse (exit 2) when the checkpoint the store came from has changed since.

        Returns a warning line when it cannot be checked (moved away) and `required` is False."""
        if not self.manifest["checkpoint"].get("path"):
            if required:
                raise UserError(f"store {self.path} records no checkpoint; one is needed here")
            return None  # a synthetic store: nothing to check
        ck = self.checkpoint_path
        meta = ck / META
        if not meta.is_file():
            msg = f"checkpoint {ck} of store {self.path} is not available; its hash was not checked"
            if required:
                raise UserError(msg.replace("its hash was not checked", "it is needed here"))
            return msg
        if sha256_file(meta) != self.manifest["checkpoint"].get("sha256"):
            raise UserError(
                f"store {self.path} was embedded from checkpoint {ck}, which has changed since "
                f"(sha256 mismatch); re-run `cbtool embed --overwrite`"
            )
        return None

    def check_same_checkpoint(self, checkpoint: Path) -> None:
        """Refuse (exit 2) when the store records a checkpoint sha256 and `checkpoint` is not that checkpoint."""
        recorded = self.manifest["checkpoint"].get("sha256")
        meta = Path(checkpoint) / META
        if recorded and meta.is_file() and sha256_file(meta) != recorded:
            raise UserError(f"code store {self.path} was embedded from another checkpoint than {checkpoint} "
                            f"(its {META} sha256 differs from the one the store records); give the store of "
                            f"this checkpoint, or re-run `cbtool embed {checkpoint} --out STORE`")

    # -- arrays --------------------------------------------------------------------------------
    def _check_shard_identity(self, shard: int) -> None:
        """The shard's shard.json is the one this store finalised (its sha256 in the manifest, when recorded)."""
        entry = self.manifest["shards"][shard]
        recorded = entry.get("sha256") if isinstance(entry, dict) else None
        if recorded is None:  # stores finalised before shard hashes were recorded
            return
        if sha256_file(self.path / shard_name(shard) / SHARD_META) != recorded:
            raise UserError(f"store {self.path}: {shard_name(shard)} is not the shard this store was finalised with "
                            f"({SHARD_META} does not match the sha256 in {MANIFEST}: corrupt, replaced or copied from "
                            f"another store); re-run `cbtool embed --overwrite`")

    def _verify(self, shard: int, name: str) -> None:
        """Check a shard file against the sha256 in its shard.json (once per file and Store, and not again while
        the file is unchanged since a reader recorded the check: cbtool/formats/verified.py)."""
        if (shard, name) in self._verified:
            return
        if shard not in self._shard_files:
            files = _read_shard_meta(self.path, shard).get("files")
            self._check_shard_identity(shard)
            self._shard_files[shard] = files
        files = self._shard_files[shard]
        if isinstance(files, dict):  # stores written before per-file hashes have none to check
            f = self.path / shard_name(shard) / name
            if name not in files or not f.is_file():
                raise UserError(f"store {self.path}: {shard_name(shard)}/{name} is missing (corrupt store)")
            if shard not in self._records:
                self._records[shard] = VerifiedFiles(f.parent)
            record, ident = self._records[shard], identity(f)
            if not record.known(name, files[name], ident):  # checked once, by any reader (cbtool/formats/verified.py)
                if sha256_file(f) != files[name]:
                    raise UserError(
                        f"store {self.path}: {shard_name(shard)}/{name} does not match its sha256 (corrupt or changed)"
                    )
                if identity(f) == ident:
                    record.add(name, files[name], ident)
        self._verified.add((shard, name))

    def _load(self, shard: int, name: str) -> np.ndarray:
        f = self.path / shard_name(shard) / name
        self._verify(shard, name)
        try:
            a = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"store {self.path}: cannot read {shard_name(shard)}/{name} ({e})") from None
        if (shard, name) not in self._arrays_ok:
            check_shard_array(self, shard, name, a)  # once per array and Store: shapes, dtypes, order, bounds
            self._arrays_ok.add((shard, name))
        return a

    def _checked(self, shard: int, name: str, rows: int | None = None) -> np.ndarray:
        a = self._load(shard, name)
        n = self.shard_tokens[shard] if rows is None else rows
        if a.shape[0] != n:
            raise UserError(
                f"store {self.path}: {shard_name(shard)}/{name} has {a.shape[0]} rows, "
                f"expected {n} (corrupt store)"
            )
        return a

    def codes(self, shard: int, site: str) -> np.ndarray:
        a = self._checked(shard, f"codes.{site}.npy")
        if a.ndim != 2 or a.shape[1] != self.sites[site].spec.k:
            raise UserError(f"store {self.path}: codes of {site} in {shard_name(shard)} have shape {a.shape}")
        if (shard, site) in self._in_range:
            return a
        if a.dtype.kind != "u" or (a.size and int(a.max()) >= self.sites[site].num_codes):
            raise UserError(
                f"store {self.path}: codes of {site} in {shard_name(shard)} are out of range for "
                f"C={self.sites[site].num_codes} (corrupt store)"
            )
        self._in_range.add((shard, site))  # a whole pass over the ids: once per Store
        return a

    def has_acts(self, site: str) -> bool:
        """Whether the store holds activations for the site (an SAE store); older stores have none."""
        return bool(self.site_entries[site].get("acts"))

    def acts(self, shard: int, site: str) -> np.ndarray | None:
        """(n, k) float16 activations of the ids `codes` returns (0: the slot is no firing); None without them."""
        if not self.has_acts(site):
            return None
        a = self._checked(shard, f"acts.{site}.npy")
        if a.shape != (self.shard_tokens[shard], self.sites[site].spec.k) or a.dtype != np.float16:
            raise UserError(f"store {self.path}: acts of {site} in {shard_name(shard)} have shape {a.shape} "
                            f"and dtype {a.dtype} (corrupt store)")
        return a

    def tokens(self, shard: int) -> np.ndarray:
        return self._checked(shard, "tokens.npy")

    def spans(self, shard: int) -> np.ndarray:
        return self._checked(shard, "spans.npy")

    def doc_offsets(self, shard: int) -> np.ndarray:
        return self._load(shard, "doc_offsets.npy")

    def doc_chars(self, shard: int) -> np.ndarray:
        return self._load(shard, "doc_chars.npy")

    def text(self, shard: int) -> str:
        raw = self._load(shard, "text.npy")
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(
                f"store {self.path}: text of {shard_name(shard)} is not UTF-8 (corrupt)"
            ) from None

    def labels(self, shard: int, name: str) -> np.ndarray:
        if name not in self.label_names:
            raise UserError(
                f"store {self.path} has no labels {name!r}; it has: {', '.join(self.label_names) or 'none'}"
            )
        return self._checked(shard, f"labels.{name}.npy")

    def counts(self, site: str) -> np.ndarray:
        """(C,) firing counts of a site over the whole store (under torchrun each rank reads its shards and
        the sums are added: cbtool/util/distributed.py)."""
        total = np.zeros(self.sites[site].num_codes, dtype=np.int64)
        for s in distributed.world().shards(self.num_shards):
            c = self._load(s, f"counts.{site}.npy")
            if c.shape != total.shape:
                raise UserError(
                    f"store {self.path}: counts of {site} in {shard_name(s)} have shape {c.shape}"
                )
            total += c
        return distributed.all_reduce_np(total)

    def select_sites(self, pattern: str | None) -> list[str]:
        return match_sites(list(self.sites), pattern, f"store {self.path}")

    def token_string(self, token: int, text: str, span: tuple[int, int]) -> str:
        """What a token looks like: its characters, or its name when it covers none (BOS)."""
        s, e = int(span[0]), int(span[1])
        if e > s:
            return text[s:e]
        if self.token_strings is not None and 0 <= token < len(self.token_strings):
            return self.token_strings[token]
        return f"<{token}>"


def check_shard_array(store: Store, shard: int, name: str, a: np.ndarray) -> None:
    """One array of a shard as read (memory-mapped), against what docs/formats.md declares for it: one
    UserError line naming it when its ndim, dtype or shape is wrong, document offsets decrease or run past the
    token count, or spans leave the shard's text. Vectorised: a pass over offsets and spans, nothing per token
    in Python. Arrays this check does not know pass as they are."""
    n, docs = store.shard_tokens[shard], store.shard_docs[shard]
    where = f"store {store.path}: {shard_name(shard)}/{name}"

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UserError(f"{where} {what} (corrupt store)")

    integer = a.dtype.kind in "iu"
    if name == "tokens.npy":
        need(a.ndim == 1 and integer, f"must be ({n},) integers, has shape {a.shape} and dtype {a.dtype}")
    elif name in ("doc_offsets.npy", "doc_chars.npy"):
        need(a.ndim == 1 and integer and a.shape[0] == docs + 1,
             f"must be ({docs + 1},) integers, has shape {a.shape} and dtype {a.dtype}")
        v = np.asarray(a, dtype=np.int64)
        need(int(v[0]) == 0 and bool(np.all(np.diff(v) >= 0)), "offsets must start at 0 and never decrease")
        if name == "doc_offsets.npy":
            need(int(v[-1]) == n, f"offsets end at {int(v[-1])}, not at the shard's {n} tokens")
    elif name == "spans.npy":
        need(a.ndim == 2 and a.shape[1:] == (2,) and integer,
             f"must be ({n}, 2) integers, has shape {a.shape} and dtype {a.dtype}")
        if a.size:
            chars = int(store.doc_chars(shard)[-1])
            v = np.asarray(a, dtype=np.int64)
            need(int(v.min()) >= 0 and int(v.max()) <= chars and bool(np.all(v[:, 0] <= v[:, 1])),
                 f"spans must lie within the shard's {chars} characters, start <= end")
    elif name.startswith("labels.") and name.endswith(".npy"):
        need(a.ndim == 1 and a.dtype.kind in "iuUSf", f"must be ({n},) labels, has shape {a.shape} and dtype "
             f"{a.dtype}")
    elif name.startswith("counts.") and name.endswith(".npy"):
        site = store.sites.get(name[len("counts."):-len(".npy")])
        c = site.num_codes if site is not None else None
        need(a.ndim == 1 and integer and (c is None or a.shape[0] == c),
             f"must be ({c},) integers, has shape {a.shape} and dtype {a.dtype}")
        need(not a.size or int(np.asarray(a).min()) >= 0, "holds negative counts")
    elif name == "text.npy":
        need(a.ndim == 1 and a.dtype == np.uint8, f"must be bytes (uint8), has shape {a.shape} and dtype {a.dtype}")


def open_store(path: Path, warn: Callable[[str], None] | None = None) -> Store:
    """Open a complete store and refuse it (UserError) when its checkpoint has changed since embedding;
    when that cannot be checked (the checkpoint moved away), `warn` gets one line (default: a Python warning)."""
    store = Store(path)
    line = store.check_checkpoint(required=False)
    if line:
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(line)
    return store


def checkpoint_ref(checkpoint: Path, store: Path, sha256: str) -> dict[str, Any]:
    """The manifest's `checkpoint`: its path relative to the store (so a run directory holding both can be
    copied or moved), its absolute path when written (found there when the store alone moves), its hash."""
    ck = Path(checkpoint).resolve()
    return {"path": os.path.relpath(ck, Path(store).resolve()), "absolute_path": str(ck), "sha256": sha256}


def checkpoint_dir(path: Path, manifest: dict[str, Any]) -> Path:
    """The checkpoint a store came from; a relative path in the manifest is relative to the store, and when
    nothing is there the absolute path recorded beside it is used."""
    ck = Path(str(manifest["checkpoint"].get("path") or ""))
    found = ck if ck.is_absolute() else Path(path) / ck
    absolute = manifest["checkpoint"].get("absolute_path")
    if not (found / META).is_file() and isinstance(absolute, str) and (Path(absolute) / META).is_file():
        return Path(absolute)
    return found


def checkpoint_status(path: Path, manifest: dict[str, Any]) -> str:
    """Whether a store's checkpoint is unchanged since embedding, changed, not available, or none recorded."""
    ck = manifest["checkpoint"]
    if not ck.get("path"):
        return "none recorded"
    meta = checkpoint_dir(path, manifest) / META
    if not meta.is_file():
        return "not available"
    return "unchanged" if sha256_file(meta) == ck.get("sha256") else "CHANGED since embedding"


def sae_ref(sae_dir: Path, store: Path) -> dict[str, str]:
    """Where a store's SAE is: relative to the store and absolute (as `checkpoint_ref`)."""
    d = Path(sae_dir).resolve()
    return {"path": os.path.relpath(d, Path(store).resolve()), "absolute_path": str(d)}


def store_sae(store: Store, k_max: int | None = None) -> Any:
    """The SAE a store was embedded with (`SparseDictionary`), re-read from the folder its manifest names and
    refused (UserError) unless every file still has the sha256 recorded then."""
    from cbtool.formats.sae import load_sae

    rec = store.manifest.get("sae")
    if not isinstance(rec, dict):
        raise UserError(f"store {store.path} was not embedded through an SAE")
    found = Path(str(rec.get("path") or ""))
    found = found if found.is_absolute() else store.path / found
    if not found.is_dir() and isinstance(rec.get("absolute_path"), str):
        found = Path(rec["absolute_path"])
    if not found.is_dir():
        raise UserError(f"the SAE of store {store.path} is not available at {found}")
    sae = load_sae(found, None if rec.get("k_fixed") else (k_max or rec.get("k")))
    if sae.files != rec.get("files"):
        raise UserError(f"SAE {found} has changed since store {store.path} was embedded (sha256 mismatch)")
    return sae


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
