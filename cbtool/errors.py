"""The two kinds of expected failure, mapped to exit codes by the CLI (docs/cli.md "Exit codes"); and the error
classes that always mean bad input or a problem of the environment, never a bug in cbtool: the CLI maps each to
exit 2 with one line, wherever in a command it is raised. Listed by class, not by the places known to raise them,
so a case nobody listed is covered too."""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input of any kind: exit 2 with this one-line message."""


class CheckFailed(Exception):
    """A check the user asked for did not hold: exit 1 with this one-line message."""


class CbtoolWarning(UserWarning):
    """Something the user should know that does not stop the command: a Python warning for library callers,
    one line `cbtool: warning: ...` on stderr from the CLI."""


_OS_MESSAGES = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
    errno.EMFILE: "too many open files",
    errno.EFBIG: "file too large",
}


def environment_error(e: BaseException) -> str | None:
    """The one line to print for `e` when its class is bad input or environment; None when it is not."""
    if isinstance(e, OSError) and not isinstance(e, BrokenPipeError):
        what = _OS_MESSAGES.get(e.errno or 0) or e.strerror or str(e)
        where = f": {e.filename}" if e.filename else ""
        return f"{what}{where}"
    from safetensors import SafetensorError

    if isinstance(e, SafetensorError):  # the safetensors writer reports a full disk as its own error type
        text = str(e)
        lowered = text.lower()
        if "no space left" in lowered or "os error 28" in lowered:
            return "no space left on the device (writing safetensors)"
        return f"safetensors: {text.splitlines()[0] if text else type(e).__name__}"
    if isinstance(e, RecursionError):
        return "the input is nested too deeply to process"
    if isinstance(e, OverflowError):
        return f"a number is too large: {first_line(e)}"
    if isinstance(e, UnicodeError):
        return f"text that cannot be encoded or decoded: {first_line(e)}"
    if is_foreign_panic(e):  # a Rust library (tokenizers, safetensors) panicked on what it was given
        return f"a Rust library (tokenizers or safetensors) failed on this input: {first_line(e)}"
    if isinstance(e, MemoryError):
        return "out of memory: use smaller sizes (fewer samples, shorter sequences, a smaller batch)"
    return None


def is_foreign_panic(e: BaseException) -> bool:
    """A `pyo3_runtime.PanicException` (tokenizers, safetensors): a BaseException, so `except Exception` misses
    it, raised when Rust code panics on malformed input; matched by class, as the class is not importable."""
    return any(c.__name__ == "PanicException" and c.__module__ == "pyo3_runtime" for c in type(e).__mro__)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
