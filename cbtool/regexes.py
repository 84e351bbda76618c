"""Regular expressions from the user (`find-codes --regex`, `intervene --regex`), compiled with the `regex`
package (Python `re` syntax) so that every search has a time limit: a catastrophic pattern is refused with
one line instead of hanging a command. Every way a pattern can be bad (syntax, a repeat count too large,
nesting too deep) is one `UserError` line."""

from __future__ import annotations

import os
from collections.abc import Iterator

import regex

from cbtool.errors import UserError

TIMEOUT_ENV = "CBTOOL_REGEX_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0  # CPU seconds of one search of one document; an ordinary regex takes milliseconds
MAX_PATTERN_CHARS = 10_000


def timeout_s() -> float:
    """Seconds one search may take: $CBTOOL_REGEX_TIMEOUT, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"${TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise UserError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return value


class UserRegex:
    """A compiled user pattern whose searches stop with a `UserError` after `timeout_s()` seconds."""

    def __init__(self, pattern: str, option: str = "--regex") -> None:
        self.pattern, self.option = pattern, option
        if len(pattern) > MAX_PATTERN_CHARS:
            raise UserError(f"{option} is {len(pattern):,} characters long; the limit is {MAX_PATTERN_CHARS:,}")
        try:
            self._re = regex.compile(pattern, regex.VERSION0)
        except (regex.error, OverflowError, ValueError) as e:
            raise UserError(f"invalid regex {_short(pattern)} ({option}): {e}") from None
        except RecursionError:
            raise UserError(f"invalid regex {_short(pattern)} ({option}): nested too deeply") from None
        self.timeout = timeout_s()

    def _too_slow(self) -> UserError:
        return UserError(f"{self.option} {_short(self.pattern)} ran for over {self.timeout:g} s of CPU time on one "
                         f"document (catastrophic backtracking?); simplify it (limit: ${TIMEOUT_ENV})")

    def finditer(self, text: str) -> Iterator[regex.Match[str]]:
        try:
            yield from self._re.finditer(text, timeout=self.timeout)
        except TimeoutError:
            raise self._too_slow() from None

    def search(self, text: str) -> bool:
        try:
            return self._re.search(text, timeout=self.timeout) is not None
        except TimeoutError:
            raise self._too_slow() from None


def _short(pattern: str, limit: int = 60) -> str:
    return repr(pattern if len(pattern) <= limit else pattern[:limit] + "...")
