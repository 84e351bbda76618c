"""Helpers for tests: invoke the real CLI in-process."""

from __future__ import annotations

from typer.testing import CliRunner

from cbtool.cli import app


def run_cli(*args: object):
    """Run `cbtool ARGS` through the real Typer app; returns the Result (exit_code, stdout, stderr)."""
    return CliRunner().invoke(app, [str(a) for a in args])
