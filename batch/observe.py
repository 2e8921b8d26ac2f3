"""The CLI's side of watching a run: a console that logs instead of printing in JSON mode
(``--log-format json``, `batch.logjson`), and an observer that gives each log record the
run's fields and feeds the metrics (`batch.metrics`).

Only the CLI uses this module: the library logs and reports; this decides how that is seen.
"""

from __future__ import annotations

import logging
from typing import Any

from rich.console import Console
from rich.text import Text

from batch.job import Observer
from batch.logjson import CONTEXT, json_mode
from batch.metrics import MetricsPublisher
from batch.model import Item
from batch.report import RunStats, build_report, failing_items

logger = logging.getLogger("batch")


class StderrConsole(Console):
    """The CLI's stderr console: in JSON mode (`batch.logjson.json_mode`) each message it is
    given to print becomes a log record instead (markup removed; ``error:`` lines are
    errors), and it is no terminal (so no progress bar)."""

    @property
    def is_terminal(self) -> bool:
        return not json_mode() and super().is_terminal

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not json_mode():
            super().print(*objects, **kwargs)
            return
        text = " ".join(Text.from_markup(str(o)).plain for o in objects)
        head = text.split(":", 1)[0].strip()
        if head in ("error", "output error", "job stopped"):
            event = {"error": "cli_error", "output error": "output_error"}.get(head, "run_stopped")
            logger.error("%s", text, extra={"event": event})
        elif head == "stopped":
            logger.warning("%s", text, extra={"event": "run_stopped"})
        elif head in ("warning", "note"):
            logger.warning("%s", text, extra={"event": "cli_warning"})
        else:
            logger.info("%s", text, extra={"event": "cli_message"})


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
        self.metrics.start(lambda: build_report(stats, spans=False))

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

    def close(self) -> None:
        """However the run ended: no more refreshing of the metrics."""
        self.metrics.stop()

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


def past_run(latest: dict[str, Any], reports: list[dict[str, Any]], run_id: str) -> dict[str, Any]:
    """Run ``run_id``'s report, with the job so far and its runs from ``latest`` (a
    `OutputReader.full_report`). Raises FileNotFoundError naming the runs there are."""
    for found in reports:
        if found.get("run_id") == run_id:
            return {**found, "job_so_far": latest["job_so_far"], "runs": latest["runs"]}
    known = ", ".join(str(r.get("run_id")) for r in reports[-5:])
    raise FileNotFoundError(f"no run {run_id!r} of job {latest['job']!r} (latest runs: {known})")
