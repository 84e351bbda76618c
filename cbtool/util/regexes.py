"""Regular expressions from the user (`find-codes --regex`, `intervene --regex`), compiled with the `regex`
package (Python `re` syntax) so that every search has a time limit: a catastrophic pattern is refused with
one line instead of hanging a command. Every way a pattern can be bad (syntax, a repeat count too large,
nesting too deep) is one `UserError` line."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

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

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every match, in one call (no generator step per match)."""
        try:
            return [m.span() for m in self._re.finditer(text, timeout=self.timeout)]
        except TimeoutError:
            raise self._too_slow() from None

    def document_spans(self, text: str, bounds: list[int]) -> tuple[list[tuple[int, int]], list[int]]:
        """Matches in each document text[bounds[i]:bounds[i + 1]]: their (start, end) within the document, and
        each one's document start. The regex-feature hot path: in the main thread the time limit is a CPU-time
        timer (SIGPROF) re-armed per document, because the regex module's own limit reads the process CPU clock
        (a system call) at every match, which more than doubles the time of a frequent pattern."""
        found: list[tuple[int, int]] = []
        firsts: list[int] = []
        timed = (threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
                 and signal.getsignal(signal.SIGPROF) is not None  # None: a handler set outside Python, kept
                 and not _communicating())
        old = signal.signal(signal.SIGPROF, _out_of_time) if timed else None
        old_timer = signal.getitimer(signal.ITIMER_PROF) if timed else (0.0, 0.0)  # restored after (a profiler's)
        try:
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if a == b:
                    continue
                if timed:
                    signal.setitimer(signal.ITIMER_PROF, self.timeout)
                    got = [m.span() for m in self._re.finditer(text[a:b])]
                else:
                    got = self.spans(text[a:b])
                if got:
                    found += got
                    firsts += [a] * len(got)
        except _OutOfTime:
            raise self._too_slow() from None
        finally:
            if timed:
                signal.setitimer(signal.ITIMER_PROF, *old_timer)
                signal.signal(signal.SIGPROF, old)
        return found, firsts

    def search(self, text: str) -> bool:
        try:
            return self._re.search(text, timeout=self.timeout) is not None
        except TimeoutError:
            raise self._too_slow() from None


class _OutOfTime(Exception):
    """A document's search ran past the time limit (raised by the SIGPROF handler)."""


def _out_of_time(signum: int, frame: Any) -> None:
    raise _OutOfTime


def _short(pattern: str, limit: int = 60) -> str:
    return repr(pattern if len(pattern) <= limit else pattern[:limit] + "...")


def _communicating() -> bool:
    """Whether torch.distributed runs here (torchrun): its gloo threads sit in system calls that a SIGPROF
    interrupts (EINTR), which has aborted a rank, so those processes use the regex module's own limit."""
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())
