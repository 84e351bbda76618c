"""Interrupts and closed pipes: how any command ends when the user stops it or stops reading its output.

- Ctrl-C (SIGINT), SIGTERM and SIGHUP end a command with ONE line saying what was saved and how to continue, exit 130
  143 or 129 (128 + the signal's number), no traceback (SIGHUP ignored at the start, as by `nohup`, stays
  ignored). SIGTERM is raised as `Terminated` where the process is,
  as Python raises KeyboardInterrupt for SIGINT, so the same clean-up runs for both: `finally` blocks release
  locks (cbtool/util/locks.py) and the temp files of atomic writes are removed (cbtool/util/files.py,
  cbtool/formats/checkpoint.py). A command that writes something resumable wraps its work in `describing(...)`,
  which attaches "what was saved" to the interrupt on its way out; the CLI prints it (cbtool/cli.py).
- `deferred()` holds both signals while a step that must not be cut in two runs (a checkpoint's renames)
  and acts on them when it ends.
- A closed stdout (`cbtool find-codes ... | head -1`) ends the command quietly with exit 0 (`closed_stdout`):
  stdout is pointed at /dev/null so Python's final flush has nowhere to fail.

Under torchrun cbtool/util/distributed.py replaces the SIGTERM handler with its own (torchrun stops every rank
with SIGTERM when one fails: each rank leaves with exit 2 and one line)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143
# SIGHUP (the terminal closed, an ssh session dropped) ends a command as SIGTERM does, exit 129; unless it is
# ignored when the command starts (`nohup`), which is then respected
_STOPS = (signal.SIGTERM, *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


class Terminated(BaseException):
    """SIGTERM (or SIGHUP), raised where the process is (not an Exception: nothing catches it as an error)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__()
        self.signum = signum


class Interrupted(Exception):
    """An interrupted command, on its way to the CLI: the one line to print and the exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> Callable[[], None]:
    """Raise `Terminated` on SIGTERM and SIGHUP (unless SIGHUP is ignored, as under `nohup`) from now on;
    returns a function that puts the previous handlers back."""
    if not _main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in _STOPS}
    for s, handler in previous.items():
        if s == signal.SIGTERM or handler is signal.SIG_DFL:
            signal.signal(s, _terminate)

    def restore() -> None:
        for s, handler in previous.items():
            if signal.getsignal(s) is _terminate and handler is not None:
                signal.signal(s, handler)

    return restore


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def is_interrupt(e: BaseException) -> bool:
    return isinstance(e, KeyboardInterrupt | Terminated)


@contextmanager
def describing(saved: Callable[[], str]) -> Iterator[None]:
    """Run a block; when it is interrupted, `saved()` (what is on disk and how to continue) goes with the
    interrupt. The innermost description wins."""
    try:
        yield
    except (KeyboardInterrupt, Terminated) as e:
        if getattr(e, "saved", None) is None:
            try:
                e.saved = saved()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - a description must never replace the interrupt
                e.saved = None  # type: ignore[attr-defined]
        raise


def interrupted(e: BaseException) -> Interrupted:
    """The one line and exit code for an interrupt `e`."""
    num = e.signum if isinstance(e, Terminated) else signal.SIGINT
    name, code = signal.Signals(num).name, 128 + num
    saved = getattr(e, "saved", None)
    return Interrupted(f"interrupted by {name}" + (f": {saved}" if saved else ""), code)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP while the block runs; a signal that arrived meanwhile is acted on after
    it."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, *_STOPS)}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])


def closed_stdout() -> None:
    """The reader of stdout went away (`| head`): point stdout at /dev/null so nothing more fails, quietly
    (the recipe of the Python documentation, signal module, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (an in-process test runner)
        pass


def flush_stdout() -> None:
    """Flush stdout at the end of a command; a reader that went away is not an error."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        closed_stdout()
