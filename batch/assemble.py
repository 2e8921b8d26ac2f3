"""One assembler: what came of an item (its collected rows, or why it failed) becomes its
rows in the run's writer, counted in the run's stats and shown as progress."""

from __future__ import annotations

import functools
import logging
from datetime import UTC, datetime
from typing import Any, Final

import anyio
import anyio.to_thread

from batch import score
from batch.attempts import Progress, Unit
from batch.collect import Collected, Outcome, RunInfo, collect_finals, item_rows
from batch.credentials import Scrubber
from batch.errors import InputError, NotStarted, error_kind
from batch.model import Item, ItemStatus, RunStatus
from batch.output import RunWriter
from batch.pool import AdaptiveLimit, Pool
from batch.report import Failure, RunStats
from batch.session import SessionResult
from batch.timemap import TimeMap

logger = logging.getLogger(__name__)

# Scoring reads the reference (a slow store can hold a read for seconds) and runs jiwer: in
# worker threads, so the event loop keeps pacing every open session meanwhile; a few at a
# time, so a burst of finished items cannot take the threads that sessions read audio with.
SCORING_THREADS: Final = 4


def collect_session(result: SessionResult, timemap: TimeMap | None = None) -> Collected:
    """A whole session's rows, with what it saw beside its finals."""
    return collect_finals(
        result.finals,
        timemap=timemap,
        languages=result.languages,
        full_transcript=result.full_transcript,
    )


class Assembler:
    """Writes each finished item's rows; ``finished`` holds the items given a row."""

    def __init__(
        self,
        stats: RunStats,
        writer: RunWriter,
        progress: Progress,
        pool: Pool[Unit],
        limit: AdaptiveLimit,
        api_key: str | None,
    ) -> None:
        self.stats = stats
        self.writer = writer
        self.progress = progress
        self.pool = pool
        self.limit = limit
        # Belt and braces: session errors are scrubbed at the boundary already.
        self.scrubber = Scrubber(api_key)
        self.run_info = RunInfo(stats.job, stats.run_id, stats.started_at.strftime("%Y-%m-%d"))
        self.finished: set[str] = set()
        self.scoring = anyio.CapacityLimiter(SCORING_THREADS)

    def not_started(self, error: NotStarted) -> None:
        """The spend cap (or a signal) stops the run: nothing new starts; the item gets no
        row, so a rerun does it."""
        if self.stats.status == RunStatus.RUNNING:
            logger.warning("%s; starting nothing new", error)
            self.stats.status = RunStatus.CAPPED
            self.stats.abort_reason = str(error)
        self.pool.stop_starting()

    async def finish(
        self,
        item: Item,
        started: datetime,
        *,
        attempts: int,
        collected: Collected | None = None,
        duration_s: float = 0.0,
        streamed_s: float = 0.0,
        session_id: str | None = None,
        pieces: int = 1,
        error: BaseException | None = None,
        message: str | None = None,
    ) -> None:
        """Write the item's row: ok with ``collected``, else failed with ``error`` (said as
        ``message`` when given)."""
        kind = text = None
        if collected is None:
            kind = error_kind(error) if error is not None else "internal"
            text = message or (str(error) if error is not None else "unknown failure")
            if not isinstance(error, InputError):
                text = f"{item.source}: {text}"
            text = self.scrubber.scrub(text)
        outcome = Outcome(
            started_at=started,
            finished_at=datetime.now(UTC),
            attempts=attempts,
            pieces=pieces,
            collected=collected,
            duration_s=duration_s,
            streamed_s=streamed_s,
            session_id=session_id,
            error_kind=kind,
            error=text,
        )
        self.progress.sessions_open(self.limit.open_now)
        self.finished.add(item.item_id)
        # The writer may turn rows that do not fit the schema into a failed row: count
        # what is stored.
        rows = item_rows(item, self.run_info, outcome)
        if collected is not None:
            rows.transcript.update(await self._scores(item, collected))
        stored = (await self.writer.add(rows)).transcript
        said: str | None = None  # "<error_kind>: <message>" for the progress display
        if stored["status"] == ItemStatus.OK:
            self.stats.ok += 1
            self.stats.audio_s += duration_s
            self.stats.streamed_s += streamed_s
        else:
            self.stats.failed += 1
            failure = Failure(item.item_id, item.source, stored["error_kind"], stored["error"])
            self.stats.failures.append(failure)
            said = f"{failure.kind}: {failure.message}"
        self.progress.item_done(item, stored["status"] == ItemStatus.OK, duration_s, said)

    async def _scores(self, item: Item, collected: Collected) -> dict[str, Any]:
        """The item's ``reference``/``wer``/``cer`` columns, worked out off the event loop."""
        columns = functools.partial(
            score.columns, item.reference, collected.transcript, item.options.language
        )
        if item.reference is None:
            return columns()  # nulls: nothing to read
        return await anyio.to_thread.run_sync(columns, limiter=self.scoring)
