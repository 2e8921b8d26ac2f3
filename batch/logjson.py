"""Log records as JSON lines (``--log-format json``), for engines that collect logs as JSON.

Each record is one object on one line: ``ts`` (RFC 3339, UTC), ``level``, ``event`` (a stable
snake_case name per kind of record), ``message``, ``logger``, and the `FIELDS` that apply,
from the record's ``extra`` or the run's context (`RunContext`: job, run_id, shard). An
``event`` is what the log call names (``extra={"event": ...}``), else what `EVENTS` says for
its message template, else a name made from the template's words (stable while the template
is). Secrets are scrubbed before formatting by `batch.credentials.RedactingFilter`, which
cleans these fields as well as the message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from batch import storage
from batch.credentials import RedactingFilter, Scrubber

# The fields a record carries where they apply (`extra=` or the run's context).
FIELDS = (
    "job",
    "run_id",
    "shard",
    "item_id",
    "source",
    "channel",
    "attempt",
    "error_kind",
    "status",
    "audio_s",
    "exit_code",
)
# Events of log calls that do not name one, by message template.
EVENTS = {
    "attempt %d failed (%s); retrying": "session_retry",
    "service refused a session for concurrency; pool %d -> %d": "pool_shrunk",
    "%s; starting nothing new": "run_capped",
    "not scored: %s": "item_not_scored",
    "the report could not be written either: %s": "report_not_written",
    "took over a lapsed lock %s": "lock_taken_over",
    "lost the lock %s: another process took it over": "lock_lost",
    "could not renew %s: %s": "lock_not_renewed",
    "recovered committed batch %s": "batch_recovered",
    "discarded uncommitted batch %s": "batch_discarded",
    "%s: %d pieces of about %.0f s": "item_split",
    "%s: %d pieces of about %.0f s streamed": "item_pieces_streamed",
    "%s: %.1f s of %.1f s streamed (speech and short pauses)": "item_speech_found",
}
_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?[a-zA-Z%]")


def event_of(record: logging.LogRecord) -> str:
    """The record's event name: named by the call, known by template, or made from the
    template's first words (``glob: cannot list %s`` is ``glob_cannot_list``)."""
    named = getattr(record, "event", None)
    if isinstance(named, str) and named:
        return named
    template = str(record.msg)
    if record.name == "py.warnings":
        return "python_warning"
    if template in EVENTS:
        return EVENTS[template]
    words = re.findall(r"[a-z]+", _SPEC.sub(" ", template).lower())
    if words:
        return "_".join(words[:4])
    return f"{record.name.rsplit('.', 1)[-1]}_message"


def rfc3339(created: float) -> str:
    """``2026-12-04T15:07:03.123Z``"""
    moment = datetime.fromtimestamp(created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": rfc3339(record.created),
            "level": record.levelname.lower(),
            "event": event_of(record),
            "message": record.getMessage(),
            "logger": record.name,
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


class RunContext(logging.Filter):
    """Adds the run's job, run_id and shard to every record that does not carry them (a
    handler filter, before the redacting one, so they are scrubbed too)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, Any] = {}

    def set(self, **fields: Any) -> None:
        self.fields.update({k: v for k, v in fields.items() if v is not None})

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


# --- the choice: ``--log-format`` on every command, or PULSE_BATCH_LOG_FORMAT -----------
FORMATS = ("text", "json")
ENV = "PULSE_BATCH_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The run's job, run_id and shard, added to every record once the run has them.
CONTEXT = RunContext()
_chosen = {"format": "text"}


def json_mode() -> bool:
    return _chosen["format"] == "json"


def formatter() -> logging.Formatter:
    """A log handler's formatter for the chosen format."""
    return JsonFormatter() if json_mode() else logging.Formatter(TEXT_FORMAT)


def use_log_format(value: str) -> str:
    """Choose the log format for this process (an eager option's callback). In JSON mode a
    JSON handler goes on the root logger at once, so a command that sets up no logging of
    its own, and Python's warnings (captured), still write only JSON lines to stderr."""
    value = value.lower()  # PULSE_BATCH_LOG_FORMAT=JSON is meant as json
    if value not in FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(FORMATS)}")
    _chosen["format"] = value
    CONTEXT.fields.clear()
    logging.captureWarnings(value == "json")
    if value == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(CONTEXT)
        handler.addFilter(RedactingFilter(Scrubber(*storage.credentials_in_env(os.environ))))
        logging.getLogger().handlers[:] = [handler]
        logging.getLogger("batch").setLevel(logging.INFO)  # what text mode prints, as records
    return value


def requested(args: Sequence[str]) -> bool:
    """Whether ``args`` (``--log-format json``) or the environment ask for JSON logs. Read
    before click parses them: an unknown option or command stops the parse before the
    option's callback runs, and its error must be a JSON line too."""
    for i, arg in enumerate(args):
        if arg.startswith("--log-format="):
            return arg.partition("=")[2].lower() == "json"
        if arg == "--log-format" and i + 1 < len(args):
            return args[i + 1].lower() == "json"
    return os.environ.get(ENV, "").lower() == "json"


LogFormat = Annotated[
    str,
    typer.Option(
        "--log-format",
        envvar=ENV,
        is_eager=True,  # before anything else can log or print
        callback=use_log_format,
        help="Log lines on stderr: text, or json (one JSON object a line, nothing else).",
    ),
]
