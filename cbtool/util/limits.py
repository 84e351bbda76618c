"""Limits: one constant each, checked before anything is allocated (docs/formats.md, "Limits"); and numbers
from the user, checked in one place: every command-line option (the CLI checks each parsed value before a
command runs, docs/cli.md), every number in a JSON document (cbtool/util/strict_json.py) and every number in a
spec row. NaN and infinity never pass as numbers; integers stay within what the arrays, seeds and random
generators they feed can hold."""

from __future__ import annotations

import math
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
