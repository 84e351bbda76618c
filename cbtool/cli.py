"""The `cbtool` command line: one Typer app; each command lives in `cbtool/commands/`.

Exit codes (README.md "Exit codes"): 0 ok, 1 a requested check failed, 2 bad input (one line on stderr),
70 anything unexpected (a short message; the traceback only with --debug).
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x vendors click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover - older typer on real click
    from click import exceptions as cx

from cbtool.commands.common import err
from cbtool.errors import CbtoolWarning, CheckFailed, UserError, environment_error, is_foreign_panic
from cbtool.util import progress, signals, threads
from cbtool.util.limits import check_environment, check_option, drop_bad_columns
from cbtool.util.safe_text import say
from cbtool.version import __version__

EXIT_CHECK, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 70
# commands that run as one job over the ranks of `torchrun` (cbtool/util/distributed.py); others are refused there
DISTRIBUTED = ("train", "embed", "find-codes", "dead-codes", "show-code")


class _Group(TyperGroup):
    """Maps every failure to the documented exit code and one line on stderr."""

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command)
        return command

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
            return name, cmd, rest
        from cbtool.util import distributed

        if distributed.requested_size() > 1:  # launched by torchrun: join the other ranks first
            if name not in DISTRIBUTED:
                raise UserError(f"`cbtool {name}` does not run under torchrun (WORLD_SIZE > 1); run it in one "
                                f"process. Commands that do: {', '.join(DISTRIBUTED)}")
            if not distributed.init().is_main:  # rank 0 prints the results; every rank prints its errors
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        return name, cmd, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (KeyboardInterrupt, signals.Terminated) as e:  # typer would exit 130 without a word
            raise signals.interrupted(e) from None
        except BrokenPipeError:  # click would exit 1: a closed `| head` is not a failed check
            signals.closed_stdout()
            raise typer.Exit(0) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        drop_bad_columns()  # COLUMNS=0 or COLUMNS=abc: the terminal's own width, not an empty screen
        progress.enable(err)  # commands show progress; library callers in the same process stay quiet after
        _plain_flags(self)
        restore = signals.install()  # SIGTERM ends a command as Ctrl-C does (cbtool/util/signals.py)
        try:
            with warnings.catch_warnings():  # the library's CbtoolWarnings: one line each, every time
                warnings.simplefilter("always", CbtoolWarning)
                warnings.showwarning = _show_warning
                self._main(args, prog_name, complete_var, **extra)
        finally:
            restore()
            progress.enable(None)
            threads.restore()  # callers that run several commands in one process (tests) get their settings back

    def _main(self, args, prog_name, complete_var, **extra):
        debug = "--debug" in (sys.argv[1:] if args is None else list(args)) or bool(os.environ.get("CBTOOL_DEBUG"))
        _check_numbers(self)
        try:
            rc = super().main(args=args, prog_name=prog_name or "cbtool", complete_var=complete_var,
                              standalone_mode=False, **extra)
        except (typer.Exit, getattr(cx, "Exit", typer.Exit)) as e:
            sys.exit(e.exit_code)
        except (typer.Abort, getattr(cx, "Abort", typer.Abort)):
            _fail("aborted", 130)
        except cx.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # typer already printed the help
                sys.exit(0)
            _fail(e.format_message(), EXIT_USAGE)
        except cx.ClickException as e:
            _fail(e.format_message(), EXIT_USAGE)
        except UserError as e:
            _fail(str(e), EXIT_USAGE)
        except CheckFailed as e:
            _fail(str(e), EXIT_CHECK)
        except (signals.Interrupted, KeyboardInterrupt, signals.Terminated) as e:  # one line: what was saved
            stop = e if isinstance(e, signals.Interrupted) else signals.interrupted(e)
            _fail(str(stop), stop.code, kind="")
        except BrokenPipeError:
            signals.closed_stdout()
            sys.exit(0)
        except Exception as e:  # noqa: BLE001 - the documented last resort
            if debug:
                traceback.print_exc()
            message = environment_error(e)  # an error class that is always bad input or the environment
            if message is not None:
                _fail(message, EXIT_USAGE)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _fail(f"internal error: {type(e).__name__}: {msg} (rerun with --debug for the traceback)",
                  EXIT_INTERNAL)
        except BaseException as e:  # a foreign library's panic (tokenizers): bad input, not a crash
            if not is_foreign_panic(e):
                raise
            if debug:
                traceback.print_exc()
            _fail(environment_error(e) or "", EXIT_USAGE)
        signals.flush_stdout()
        sys.exit(rc if isinstance(rc, int) else 0)


def _check_numbers(group: TyperGroup) -> None:
    """Every command checks each parsed option value (docs/cli.md) before it runs: no NaN, no
    infinity, no integer beyond int64, seeds within 0..2^32-1."""
    for cmd in group.commands.values():
        if getattr(cmd.callback, "_numbers_checked", False):
            continue
        flags = {p.name: max(getattr(p, "opts", None) or [f"--{p.name}"], key=len) for p in cmd.params}

        def checked(*args, _run=cmd.callback, _flags=flags, _name=cmd.name, **kwargs):
            check_environment()  # environment variables are parsed like options
            for name, value in kwargs.items():
                check_option(_flags.get(name, f"--{name}"), value)
            _agree_ranks(_name, kwargs)
            return _run(*args, **kwargs)

        checked._numbers_checked = True  # type: ignore[attr-defined]
        cmd.callback = checked


def _agree_ranks(name: str | None, kwargs: dict) -> None:
    """Under torchrun every rank must run the same command with the same arguments (paths made absolute):
    else every rank refuses (exit 2) before any work, instead of merging different jobs or waiting forever."""
    dist = sys.modules.get("cbtool.util.distributed")
    if dist is None or not dist.world().active or name in ("train", "embed"):  # those two agree on more
        return
    args = {k: os.path.abspath(v) if isinstance(v, os.PathLike) else v for k, v in kwargs.items()}
    dist.agree({"command": name, "arguments": args}, f"the {name} arguments")


def _plain_flags(command) -> None:
    """Typer's help would show `<bool>` after a flag (and after --help), which takes no value."""
    if getattr(command, "_plain_flags", False):
        return
    command._plain_flags = True
    for param in command.params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    help_option = command.get_help_option

    def plain_help_option(ctx, help_option=help_option):
        option = help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = plain_help_option


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if not issubclass(category, CbtoolWarning):
        return _python_showwarning(message, category, filename, lineno, file, line)
    say(f"cbtool: warning: {' '.join(str(message).split())}")


_python_showwarning = warnings.showwarning


def _fail(message: str, code: int, kind: str = "error: ") -> None:
    dist = sys.modules.get("cbtool.util.distributed")  # under torchrun: which rank speaks
    rank = dist.tag() if dist is not None else ""
    say(f"cbtool: {kind}{rank}{' '.join(message.split())}")  # visible; a closed or full stderr keeps the code
    if rank:  # under torchrun: leave now, before the process group's threads are torn down (gloo may abort)
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


app = typer.Typer(
    cls=_Group,
    name="cbtool",
    help="Train, store, search and steer codebook features (arXiv 2310.17230).\n\n"
    "Quick start:  cbtool train && cbtool eval && cbtool embed && cbtool find-codes --labels state",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cbtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for unexpected errors."),
    threads_: str | None = typer.Option(None, "--threads", metavar="N|auto",
                                        help="Threads to compute with: a number, or auto for the cores not busy "
                                        "now (default $CBTOOL_THREADS, else every core)."),
) -> None:
    """Codebook features: train, embed, search, steer."""
    threads.configure(threads_)  # before torch is imported (docs/cli.md "Threads")


def _register() -> None:
    from cbtool.commands import dead_codes, embed, explain, find_codes, info, intervene, report, show_code, train
    from cbtool.commands import eval as eval_cmd

    for module in (train, eval_cmd, info, embed, find_codes, dead_codes, show_code, explain, intervene, report):
        module.register(app)


_register()


def main() -> None:
    app()
