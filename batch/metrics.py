"""Prometheus metrics of a run: a text file (node_exporter's textfile collector) and a
Pushgateway, refreshed while the run goes and written once more at its end.

`families` is pure: a run report (`batch.report.build_report`, live or final) in, metric
families out, so the metrics say what the report and the tables say. `MetricsPublisher` is
the I/O: a thread that writes the file atomically and pushes every ``interval_s``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, push_to_gateway
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from batch.timeline import OUTCOMES

logger = logging.getLogger(__name__)

PREFIX = "pulse_batch_"
_ITEM_STATUSES = (
    "ok",
    "failed",
    "not_run",
    "skipped_already_ok",
    "skipped_failed_before",
    "skipped_forgotten",
)


def _gauge(name: str, doc: str, value: float | None) -> Iterator[GaugeMetricFamily]:
    if value is not None:
        yield GaugeMetricFamily(PREFIX + name, doc, value=float(value))


def _timestamp(text: Any) -> float | None:
    return datetime.fromisoformat(text).timestamp() if text else None


def families(report: dict[str, Any], exit_code: int | None = None) -> list[Any]:
    """The run's metrics from its report. Pure. ``exit_code``: the process's, once known."""
    items, audio, bill = report["items"], report["audio"], report["billing"]
    timeline = report.get("timeline") or {}
    outcomes = timeline.get("outcomes") or dict.fromkeys(OUTCOMES, 0)
    info = InfoMetricFamily(PREFIX + "run", "The run this is: its id, shard and status.")
    info.add_metric(
        [],
        {
            "run_id": str(report["run_id"]),
            "shard": str(report.get("shard") or "all"),
            "status": str(report["status"]),
        },
    )
    by_status = GaugeMetricFamily(
        PREFIX + "items", "Items of this run by status.", labels=["status"]
    )
    for status in _ITEM_STATUSES:
        by_status.add_metric([status], float(items.get(status, 0)))  # older reports lack some
    retries = GaugeMetricFamily(
        PREFIX + "retries", "Attempts retried, by the failed attempt's error kind.",
        labels=["error_kind"],
    )  # fmt: skip
    for kind, count in (timeline.get("retries_by_kind") or {}).items():
        retries.add_metric([kind], float(count))
    spend = GaugeMetricFamily(
        PREFIX + "spend_estimated", "Estimated cost of the billed minutes (0 without a price).",
        labels=["currency"],
    )  # fmt: skip
    spend.add_metric([str(bill.get("currency", ""))], float(bill["estimated_cost"]))
    accuracy = report.get("accuracy") or {}
    found: list[Any] = [
        info,
        by_status,
        *_gauge("items_planned", "Items of the job this run planned.", items["total"]),
        *_gauge("audio_planned_seconds", "Audio this run set out to do.", audio.get("planned_s")),
        *_gauge("audio_recorded_seconds", "Audio of the items that ended ok.", audio["recorded_s"]),
        *_gauge("audio_streamed_seconds", "Audio streamed for the ok items.", audio["streamed_s"]),
        *_gauge("audio_skipped_silence_seconds", "Audio left out as silence.", audio["skipped_s"]),
        *_gauge(
            "billed_minutes", "Audio minutes sent, retries included.", bill["billed_audio_minutes"]
        ),
        spend,
        *_gauge("sessions_open", "Sessions holding a slot now.", timeline.get("open_now", 0)),
        *_gauge("sessions_opened", "Sessions the service accepted.", timeline.get("opened", 0)),
        *_gauge(
            "sessions_attempted", "Session attempts, refused ones included.", report["attempts"]
        ),
        retries,
        *_gauge("refusals", "Attempts the service refused.", outcomes.get("refused", 0)),
        *_gauge("stalls", "Sessions that took audio and answered nothing.", outcomes["stalled"]),
        *_gauge("wall_seconds", "Wall time of the run so far.", report["wall_s"]),
        *_gauge(
            "run_start_timestamp_seconds",
            "When the run started (Unix time).",
            _timestamp(report["started_at"]),
        ),
        *_gauge(
            "run_end_timestamp_seconds",
            "When the run ended (Unix time).",
            _timestamp(report.get("finished_at")),
        ),
        *_gauge("exit_code", "The run's exit code.", exit_code),
        *_gauge("wer_ratio", "Word error rate of the scored items (0-1).", accuracy.get("wer")),
        *_gauge("cer_ratio", "Character error rate of the scored items.", accuracy.get("cer")),
        *_gauge("scored_items", "Items scored against a reference.", accuracy.get("items")),
    ]
    return found


class _Snapshot(Collector):
    def __init__(self, found: list[Any]) -> None:
        self.found = found

    def collect(self) -> Iterator[Any]:
        yield from self.found


def registry(report: dict[str, Any], exit_code: int | None = None) -> CollectorRegistry:
    """A registry holding the run's metrics (for `exposition` or a push)."""
    held = CollectorRegistry(auto_describe=False)
    held.register(_Snapshot(families(report, exit_code)))
    return held


def exposition(report: dict[str, Any], exit_code: int | None = None) -> bytes:
    """The run's metrics in Prometheus text exposition format."""
    return generate_latest(registry(report, exit_code))


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so a reader sees the old file or the new one, never a part (a temp
    file in the same folder, renamed over it), as the textfile collector asks."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def push(url: str, report: dict[str, Any], exit_code: int | None = None) -> None:
    """PUT the run's metrics to a Pushgateway, grouped by job and shard (a later push of
    the same job and shard replaces them)."""
    push_to_gateway(
        url,
        job=str(report["job"]),
        grouping_key={"shard": str(report.get("shard") or "all")},
        registry=registry(report, exit_code),
        timeout=10,
    )


class MetricsPublisher:
    """Writes ``file`` and pushes to ``push_url`` every ``interval_s`` from a thread while
    the run goes (`start`), and once more at its end (`finish`). A failure is logged, once
    per kind, and never ends the run."""

    def __init__(
        self, file: Path | None = None, push_url: str | None = None, interval_s: float = 5.0
    ) -> None:
        self.file = file
        self.push_url = push_url
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()

    def __bool__(self) -> bool:
        return self.file is not None or self.push_url is not None

    def start(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Publish ``snapshot()`` (a live report) every ``interval_s`` until `finish`."""
        if not self or self._thread is not None:
            return

        def loop() -> None:  # here, not in the caller's event loop: a push may take seconds
            while True:
                self.publish(snapshot())
                if self._stop.wait(self.interval_s):
                    return

        self._thread = threading.Thread(target=loop, name="pulse-batch-metrics", daemon=True)
        self._thread.start()

    def finish(self, report: dict[str, Any], exit_code: int | None) -> None:
        """Stop refreshing; publish the final report and exit code."""
        self.stop()
        self.publish(report, exit_code)

    def stop(self) -> None:
        """Stop refreshing (the run ended without a report: what was published stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
            self._thread = None

    def publish(self, report: dict[str, Any], exit_code: int | None = None) -> None:
        if self.file is not None:
            try:
                write_atomic(self.file, exposition(report, exit_code))
            except OSError as exc:
                self._warn("file", "cannot write the metrics file %s: %s", self.file, exc)
        if self.push_url is not None:
            try:
                push(self.push_url, report, exit_code)
            except Exception as exc:  # urllib's errors, and any other: metrics never end a run
                self._warn("push", "cannot push metrics to %s: %s", self.push_url, exc)

    def _warn(self, kind: str, message: str, *args: object) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message, *args, extra={"event": f"metrics_{kind}_failed"})
