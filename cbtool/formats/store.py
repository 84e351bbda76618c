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
import warnings
from collections.abc import Callable
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
from cbtool.util.files import read_text, sha256_file

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
        if not self._matches(shard, self.path / shard_name(shard) / SHARD_META, recorded):
            raise UserError(f"store {self.path}: {shard_name(shard)} is not the shard this store was finalised with "
                            f"({SHARD_META} does not match the sha256 in {MANIFEST}: corrupt, replaced or copied from "
                            f"another store); re-run `cbtool embed --overwrite`")

    def _matches(self, shard: int, f: Path, sha256: str) -> bool:
        """Whether file `f` of a shard has this sha256: hashed once, by any reader, and not again while the file
        is unchanged since a reader recorded the check (cbtool/formats/verified.py)."""
        if shard not in self._records:
            self._records[shard] = VerifiedFiles(f.parent)
        record, ident = self._records[shard], identity(f)
        if record.known(f.name, sha256, ident):
            return True
        if sha256_file(f) != sha256:
            return False
        if identity(f) == ident:
            record.add(f.name, sha256, ident)
        return True

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
            if not self._matches(shard, f, files[name]):
                raise UserError(f"store {self.path}: {shard_name(shard)}/{name} does not match its sha256 (corrupt or "
                                f"changed)")
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
