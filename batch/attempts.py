"""One attempt path: any unit of work streamed through Pulse sessions, retried.

A *unit* is one session's worth of work: a whole item, or one piece of a long one. `Sessions`
streams a unit's audio with retries (`pool.with_retries`, by the run's `RetryPolicy`) inside
the pool's adaptive limit and refusal streak and the spend cap, and says what came of it
(a `Tried[Streamed]`). The one thing it raises is `JobAborted`, for an answer no item can
get past (from that answer).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from batch.budget import SpendCap
from batch.errors import (
    HandshakeRejected,
    JobAborted,
    NotStarted,
    OutputError,
    Scope,
    ServiceUnreachable,
    SessionStalled,
    classify,
    error_kind,
    is_refusal,
)
from batch.limits import reply_bounds, session_timeouts
from batch.manifest import RunConfig
from batch.model import Item
from batch.pool import AdaptiveLimit, Pool, RefusalStreak, SessionWatch, Tried, with_retries
from batch.report import RunStats
from batch.retry import Backoff, RetryPolicy
from batch.sent import CountedAudio
from batch.session import AudioSource, Endpoint, SessionResult, run_session
from batch.timemap import TimeMap
from batch.version import __version__

logger = logging.getLogger(__name__)


class Progress(Protocol):
    def item_done(
        self, item: Item, ok: bool, audio_s: float, failure: str | None = None
    ) -> None: ...

    def pieces_done(self, item: Item, done: int, total: int | None) -> None: ...

    def sessions_open(self, count: int) -> None: ...

    def audio_sent(self, item: Item, seconds: float) -> None:
        """``seconds`` more of ``item``'s audio sent (fewer: a failed attempt's taken back);
        a few times a second per session, possibly from a reading thread."""


class StreamedAudio(AudioSource, Protocol):
    """What a session streams, and afterwards how much audio it holds."""

    @property
    def duration_s(self) -> float: ...


@dataclass(frozen=True)
class Unit:
    """One session's worth of work. ``piece`` None: the whole item; a piece streams what
    its ``timemap`` says from the item's cache."""

    item: Item
    piece: int | None = None
    timemap: TimeMap | None = None


@dataclass(frozen=True)
class Streamed:
    """A session that worked: what it returned, and the seconds of audio it streamed."""

    session: SessionResult
    audio_s: float


class Sessions:
    """The run's sessions: where they go, how many at once, when to stop trying."""

    def __init__(
        self,
        run: RunConfig,
        stats: RunStats,
        endpoint: Endpoint,
        api_key: str | None,
        progress: Progress,
        pool: Pool[Unit],
        cap: SpendCap,
    ) -> None:
        self.run = run
        self.stats = stats
        self.endpoint = endpoint
        self.api_key = api_key
        self.progress = progress
        self.pool = pool
        self.cap = cap
        # A shard opens only its share of run.concurrency (stats.concurrency).
        self.limit = AdaptiveLimit(stats.concurrency)
        self.refusals = RefusalStreak(run.max_refusals_in_a_row, endpoint.host)
        # One policy for every retry of the run: sessions, and reads of a failing store.
        self.retry = RetryPolicy(
            run.max_attempts, Backoff(run.backoff_initial_s, run.backoff_max_s)
        )
        self.rng = random.Random()
        shard = f" shard/{stats.shard}" if stats.shard else ""
        self.user_agent = f"pulse-batch/{__version__}{shard}"

    async def stream(
        self,
        unit: Unit,
        make_audio: Callable[[], StreamedAudio],
        duration_s: float | None,
        recorded_s: float | None = None,
        used: int = 0,
    ) -> Tried[Streamed]:
        """Stream the audio ``make_audio`` makes (afresh for each attempt) until a session
        works or retrying cannot help. ``duration_s``: the audio each attempt streams (None:
        not known before); ``recorded_s``: the recording's audio it stands for (what
        streaming it all would bill; by default the same). ``used``: attempts the unit
        already had (in a reused session that failed); it still gets one of its own.

        Raises `JobAborted` (from the answer) when no item could get past it."""
        label = session_label(unit.item, unit.piece)
        timeline = self.stats.timeline
        key = timeline.new_unit()

        def counted(attempt: int) -> None:
            self.count_attempt(attempt + used)
            if attempt + used > 1:
                timeline.retried(key)

        budget = max(1, self.retry.max_attempts - used)
        try:
            tried = await with_retries(
                lambda watch: self._attempt(
                    unit.item, make_audio(), duration_s, recorded_s, label, key, watch
                ),
                limit=self.limit,
                policy=replace(self.retry, max_attempts=budget),
                rng=self.rng,
                streak=self.refusals,
                on_attempt=counted,
                log_fields=log_fields(unit.item),
                label=label,
                on_retry=self.count_retry,
            )
        finally:
            timeline.done(key)
        tried = replace(tried, attempts=tried.attempts + used)
        if isinstance(tried.error, OutputError):  # the audio cache: the run stops, exit 5
            raise tried.error
        if tried.error is not None and classify(tried.error).scope is Scope.JOB:
            raise JobAborted(str(tried.error)) from tried.error
        return tried

    def unreachable(self) -> ServiceUnreachable | None:
        """`ServiceUnreachable` when no session of the run opened and its last failed
        attempt could not connect: a job too small to reach ``max_refusals_in_a_row`` ends
        as a big one does (exit 6, naming the host), not as items that lost a connection."""
        return self.refusals.unreachable()

    def count_retry(self, error: BaseException) -> None:
        """A retry follows ``error``: the report counts retries by its kind."""
        kinds = self.stats.retries_by_kind
        kind = error_kind(error)
        kinds[kind] = kinds.get(kind, 0) + 1

    def count_attempt(self, attempt: int) -> None:
        """An attempt (a session) starts: the run counts it, and a retry as one."""
        self.stats.attempts += 1
        if attempt > 1:
            self.stats.retries += 1

    async def _attempt(
        self,
        item: Item,
        audio: StreamedAudio,
        duration_s: float | None,
        recorded_s: float | None,
        label: str,
        unit_key: int,
        watch: SessionWatch,
    ) -> Streamed:
        if self.pool.stopping:  # a signal or the cap came while this waited for a slot
            raise NotStarted("the run is stopping: the session was not started")
        reserved_s = duration_s or 0.0
        self.cap.admit(reserved_s)
        sent = CountedAudio(audio, lambda seconds: self.progress.audio_sent(item, seconds))
        self.progress.sessions_open(self.limit.open_now)
        span = self.stats.timeline.begin(unit_key, label)

        def opened() -> None:
            watch.opened()
            span.open()

        try:
            result = await run_session(
                self.endpoint,
                item.options,
                sent,
                api_key=self.api_key,
                pace=self.run.pace,
                timeouts=session_timeouts(self.run, duration_s),
                user_agent=self.user_agent,
                on_open=opened,
                label=label,
                bounds=reply_bounds(self.run),
            )
        except Exception as error:
            sent.settle(kept=False)
            span.end(outcome(error), error_kind(error))
            self.count_failure(error)
            raise
        except BaseException:  # cancelled: the slot is given back all the same
            sent.settle(kept=False)
            span.end("failed", "cancelled")
            raise
        finally:
            self.cap.settle(reserved_s, audio.duration_s)
            self.stats.billed_audio_s += audio.duration_s
            unskipped = recorded_s if recorded_s is not None else audio.duration_s
            self.stats.billed_unskipped_s += unskipped
        sent.settle(kept=True)
        self.counted_session(result)
        recorded = recorded_s if recorded_s is not None else audio.duration_s
        skipped = 1 - audio.duration_s / recorded if recorded > 0 else 0.0
        span.end("ok", skipped_share=skipped)  # after settle: the slot was held until here
        return Streamed(result, audio.duration_s)

    def count_failure(self, error: Exception) -> None:
        """A failed attempt, in the run's stats (the pool's streak judges it)."""
        if isinstance(error, HandshakeRejected):
            self.stats.refused_handshakes += 1

    def counted_session(self, result: SessionResult) -> None:
        """A session that worked: its timings into the run's stats."""
        self.stats.busy_session_s += result.busy_s
        self.stats.connect_s.append(result.connect_s)
        if result.first_final_s is not None:
            self.stats.first_final_s.append(result.first_final_s)
        self.stats.end_to_last_s.append(result.end_to_last_s)


def outcome(error: BaseException) -> str:
    """How a failed attempt is drawn on the timeline."""
    if isinstance(error, SessionStalled):
        return "stalled"
    if isinstance(error, HandshakeRejected) or is_refusal(error):
        return "refused"
    return "failed"


def log_fields(item: Item) -> dict[str, object]:
    """What a log line about ``item`` carries as structured fields (`batch.logjson`)."""
    fields: dict[str, object] = {"item_id": item.item_id, "source": item.source}
    if item.channel is not None:
        fields["channel"] = item.channel_name or item.channel
    return fields


def session_label(item: Item, piece: int | None = None) -> str:
    """What a session streams, for its log lines: the source, then its channel (and the
    channel's name) and piece when it has them."""
    parts = [item.source]
    if item.channel is not None:
        named = f" ({item.channel_name})" if item.channel_name else ""
        parts.append(f"channel {item.channel}{named}")
    if piece is not None:
        parts.append(f"piece {piece}")
    return ", ".join(parts)
