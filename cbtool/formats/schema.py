"""The declared shape of every metadata file cbtool reads: `cbtool.json` (CHECKPOINT) and `manifest.json`
(MANIFEST), as docs/formats.md describes them. A file is validated against its schema when it is read, so
a value of the wrong type (a number where a list belongs, a string where a number belongs, a negative
count) is one `UserError` line naming the key, never a crash further on. Keys a schema does not name are
allowed (a newer writer may add some); keys it names must have the declared type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbtool.errors import UserError
from cbtool.util import strict_json
from cbtool.util.files import read_bytes


class Spec:
    what = "a value"

    def check(self, value: Any, at: str, where: str) -> None:
        raise NotImplementedError


def _fail(where: str, at: str, spec: Spec, value: Any) -> UserError:
    shown = type(value).__name__ if isinstance(value, dict | list) else repr(value)[:40]
    return UserError(f"{where}: malformed: {at or 'the document'} must be {spec.what}, got {shown}")


@dataclass
class Int(Spec):
    lo: int | None = 0

    @property
    def what(self) -> str:  # type: ignore[override]
        return "an integer" + (f" >= {self.lo}" if self.lo is not None else "")

    def check(self, value: Any, at: str, where: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or (self.lo is not None and value < self.lo):
            raise _fail(where, at, self, value)


@dataclass
class Of(Spec):
    """One of some Python types (str, bool, float ...); int counts as a number."""

    types: tuple[type, ...]
    what: str = "a value"

    def check(self, value: Any, at: str, where: str) -> None:
        if isinstance(value, bool) and bool not in self.types:
            raise _fail(where, at, self, value)
        if not isinstance(value, self.types):
            raise _fail(where, at, self, value)


@dataclass
class Opt(Spec):
    inner: Spec

    def check(self, value: Any, at: str, where: str) -> None:
        if value is not None:
            self.inner.check(value, at, where)


@dataclass
class ListOf(Spec):
    item: Spec
    what = "a list"

    def check(self, value: Any, at: str, where: str) -> None:
        if not isinstance(value, list):
            raise _fail(where, at, self, value)
        for i, v in enumerate(value):
            self.item.check(v, f"{at}[{i}]", where)


@dataclass
class MapOf(Spec):
    value: Spec
    what = "an object"

    def check(self, value: Any, at: str, where: str) -> None:
        if not isinstance(value, dict):
            raise _fail(where, at, self, value)
        for k, v in value.items():
            self.value.check(v, f"{at}.{k}" if at else k, where)


@dataclass
class Obj(Spec):
    keys: dict[str, Spec]
    required: tuple[str, ...] = ()
    what = "an object"

    def check(self, value: Any, at: str, where: str) -> None:
        if not isinstance(value, dict):
            raise _fail(where, at, self, value)
        for k in self.required:
            if k not in value:
                raise UserError(f"{where}: malformed: missing key {(at + '.' if at else '') + k!r}")
        for k, spec in self.keys.items():
            if k in value:
                spec.check(value[k], f"{at}.{k}" if at else k, where)


STR = Of((str,), "a string")
BOOL = Of((bool,), "true or false")
NUM = Of((int, float), "a number")
INT = Int()
ANY_INT = Int(lo=None)

_MODEL_CONFIG = MapOf(INT)
_METRICS = MapOf(Opt(NUM))  # a metric that is not a finite number is written as null
_TRAIN_CONFIG = Obj({
    "task": STR, "sites": STR, "num_codes": INT, "site_codes": STR, "k": INT, "base_steps": INT, "steps": INT,
    "batch_size": INT, "lr": NUM, "codebook_lr": NUM, "mse_coef": NUM, "commit_coef": NUM, "train_base": BOOL,
    "base_lr_factor": NUM, "kmeans_seqs": INT, "kmeans": STR, "dead_window": INT, "checkpoint_every": INT,
    "log_every": INT, "eval_samples": INT, "seed": INT, "model": _MODEL_CONFIG, "fsm": MapOf(INT),
    "corpus": Opt(STR), "text_field": STR, "seq_len": INT, "vocab_size": INT, "base_model": Opt(STR),
    "gguf_file": Opt(STR), "eval_blocks": INT,
})

CHECKPOINT = Obj({
    "format": STR, "format_version": INT, "cbtool_version": STR,
    "model": Obj({"kind": STR, "config": _MODEL_CONFIG, "path": STR, "gguf_file": Opt(STR), "sha256": STR,
                  "family": Opt(STR), "n_layer": INT, "n_head": INT, "d_model": INT, "vocab_size": INT},
                 required=("kind",)),
    "tokenizer": Opt(Obj({"kind": STR, "file": STR, "vocab_size": INT, "eot_id": Opt(INT)}, required=("kind",))),
    "task": Obj({"name": STR, "num_states": INT, "out_degree": INT, "seq_len": INT, "seed": INT,
                 "corpus": Opt(STR), "text_field": STR, "tokens": INT, "train_blocks": INT, "heldout_blocks": INT,
                 "holdout_every": INT, "corpus_sha256": STR}, required=("name",)),
    "codebooks": ListOf(Obj({"layer": INT, "component": STR, "groups": INT, "dim": INT, "num_codes": INT, "k": INT,
                             "key": STR, "sites": ListOf(STR), "tensor": STR, "similarity": STR},
                            required=("layer", "component", "groups", "dim", "num_codes", "k"))),
    "training": Opt(Obj({"config": _TRAIN_CONFIG, "preset": Opt(STR), "step": INT, "total_steps": INT, "finished": BOOL,
                         "phase": STR, "seconds": NUM, "device": STR,
                         "results": Opt(Obj({"on": _METRICS, "bypassed": _METRICS, "code_usage": _METRICS,
                                             "samples": INT, "temperature": NUM, "train_seconds": NUM,
                                             "final_train_loss": Opt(NUM)}))})),
    "files": MapOf(STR),
}, required=("format", "format_version", "model", "codebooks", "files"))

MANIFEST = Obj({
    "format": STR, "format_version": INT, "cbtool_version": STR,
    "checkpoint": Obj({"path": Opt(STR), "sha256": Opt(STR)}, required=("path", "sha256")),
    "corpus": Opt(Obj({"kind": STR, "name": STR, "num_states": INT, "out_degree": INT, "seq_len": INT, "seed": INT,
                       "num_seqs": INT, "stream": STR, "held_out_seed": INT, "path": Opt(STR),
                       "text_field": Opt(STR), "split": STR, "holdout": STR})),
    "shard_tokens": INT, "max_tokens": Opt(INT),
    "sites": ListOf(Obj({"name": STR, "layer": INT, "component": STR, "group": INT, "groups": INT, "dim": INT,
                         "num_codes": INT, "k": INT, "dtype": STR, "acts": STR, "latents": INT},
                        required=("name", "layer", "component", "group", "groups", "dim", "num_codes", "k"))),
    "labels": ListOf(STR), "token_strings": Opt(ListOf(STR)), "complete": BOOL,
    "sae": Opt(Obj({"format": STR, "architecture": STR, "files": MapOf(STR), "d_in": INT, "d_sae": INT, "k": INT,
                    "k_fixed": BOOL, "hook": STR, "site": STR, "path": STR, "absolute_path": STR},
                   required=("format", "files", "d_sae", "k", "k_fixed", "site"))),
    "base_model": Opt(Obj({"kind": STR, "path": STR, "sha256": STR})),
    "num_shards": Opt(INT), "tokens": Opt(INT), "docs": Opt(INT),
    "shards": Opt(ListOf(Obj({"index": INT, "tokens": INT, "docs": INT, "sha256": STR},
                              required=("index", "tokens", "docs")))),
}, required=("format", "format_version", "checkpoint", "sites"))


# one row of a checkpoint's metrics.jsonl (cbtool/training/metrics_log.py)
METRICS_ROW = Obj({
    "step": INT, "phase": STR, "loss": Opt(NUM), "accuracy": Opt(NUM), "mse": Opt(NUM), "lr": Opt(NUM),
    "tokens_per_s": Opt(NUM), "seconds": Opt(NUM), "revived": Opt(INT), "fsm_valid": Opt(NUM),
    "sites": MapOf(Obj({"mse": Opt(NUM), "live": INT, "dead": INT})),
}, required=("step",))


def validate(doc: Any, schema: Spec, where: str) -> None:
    """Refuse `doc` (read from `where`) unless it has the declared shape: one UserError line."""
    schema.check(doc, "", where)


def read_versioned_json(doc: Path, fmt: str, version: int, what: str, schema: Spec | None = None) -> dict[str, Any]:
    """Parse a cbtool metadata file and check its format name and version, then its shape against `schema`
    (the specs below): one UserError line for any problem."""
    try:
        text = read_bytes(doc, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{doc} is not valid JSON (not UTF-8 text: byte {e.start})") from None
    data = strict_json.loads(text, str(doc))
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise UserError(f"{doc} is not a cbtool {what} (format != {fmt!r})")
    if data.get("format_version") != version:
        raise UserError(f"{doc}: {what} format version {data.get('format_version')!r} is not supported "
                        f"(this cbtool reads {version})")
    if schema is not None:
        validate(data, schema, str(doc))
    return data
