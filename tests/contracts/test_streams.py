"""Closed or full standard streams never change the exit code of bad input (2, never 1 or 120), closed stdin
is one line, and a Rust library's panic (tokenizers' PanicException, a BaseException) is bad input too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cbtool.errors import environment_error, is_foreign_panic
from tests.helpers import run_cli

BAD = {"missing-checkpoint": ["info", "/nonexistent/ck"], "nan-option": ["dead-codes", "--max-dead-frac", "nan"],
       "unknown-option": ["info", "--frobnicate"]}
STREAMS = ["stderr-closed", "stderr-full", "stdout-closed", "stdout-full", "all-closed", "stdin-closed"]


def _run(args: list[str], streams: str, stdin_text: str | None = None) -> subprocess.CompletedProcess:
    close = {"stderr-closed": (2,), "stdout-closed": (1,), "all-closed": (0, 1, 2),
             "stdin-closed": (0,)}.get(streams, ())
    full = open("/dev/full", "w")  # noqa: SIM115
    try:
        return subprocess.run([sys.executable, "-m", "cbtool", *args], timeout=120, text=True,
                              input=stdin_text if 0 not in close else None,
                              stdout=full if streams == "stdout-full" else subprocess.PIPE,
                              stderr=full if streams == "stderr-full" else subprocess.PIPE,
                              preexec_fn=(lambda: [os.close(fd) for fd in close]) if close else None)
    finally:
        full.close()


@pytest.mark.parametrize("streams", STREAMS)
@pytest.mark.parametrize("bad", BAD.values(), ids=BAD.keys())
def test_bad_input_is_exit_2_whatever_the_streams(bad, streams):
    res = _run(bad, streams)
    assert res.returncode == 2, (res.returncode, res.stderr)
    if streams in ("stdout-closed", "stdout-full", "stdin-closed"):
        lines = (res.stderr or "").splitlines()
        assert len(lines) == 1 and lines[0].startswith("cbtool: error: "), res.stderr


@pytest.mark.parametrize("stdin", [None, b"\xff\xfe not utf-8\n", ""], ids=["closed", "not-utf8", "empty"])
def test_codes_from_stdin_that_cannot_be_read_is_one_line(stdin, tmp_path):
    args = ["intervene", "--codes-from", "-", "--run", str(tmp_path)]
    if stdin is None:
        res = _run(args, "stdin-closed")
    else:
        res = subprocess.run([sys.executable, "-m", "cbtool", *args], input=stdin.encode() if isinstance(stdin, str)
                             else stdin, capture_output=True, timeout=120)
        res = subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())
    assert res.returncode == 2, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbtool: error: ") and "Traceback" not in res.stderr, res.stderr


# pyo3 creates `pyo3_runtime.PanicException` lazily and it cannot be imported: one of the same identity
PanicException = type("PanicException", (BaseException,), {"__module__": "pyo3_runtime"})


def test_a_tokenizer_panic_is_one_line_exit_2(monkeypatch, tmp_path):
    def panic(*args, **kwargs):
        raise PanicException("called `Option::unwrap()` on a `None` value\nat tokenizers/src/lib.rs")

    assert is_foreign_panic(PanicException("x")) and not is_foreign_panic(KeyboardInterrupt())
    assert environment_error(PanicException("boom")).endswith("failed on this input: boom")
    monkeypatch.setattr("cbtool.commands.info.load_checkpoint", panic)
    (tmp_path / "cbtool.json").write_text("{}")
    res = run_cli("info", tmp_path)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert lines == ["cbtool: error: a Rust library (tokenizers or safetensors) failed on this input: "
                     "called `Option::unwrap()` on a `None` value"], res.stderr
