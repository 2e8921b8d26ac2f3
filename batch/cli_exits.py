"""How every command ends on the library's errors: one message line on stderr and the exit
code from the table in `batch.errors`. Shared by `batch.cli` and the commands it registers
from their own modules (`batch.forget_command`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from batch import observe
from batch.errors import EXIT_MEANINGS, LockedError, ManifestError, OutputError, exit_code_for

# The help's last paragraph, under `pulse-batch --help` and `run --help`.
EPILOG = "Exit codes: " + "; ".join(f"{c.value} {text}" for c, text in EXIT_MEANINGS.items())

# A path in a message is never cut; with --log-format json, messages are log records.
err: Console = observe.StderrConsole(stderr=True, soft_wrap=True)


def fail(message: object, code: int, label: str = "error") -> NoReturn:
    err.print(f"[red]{label}:[/red] {escape(str(message))}", highlight=False)
    raise typer.Exit(code) from None


@contextmanager
def exit_codes() -> Iterator[None]:
    """The library's usage, lock and output errors as a message and their exit code."""
    try:
        yield
    except (ManifestError, LockedError, OutputError) as exc:
        code = exit_code_for(exc)
        assert code is not None
        fail(exc, code, "output error" if isinstance(exc, OutputError) else "error")
