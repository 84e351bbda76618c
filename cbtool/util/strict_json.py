"""JSON from files and users, parsed strictly: every way a document can be bad is one `UserError` line.

`loads` refuses what Python's json module lets through or turns into a crash elsewhere: NaN and Infinity
(and numbers that overflow to infinity), integers outside int64, nesting deeper than MAX_DEPTH (a
RecursionError in the parser or in any code that walks the document), and strings that cannot be written
as UTF-8 (a lone surrogate such as \\ud800). Used for cbtool.json, manifest.json, shard.json, spec rows,
.jsonl corpora and every other JSON cbtool reads."""

from __future__ import annotations

import json
import math
from typing import Any

from cbtool.errors import UserError
from cbtool.util.limits import MAX_INT

MAX_DEPTH = 64  # nesting of objects and lists; cbtool's own files use < 8
MAX_INT_DIGITS = 19


class _Bad(ValueError):
    pass


def _constant(name: str) -> Any:
    raise _Bad(f"{name} is not a number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Bad(f"number {text[:40]} overflows")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS or abs(int(text)) > MAX_INT:
        raise _Bad(f"integer {text[:40]}{'...' if len(text) > 40 else ''} is out of range (the limit is 2^63 - 1)")
    return int(text)


def loads(text: str, where: str) -> Any:
    """Parse `text` (from `where`, named in the error) as strict JSON."""
    try:
        doc = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except _Bad as e:
        raise UserError(f"{where}: {e}") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply (the limit is {MAX_DEPTH} levels)") from None
    check_document(doc, where)
    return doc


def check_document(doc: Any, where: str) -> None:
    """Depth and text of a parsed document, walked without recursion."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise UserError(f"{where}: JSON nested too deeply (the limit is {MAX_DEPTH} levels)")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, where)
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            _check_text(value, where)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: text that is not valid Unicode ({text[e.start]!r} at character {e.start}: "
                        f"a lone surrogate)") from None


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float (in any dict, list or tuple) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """The one JSON writer for cbtool's files and `--json` output: what `loads` reads back. Python's json
    would write NaN and Infinity literals that no strict parser accepts; a non-finite number is written as
    null instead (docs/formats.md: a metric that is not a finite number is null)."""
    return json.dumps(finite(value), allow_nan=False, **options)


def lines(text: str) -> list[str]:
    """The lines of a JSONL (or other line-per-record) text, split on "\\n" only, with a "\\r" before it
    dropped. `str.splitlines()` would also split inside records, at U+2028, U+2029, U+0085 and other
    separators that JSON strings may hold unescaped (docs/formats.md)."""
    if not text:
        return []
    if text.endswith("\n"):
        text = text[:-1]
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
