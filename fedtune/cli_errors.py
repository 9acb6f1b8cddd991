"""The CLI's one top-level error handler: every user error is one line and exit code 2, never a traceback.

``new_app`` makes every typer app (the root and its sub-apps) with this handler and with tracebacks that
never show local variables (a local may hold a private key). Unexpected errors (a bug in fedtune) print one
short line and a hint; ``FEDTUNE_DEBUG=1`` prints the traceback, still without locals.
"""

from __future__ import annotations

import os
import sys
import traceback

import click
import typer
from typer.core import TyperGroup

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def user_message(err: BaseException) -> str | None:
    """The one-line message for an error caused by input, or None for an internal error."""
    from fedtune.config import ConfigError
    from fedtune.errors import UserError

    if isinstance(err, ConfigError):
        if len(err.problems) == 1:
            return f"{err.source}: {err.problems[0]}" if err.source not in err.problems[0] else err.problems[0]
        return str(err)  # `validate` and friends report every config error at once, one per line
    if isinstance(err, UserError):
        return str(err)
    try:
        from fedtune.registry.errors import RegistryError
    except ImportError:  # pragma: no cover
        RegistryError = ()  # type: ignore[assignment]
    if RegistryError and isinstance(err, RegistryError):
        return " ".join(str(err).split())
    if isinstance(err, UnicodeDecodeError):
        return f"input is not UTF-8 text (byte at offset {err.start}); save the file as UTF-8"
    if isinstance(err, OSError) and err.filename is None and isinstance(err, (FileNotFoundError, PermissionError)):
        return " ".join(str(err).split())
    if isinstance(err, IsADirectoryError):
        return f"{err.filename}: is a directory; give a file path"
    if isinstance(err, NotADirectoryError):
        return f"{err.filename}: a part of this path is a file, not a directory; check the path"
    if isinstance(err, FileNotFoundError):
        return f"{err.filename}: no such file or directory; check the path"
    if isinstance(err, PermissionError):
        return f"{err.filename}: permission denied; check the path's owner and mode"
    if isinstance(err, FileExistsError):
        return f"{err.filename}: already exists; choose another path or remove it"
    return None


def report(err: BaseException) -> int:
    """Print the error for a person (stderr) and return the exit code."""
    message = user_message(err)
    if message is not None:
        click.echo(f"error: {message}", err=True)
        return EXIT_USER_ERROR
    click.echo(f"internal error: {type(err).__name__}: {' '.join(str(err).split())[:500]}", err=True)
    if os.environ.get("FEDTUNE_DEBUG"):
        click.echo("".join(traceback.format_exception(type(err), err, err.__traceback__)), err=True)
    else:
        click.echo("this is a bug in fedtune, not in your input; rerun with FEDTUNE_DEBUG=1 for the traceback "
                   "and report it", err=True)
    return EXIT_INTERNAL_ERROR


class HandledGroup(TyperGroup):
    """A typer group whose invocation maps every exception to one printed line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit,
                KeyboardInterrupt):
            raise
        except Exception as err:  # the one top-level handler
            sys.stdout.flush()
            raise typer.Exit(report(err)) from None


def new_app(**kwargs) -> typer.Typer:
    """A typer app with the handler and no locals in any traceback."""
    kwargs.setdefault("add_completion", False)
    kwargs.setdefault("no_args_is_help", True)
    return typer.Typer(cls=HandledGroup, pretty_exceptions_show_locals=False, **kwargs)
