"""The two kinds of expected failure, mapped to exit codes by the CLI (README.md "Exit codes")."""


class UserError(Exception):
    """Bad input of any kind: exit 2 with this one-line message."""


class CheckFailed(Exception):
    """A check the user asked for did not hold: exit 1 with this one-line message."""


class CbtoolWarning(UserWarning):
    """Something the user should know that does not stop the command: a Python warning for library callers,
    one line `cbtool: warning: ...` on stderr from the CLI."""
