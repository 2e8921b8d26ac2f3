"""The run's sessions in time: when each attempt held a slot, and what came of it.

`Timeline` is told by `attempts.Sessions` when an attempt starts (`begin`, which gives it a
lane: the lowest slot free) and how it ended (`Span.end`); `retried` marks an attempt that
was followed by another of the same unit. `Timeline.as_report` is the small, bounded part of
the run report that the HTML report draws (`batch.html_report`): every span while there are
few, a heat strip of time buckets beyond `DETAIL_LIMIT`, and the open sessions over time.

Times are seconds since the run started (a monotonic clock), rounded to milliseconds.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OUTCOMES = ("ok", "retried", "failed", "stalled", "refused")
DETAIL_LIMIT = 400  # spans drawn one by one; beyond, a heat strip
HEAT_BUCKETS = 120
OPEN_POINTS = 400  # at most this many points of the open-sessions line
MARKS_LIMIT = 200  # refusals and backoffs drawn; beyond, only counted
_MAX_KEPT = 50_000  # spans kept in memory at most (then only counted)


@dataclass
class Span:
    """One attempt of one unit: a session slot from ``start_s`` until ``end_s``."""

    unit: int
    lane: int
    attempt: int
    label: str
    start_s: float
    end_s: float | None = None
    outcome: str = "running"
    error_kind: str | None = None
    opened: bool = False  # the handshake passed
    skipped_share: float = 0.0  # of the recording, left out as silence
    _timeline: Timeline | None = field(default=None, repr=False, compare=False)

    def open(self) -> None:
        """The service accepted the session (the handshake passed)."""
        self.opened = True
        if self._timeline is not None:
            self._timeline.opened += 1

    def end(self, outcome: str, error_kind: str | None = None, skipped_share: float = 0.0) -> None:
        """The attempt is over: ``outcome`` is ok, failed, stalled or refused."""
        assert outcome in OUTCOMES, outcome
        if self._timeline is not None:
            self._timeline._ended(self, outcome, error_kind, skipped_share)


class Timeline:
    """Spans of the run's attempts, in order of start; thread-safe for a metrics reader."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._t0 = clock()
        self._lock = threading.Lock()
        self._lanes: set[int] = set()  # taken now
        self._last: dict[int, Span] = {}  # each unit's latest span
        self._next_unit = 0
        self.spans: list[Span] = []
        self.dropped = 0  # spans past `_MAX_KEPT`: counted only
        self.opened = 0
        self.outcomes: Counter[str] = Counter()
        self.retries_by_kind: Counter[str] = Counter()

    def now_s(self) -> float:
        return round(self._clock() - self._t0, 3)

    def new_unit(self) -> int:
        """A key for one unit's attempts (see `retried`)."""
        with self._lock:
            self._next_unit += 1
            return self._next_unit

    @property
    def open_now(self) -> int:
        """Attempts holding a slot now."""
        return len(self._lanes)

    def begin(self, unit: int, label: str) -> Span:
        """An attempt of ``unit`` starts: it takes the lowest free lane."""
        with self._lock:
            before = self._last.get(unit)
            attempt = before.attempt + 1 if before is not None else 1
            lane = next(i for i in range(len(self._lanes) + 1) if i not in self._lanes)
            self._lanes.add(lane)
            span = Span(unit, lane, attempt, label[:120], self.now_s(), _timeline=self)
            self._last[unit] = span
            if len(self.spans) < _MAX_KEPT:
                self.spans.append(span)
            else:
                self.dropped += 1
            return span

    def _ended(self, span: Span, outcome: str, kind: str | None, skipped: float) -> None:
        with self._lock:
            span.end_s = max(span.start_s, self.now_s())
            span.outcome, span.error_kind = outcome, kind
            span.skipped_share = round(min(1.0, max(0.0, skipped)), 3)
            self._lanes.discard(span.lane)
            self.outcomes[outcome] += 1

    def retried(self, unit: int) -> None:
        """Another attempt of ``unit`` starts: its last failed span was retried."""
        with self._lock:
            span = self._last.get(unit)
            if span is None or span.outcome in ("ok", "running"):
                return
            self.retries_by_kind[span.error_kind or "unknown"] += 1
            if span.outcome == "failed":
                self.outcomes["failed"] -= 1
                self.outcomes["retried"] += 1
                span.outcome = "retried"

    def done(self, unit: int) -> None:
        """The unit will not be tried again: forget its key."""
        with self._lock:
            self._last.pop(unit, None)

    def counts(self) -> dict[str, Any]:
        """Sessions open now and opened, attempts by outcome, retries by error kind: cheap,
        for metrics refreshed while the run goes."""
        with self._lock:
            return {
                "open_now": len(self._lanes),
                "opened": self.opened,
                "outcomes": {k: self.outcomes[k] for k in OUTCOMES},
                "retries_by_kind": dict(sorted(self.retries_by_kind.items())),
                "dropped": self.dropped,
            }

    def as_report(self) -> dict[str, Any]:
        """The timeline as plain data for the report: `counts` and `timeline_report`."""
        with self._lock:
            spans = [_row(s) for s in self.spans]
        return {**self.counts(), **timeline_report(spans, self.now_s())}


def _row(span: Span) -> dict[str, Any]:
    return {
        "lane": span.lane,
        "start_s": span.start_s,
        "end_s": span.end_s,
        "outcome": span.outcome,
        "attempt": span.attempt,
        "unit": span.unit,
        "label": span.label,
        "error_kind": span.error_kind,
        "skipped_share": span.skipped_share,
    }


def timeline_report(spans: list[dict[str, Any]], now_s: float) -> dict[str, Any]:
    """What the HTML report draws, bounded whatever the run's size. Pure.

    ``spans`` (dicts as `_row` makes) in start order; a span still running ends at
    ``now_s``. Returns ``lanes``, ``duration_s``, ``open`` ([t, count] steps, at most
    `OPEN_POINTS`), ``refusals`` and ``backoffs`` (marks, at most `MARKS_LIMIT` each), and
    ``spans`` (at most `DETAIL_LIMIT`) or, beyond that, ``heat`` (`HEAT_BUCKETS` buckets of
    outcome counts and busy session seconds).
    """
    closed = [{**s, "end_s": now_s if s["end_s"] is None else s["end_s"]} for s in spans]
    duration = max([now_s, *(s["end_s"] for s in closed)], default=0.0)
    lanes = 1 + max((s["lane"] for s in closed), default=-1)
    refusals = [[s["start_s"], s["lane"]] for s in closed if s["outcome"] == "refused"]
    report: dict[str, Any] = {
        "duration_s": round(duration, 3),
        "lanes": lanes,
        "open": _open_steps(closed, duration),
        "refusals": refusals[:MARKS_LIMIT],
        "backoffs": _backoffs(closed)[:MARKS_LIMIT],
        "spans": None,
        "heat": None,
    }
    drawn = [s for s in closed if s["outcome"] != "refused"]
    if len(drawn) <= DETAIL_LIMIT:
        report["spans"] = [_compact(s) for s in drawn]
    else:
        report["heat"] = _heat(drawn, duration)
    return report


def _compact(span: dict[str, Any]) -> dict[str, Any]:
    """A span as the report keeps it: no unit key, no empty fields."""
    empty = {"unit": True, "error_kind": span["error_kind"] is None}
    empty["skipped_share"] = not span["skipped_share"]
    return {k: v for k, v in span.items() if not empty.get(k, False)}


def _open_steps(spans: list[dict[str, Any]], duration: float) -> list[list[float]]:
    """Sessions holding a slot over time, as [t, count] steps; merged into at most
    `OPEN_POINTS` buckets (each bucket's highest count) for a long run."""
    changes = sorted([(s["start_s"], 1) for s in spans] + [(s["end_s"], -1) for s in spans])
    steps: list[list[float]] = [[0.0, 0]]
    count = 0
    for t, delta in changes:
        count += delta
        if steps[-1][0] == t:
            steps[-1][1] = count
        else:
            steps.append([t, count])
    if len(steps) <= OPEN_POINTS or duration <= 0:
        return steps
    width = duration / OPEN_POINTS
    merged: dict[int, float] = {}
    for t, c in steps:
        bucket = min(OPEN_POINTS - 1, int(t / width))
        merged[bucket] = max(merged.get(bucket, 0), c)
    return [[round(b * width, 3), c] for b, c in sorted(merged.items())]


def _backoffs(spans: list[dict[str, Any]]) -> list[list[float]]:
    """[from_s, to_s, lane]: the wait between a retried attempt's end and the next
    attempt of the same unit (backoff, then waiting for a slot)."""
    last: dict[int, dict[str, Any]] = {}
    waits = []
    for span in spans:
        before = last.get(span["unit"])
        if before is not None and before["outcome"] in ("retried", "refused", "stalled"):
            waits.append([before["end_s"], span["start_s"], before["lane"]])
        last[span["unit"]] = span
    return waits


def _heat(spans: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Spans by time bucket: how many ended in each bucket by outcome, and the session
    seconds spent in it (how busy the pool was)."""
    width = max(duration, 1e-3) / HEAT_BUCKETS
    ended = {o: [0] * HEAT_BUCKETS for o in OUTCOMES if o != "refused"}
    busy = [0.0] * HEAT_BUCKETS
    for span in spans:
        start, end = span["start_s"], span["end_s"]
        ended.setdefault(span["outcome"], [0] * HEAT_BUCKETS)
        ended[span["outcome"]][min(HEAT_BUCKETS - 1, int(end / width))] += 1
        first, last = int(start / width), min(HEAT_BUCKETS - 1, int(end / width))
        for bucket in range(first, last + 1):
            lo, hi = max(start, bucket * width), min(end, (bucket + 1) * width)
            busy[bucket] += max(0.0, hi - lo)
    return {
        "bucket_s": round(width, 3),
        "ended": ended,
        "busy_s": [round(b, 2) for b in busy],
        "spans": len(spans),
    }
