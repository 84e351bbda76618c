"""Numbers from the user, checked in one place: every command-line option (cbtool/cli.py checks each parsed
value before a command runs), every number in a JSON document (cbtool/strict_json.py) and every number in a
spec row. NaN and infinity never pass as numbers; integers stay within what the arrays, seeds and random
generators they feed can hold (docs/formats.md "Limits")."""

from __future__ import annotations

import math
from typing import Any

from cbtool.errors import UserError

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
