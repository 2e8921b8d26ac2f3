"""How `pulse-batch` commands parse and show themselves: usage lines as people write them,
plain help, and usage errors as JSON log lines under ``--log-format json``."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import click
import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup
from typer.exceptions import TyperException

from batch import storage
from batch.credentials import Scrubber, scrubber_for_env
from batch.errors import ExitCode
from batch.logjson import CONTEXT, JsonFormatter, json_mode, requested, use_log_format
from batch.manifest import PulseConfig

logger = logging.getLogger("batch")


@contextmanager
def _usage_errors_logged(args: Sequence[str] = ()) -> Iterator[None]:
    """With --log-format json, a usage error is a JSON log line too (not click's text)."""
    if not json_mode() and requested(args):
        use_log_format("json")  # an unknown option ends the parse before the option's own
    try:
        yield
    except TyperException as exc:  # typer's click errors: usage, bad values
        if not json_mode():
            raise
        logger.error("%s", exc.format_message(), extra={"event": "usage_error"})
        raise typer.Exit(exc.exit_code) from None


class PlainCommand(TyperCommand):
    """Usage lines as people write them (``run [OPTIONS] MANIFEST``), not ``{manifest}``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "arg").upper()
                name += "..." if param.nargs != 1 else ""
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with _usage_errors_logged(args):
            parsed: list[str] = super().parse_args(ctx, args)
        return parsed

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_logged():
            return super().invoke(ctx)

    def format_options(self, ctx: Any, formatter: Any) -> None:
        # Arguments by name and help only: no "<list[Path]>" type tags.
        arguments = [
            ((p.metavar or p.name or "").upper(), p.help or "")
            for p in self.get_params(ctx)
            if isinstance(p, TyperArgument)
        ]
        options = [
            record
            for p in self.get_params(ctx)
            if not isinstance(p, TyperArgument) and (record := p.get_help_record(ctx))
        ]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


class Group(TyperGroup):
    """An unknown command (``PULSE_BATCH_LOG_FORMAT=json``) is a JSON line too."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        with _usage_errors_logged(args):
            parsed: list[str] = super().parse_args(ctx, args)
        return parsed

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        with _usage_errors_logged(args):
            return super().resolve_command(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (
            typer.Exit,
            typer.Abort,
            TyperException,
            click.exceptions.Exit,
            click.ClickException,
            click.Abort,
        ):
            raise  # how commands end on purpose
        except Exception as exc:
            _crashed(exc)


def _crashed(exc: Exception) -> NoReturn:
    """An error no command expected: a bug. Its traceback goes to stderr, scrubbed of the
    default API key and the storage credentials (one JSON record, ``event: crash``, with
    ``--log-format json``), and the exit code is its own: a crash must not read as "some
    items failed" (1). Written here, not through logging: no handler may be set up yet."""
    scrubber = Scrubber(
        *scrubber_for_env(PulseConfig.model_fields["api_key_env"].default).secrets,
        *storage.credentials_in_env(os.environ),
    )
    message = scrubber.scrub(
        f"internal error (a bug; please report it with this traceback): {type(exc).__name__}: {exc}"
    )
    trace = scrubber.scrub("".join(traceback.format_exception(exc)).rstrip())
    if json_mode():
        record = logger.makeRecord(logger.name, logging.CRITICAL, __file__, 0, message, (), None)
        record.event = "crash"
        record.exc_text = trace
        CONTEXT.filter(record)  # the run's job, run_id and shard, when it had them
        sys.stderr.write(JsonFormatter().format(record) + "\n")
    else:
        sys.stderr.write(f"{message}\n{trace}\n")
    raise SystemExit(ExitCode.INTERNAL) from None
