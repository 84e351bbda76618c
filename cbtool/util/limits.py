"""Limits: one constant each, checked before anything is allocated (docs/formats.md, "Limits"); and numbers
from the user, checked in one place: every command-line option (the CLI checks each parsed value before a
command runs, docs/cli.md), every number in a JSON document (cbtool/util/strict_json.py) and every number in a
spec row. NaN and infinity never pass as numbers; integers stay within what the arrays, seeds and random
generators they feed can hold."""

from __future__ import annotations

import math
import os
from typing import Any

from cbtool.errors import UserError

MAX_CODES = 2**24  # codes per codebook (`train --num-codes`, cbtool.json codebooks)
MAX_ELEMENTS = 2**34  # elements of any one model or codebook described in cbtool.json (64 GiB of float32)
MAX_CODEBOOK_BYTES = 8 * 2**30  # one codebook tensor that `train` will allocate
MAX_SEQ_LEN = 2**20  # tokens per TokFSM sequence in cbtool.json
MAX_FSM_STATES = 100  # TokFSM states are written as two digits
MAX_VOCAB = 2**21  # tokens of a BPE vocabulary `train --vocab-size` will build
MAX_SAMPLES = 10**6  # sampled sequences of one command (`intervene -n` x prompts, spec samples, `eval --samples`)
MAX_INT_DIGITS = 18  # digits of a layer or code number in a code reference (fits int64; no huge int())

MAX_INT = 2**63 - 1  # any integer: fits int64 (numpy, torch, safetensors)
MAX_SEED = 2**32 - 1  # a seed: what numpy, torch and scikit-learn all accept


def check_number(value: Any, what: str) -> None:
    """Refuse NaN, infinity and integers outside int64 (bools are not numbers here)."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value}")
    if isinstance(value, int) and not -MAX_INT <= value <= MAX_INT:
        raise UserError(f"{what} is out of range: {_digits(value)} (the limit is 2^63 - 1)")


FLOAT32_MAX = 3.4028234663852886e38


def check_representable(value: float, what: str, largest: float = FLOAT32_MAX, dtype: str = "float32") -> None:
    """Refuse a number the tensors it feeds cannot hold (`largest`: the finite maximum of their dtype): 1e39
    would become infinity in float32 and NaN after the first multiplication by zero."""
    check_number(value, what)
    if isinstance(value, int | float) and not isinstance(value, bool) and abs(value) > largest:
        raise UserError(f"{what} {value:g} is too large for {dtype} (at most {largest:.4g})")


def check_seed(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_SEED:
        raise UserError(f"{what} must be in 0..{MAX_SEED} (2^32 - 1), got {_digits(value)}")


def check_option(flag: str, value: Any) -> None:
    """One parsed option value (a list for a repeatable option); seeds by name."""
    for v in value if isinstance(value, list | tuple) else [value]:
        check_number(v, flag)
        if flag.endswith("seed"):
            check_seed(v, flag)


def _digits(value: int) -> str:
    """The number, or how long it is when printing it whole would flood the line."""
    return str(value) if abs(value) < 10**30 else f"a {len(str(abs(value)))}-digit number"


# -- environment variables: parsed like options (docs/cli.md "Exit codes") ---------------------------------


def env_int(name: str, default: int, low: int = 0, high: int = MAX_INT) -> int:
    """$NAME as an integer in low..high; `default` when unset or empty; else one `UserError` line naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if len(raw) > MAX_INT_DIGITS + 1 or not (raw.isascii() and raw.lstrip("+-").isdigit()):
        raise UserError(f"${name} must be an integer, got {raw[:40]!r}")
    value = int(raw)
    if not low <= value <= high:
        raise UserError(f"${name} must be in {low}..{high}, got {value}")
    return value


def env_seconds(name: str, default: float) -> float:
    """$NAME as a positive, finite number of seconds; `default` when unset or empty; else one `UserError` line."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"${name} must be a number of seconds, got {raw[:40]!r}") from None
    if not 0 < value < float("inf"):
        raise UserError(f"${name} must be a positive, finite number of seconds, got {raw[:40]!r}")
    return value


def env_path(name: str) -> str | None:
    """$NAME as a path; None when unset or empty; a NUL byte (which no path can hold) is one `UserError` line."""
    raw = os.environ.get(name, "")
    if "\0" in raw:
        raise UserError(f"${name} is not a usable path (it holds a NUL byte)")
    return raw or None


def env_columns() -> int | None:
    """$COLUMNS as a width of at least 1 column, or None when it is unset or not such a number (the caller
    then uses its own width: a bad $COLUMNS never stops a command nor makes it print nothing)."""
    raw = os.environ.get("COLUMNS", "").strip()
    if raw.isascii() and raw.isdigit() and 0 < len(raw) < 6 and int(raw) > 0:
        return int(raw)
    return None


def drop_bad_columns() -> None:
    """Forget a $COLUMNS that is not a width (0, a word): rich and the help formatter would otherwise lay
    everything out in no columns at all, printing nothing."""
    if "COLUMNS" in os.environ and env_columns() is None:
        del os.environ["COLUMNS"]


ENV_SECONDS = ("CBTOOL_PROGRESS_SECONDS", "CBTOOL_DIST_TIMEOUT", "CBTOOL_REGEX_TIMEOUT")


def check_environment() -> None:
    """Every environment variable cbtool reads, checked as an option is, before a command runs (docs/cli.md):
    a bad value is one `UserError` line naming the variable. The ranks of torchrun only when WORLD_SIZE > 1."""
    for name in ENV_SECONDS:
        env_seconds(name, 1.0)
    run = env_path("CBTOOL_RUN")
    if run is not None and os.path.exists(run) and not os.path.isdir(run):
        raise UserError(f"$CBTOOL_RUN={run} is not a directory")
    if env_int("WORLD_SIZE", 1, low=1, high=2**20) > 1:
        size = env_int("WORLD_SIZE", 1)
        for name in ("RANK", "LOCAL_RANK"):
            env_int(name, 0, low=0, high=size - 1 if name == "RANK" else 2**20)
