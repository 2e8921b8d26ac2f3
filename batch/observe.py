"""The CLI's side of watching a run: the log format (``--log-format``), a console that logs
instead of printing in JSON mode, and an observer that gives each log record the run's
fields and feeds the metrics (`batch.metrics`).

Only the CLI uses this module: the library logs and reports; this decides how that is seen.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

from batch import storage
from batch.credentials import RedactingFilter, Scrubber
from batch.job import Observer
from batch.logjson import JsonFormatter, RunContext
from batch.metrics import MetricsPublisher
from batch.model import Item
from batch.report import RunStats, build_report, failing_items

logger = logging.getLogger("batch")

FORMATS = ("text", "json")
ENV = "PULSE_BATCH_LOG_FORMAT"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The run's job, run_id and shard, added to every record once the run has them.
CONTEXT = RunContext()
_chosen = {"format": "text"}


def json_mode() -> bool:
    return _chosen["format"] == "json"


def formatter() -> logging.Formatter:
    """The log handler's formatter for the chosen format."""
    return JsonFormatter() if json_mode() else logging.Formatter(TEXT_FORMAT)


def use_log_format(value: str, console: Console | JsonConsole) -> Console | JsonConsole:
    """Choose the log format for this process; returns the console the CLI should print
    messages to (in JSON mode one that logs them). In JSON mode a JSON handler goes on the
    root logger at once, so a command that sets up no logging of its own (and Python's
    warnings, captured) still writes only JSON lines to stderr."""
    _chosen["format"] = value
    CONTEXT.fields.clear()
    logging.captureWarnings(value == "json")
    if value != "json":
        return console if isinstance(console, Console) else Console(stderr=True, soft_wrap=True)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(CONTEXT)
    handler.addFilter(RedactingFilter(Scrubber(*storage.credentials_in_env(os.environ))))
    logging.getLogger().handlers[:] = [handler]
    return JsonConsole()


class JsonConsole:
    """Stands in for the CLI's stderr console in JSON mode: each message it is given to
    print becomes a log record (markup removed; ``error:`` lines are errors)."""

    is_terminal = False

    def print(self, *objects: Any, **_: Any) -> None:
        text = " ".join(Text.from_markup(str(o)).plain for o in objects)
        head = text.split(":", 1)[0].strip()
        if head in ("error", "output error", "job stopped"):
            event = {"error": "cli_error", "output error": "output_error"}.get(head, "run_stopped")
            logger.error("%s", text, extra={"event": event})
        elif head == "stopped":
            logger.warning("%s", text, extra={"event": "run_stopped"})
        else:
            event = "cli_warning" if head in ("warning", "note") else "cli_message"
            logger.warning("%s", text, extra={"event": event})


class ObservedRun(Observer):
    """Passes every callback to ``inner`` (the progress display); when the run starts, gives
    the log records its fields and starts the metrics (refreshed from the live stats)."""

    def __init__(self, inner: Observer, metrics: MetricsPublisher) -> None:
        self.inner = inner
        self.metrics = metrics
        self.stats: RunStats | None = None

    def started(self, stats: RunStats) -> None:
        self.stats = stats
        CONTEXT.set(job=stats.job, run_id=stats.run_id, shard=stats.shard)
        self.inner.started(stats)
        self.metrics.start(lambda: build_report(stats))

    def planned(self, items: int, audio_s: float, skipped: int) -> None:
        self.inner.planned(items, audio_s, skipped)

    def item_done(self, item: Item, ok: bool, audio_s: float, failure: str | None = None) -> None:
        self.inner.item_done(item, ok, audio_s, failure)

    def pieces_done(self, item: Item, done: int, total: int | None) -> None:
        self.inner.pieces_done(item, done, total)

    def sessions_open(self, count: int) -> None:
        self.inner.sessions_open(count)

    def signalled(self, name: str) -> None:
        self.inner.signalled(name)

    def finish(self, report: dict[str, Any], exit_code: int) -> None:
        """The run is over: log ``run_done`` and publish the final metrics."""
        items = report["items"]
        logger.info(
            "run %s %s: %d ok, %d failed, %d failing; exit code %d",
            report["run_id"],
            report["status"],
            items["ok"],
            items["failed"],
            failing_items(report),
            exit_code,
            extra={"event": "run_done", "status": str(report["status"]),
                   "audio_s": report["audio_s"], "exit_code": exit_code},
        )  # fmt: skip
        if self.stats is not None:
            self.metrics.finish(report, exit_code)


def item_fields(item: Item, ok: bool, audio_s: float, failure: str | None) -> dict[str, Any]:
    """The structured fields of an ``item_done`` record."""
    fields: dict[str, Any] = {
        "event": "item_done",
        "item_id": item.item_id,
        "source": item.source,
        "status": "ok" if ok else "failed",
        "audio_s": round(audio_s, 3),
    }
    if item.channel is not None:
        fields["channel"] = item.channel_name or item.channel
    if failure:
        fields["error_kind"] = failure.split(":", 1)[0]
    return fields
