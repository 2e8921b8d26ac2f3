"""Take each item through sessions to rows: whole, or as pieces of a long recording.

`ItemRunner.process` is the pool's worker: it chooses how a unit goes (see `attempts.Unit`)
and hands it to the part that does that:

- whole items stream here, from their file or, with silence skipped, their speech from the
  cache (no speech: no session at all);
- long items go to `pieces.Pieces`, which cuts them and settles their pieces into one row;
- short whole items with the same options share sessions (`reuse.Reuse`), where the
  endpoint has ``finalize`` and ``run.reuse_sessions`` is on;
- `attempts.Sessions` streams any unit, with retries; `cache.AudioCache` decodes whole
  items into the run's scratch folder; `assemble.Assembler` writes each item's rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

from batch.assemble import Assembler, collect_session
from batch.attempts import Progress, Sessions, Streamed, Unit
from batch.budget import SpendCap
from batch.cache import AudioCache, item_audio, wire_format
from batch.collect import Collected
from batch.credentials import Scrubber
from batch.errors import InputError, NotStarted
from batch.manifest import LoadedManifest
from batch.model import Item
from batch.output import RunWriter
from batch.pieces import Pieces
from batch.pool import AdaptiveLimit, Pool, Tried
from batch.pulse.reuse import reusable
from batch.report import RunStats
from batch.reuse import Reuse
from batch.session import Endpoint
from batch.split import CachedSlice
from batch.timemap import TimeMap

logger = logging.getLogger(__name__)


class ItemRunner:
    """One run's streaming, by parts; `process` is the pool's worker."""

    def __init__(
        self,
        loaded: LoadedManifest,
        stats: RunStats,
        writer: RunWriter,
        endpoint: Endpoint,
        api_key: str | None,
        progress: Progress,
        pool: Pool[Unit],
        cache_dir: Path,
        cap: SpendCap | None = None,
    ) -> None:
        self.run = loaded.manifest.run
        self.stats = stats
        self.wire = wire_format(loaded)
        self.sessions = Sessions(
            self.run, stats, endpoint, api_key, progress, pool, cap or SpendCap()
        )
        self.assembler = Assembler(stats, writer, progress, pool, self.sessions.limit, api_key)
        self.cache = AudioCache(cache_dir, self.run, self.wire, self.sessions.retry)
        self.pieces = Pieces(
            self.run, self.wire, self.cache, self.sessions, self.assembler, progress, pool
        )
        self.generation = endpoint.generation
        self.reuse = Reuse(
            self.sessions,
            self.assembler,
            lambda unit: item_audio(unit.item, self.wire, self.run),
            self._reusable,
        )

    @property
    def limit(self) -> AdaptiveLimit:
        return self.sessions.limit

    @property
    def scrubber(self) -> Scrubber:
        return self.assembler.scrubber

    @property
    def finished(self) -> set[str]:
        """The items with a row in this run."""
        return self.assembler.finished

    async def process(self, unit: Unit) -> None:
        if unit.piece is not None:
            await self.pieces.stream(unit)
            return
        item, started = unit.item, datetime.now(UTC)
        if item.error is not None:
            await self.assembler.finish(item, started, attempts=0, error=item.error)
        elif self.run.skip_silence:
            await self._skip_silence(unit, started)
        elif self._is_long(item):
            await self.pieces.split(item, started)
        elif self._reusable(unit):
            await self.reuse.stream(unit)
        else:
            tried = await self.sessions.stream(
                unit,
                lambda: item_audio(item, self.wire, self.run),
                item.duration_s,
                used=self.reuse.alone.get(item.item_id, 0),
            )
            await self._finish_whole(unit, started, tried)

    def _reusable(self, unit: Unit) -> bool:
        """A whole item streamed from its file, which may share a session (batch.reuse)."""
        item = unit.item
        return (
            self.run.reuse_sessions
            and unit.piece is None
            and item.error is None
            and item.item_id not in self.reuse.alone
            and not self.run.skip_silence
            and not self._is_long(item)
            and reusable(item.options, self.generation)
        )

    def _is_long(self, item: Item) -> bool:
        duration = item.duration_s or 0.0
        return self.run.split_long_files and duration > self.run.split_threshold_s

    async def _skip_silence(self, unit: Unit, started: datetime) -> None:
        """Find the item's speech, then stream only that (with short pauses) from a cache:
        whole, or in pieces when what is left is long. No speech: no session at all."""
        item = unit.item
        path = self.cache.path(item)
        try:
            found = await self.cache.find_speech(item)
        except InputError as error:
            path.unlink(missing_ok=True)
            await self.assembler.finish(item, started, attempts=0, error=error)
            return
        timemap = found.timemap
        duration_s = found.total / self.wire.sample_rate
        logger.info(
            "%s: %.1f s of %.1f s streamed (speech and short pauses)",
            item.source,
            timemap.streamed_s,
            duration_s,
        )
        if self.run.split_long_files and timemap.streamed_s > self.run.split_threshold_s:
            self.pieces.queue_speech(item, started, found)
            return
        if not timemap.spans:  # nothing to hear: nothing to bill
            path.unlink(missing_ok=True)
            self.stats.billed_unskipped_s += duration_s
            await self.assembler.finish(
                item, started, attempts=0, collected=Collected(), duration_s=duration_s
            )
            return
        audio = CachedSlice(path, timemap, self.wire)
        try:
            tried = await self.sessions.stream(unit, lambda: audio, audio.duration_s, duration_s)
        finally:
            path.unlink(missing_ok=True)
        await self._finish_whole(unit, started, tried, duration_s, timemap)

    async def _finish_whole(
        self,
        unit: Unit,
        started: datetime,
        tried: Tried[Streamed],
        recorded_s: float | None = None,
        timemap: TimeMap | None = None,
    ) -> None:
        """A whole item's row from its session (``recorded_s``: the recording's length,
        when the session streamed less of it). A session the spend cap (or a signal) kept
        from starting leaves no row: a rerun does the item."""
        item = unit.item
        if isinstance(tried.error, NotStarted):
            self.assembler.not_started(tried.error)
        elif tried.error is not None:
            await self.assembler.finish(item, started, attempts=tried.attempts, error=tried.error)
        else:
            assert tried.value is not None
            streamed = tried.value
            await self.assembler.finish(
                item,
                started,
                attempts=tried.attempts,
                collected=collect_session(streamed.session, timemap),
                duration_s=recorded_s if recorded_s is not None else streamed.audio_s,
                streamed_s=streamed.audio_s,
                session_id=streamed.session.session_id,
            )


def whole_units(items: Iterable[Item]) -> list[Unit]:
    return [Unit(item) for item in items]
