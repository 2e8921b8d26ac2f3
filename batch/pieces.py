"""Pieces of a long item: cut at quiet points (or, with silence skipped, what is left of it
cut at its shortened pauses), queued first, each streamed on its own session from the
item's cache, and settled into the item's one row once none is left streaming.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from batch.assemble import Assembler
from batch.attempts import Progress, Sessions, Unit
from batch.cache import AudioCache
from batch.decode import WireFormat
from batch.errors import InputError, NotStarted
from batch.manifest import RunConfig
from batch.model import Item
from batch.pool import Pool
from batch.speech import FoundSpeech
from batch.split import (
    CachedSlice,
    PieceResult,
    choose_cuts,
    frame_samples,
    piece_count,
    stitch,
    stream_energy,
)
from batch.timemap import TimeMap

logger = logging.getLogger(__name__)


@dataclass
class PieceSet:
    """The pieces of one long item while they stream."""

    started: datetime
    cache_path: Path
    total: int | None = None  # known once the whole file is decoded and cut
    total_samples: int = 0
    streamed_samples: int = 0
    capped: bool = False  # a piece did not start: the spend cap was reached
    done: dict[int, PieceResult] = field(default_factory=dict)
    session_ids: dict[int, str] = field(default_factory=dict)
    attempts: int = 0
    queued: int = 0
    in_flight: int = 0
    failure: tuple[BaseException, str] | None = None  # the first piece's failure

    @property
    def stopped(self) -> bool:
        """No more of its pieces should stream: one failed, or the cap was reached."""
        return self.failure is not None or self.capped

    @property
    def settled(self) -> bool:
        """Cut, none streaming, and every piece done (or the item stopped)."""
        if self.total is None or self.in_flight:
            return False
        return self.stopped or len(self.done) >= self.total


@dataclass(eq=False)  # a part of the run, not a value
class Pieces:
    """The run's long items, by piece: `split` and `queue_speech` queue them, `stream`
    streams one, and the last one to end writes the item's row."""

    run: RunConfig
    wire: WireFormat
    cache: AudioCache
    sessions: Sessions
    assembler: Assembler
    progress: Progress
    pool: Pool[Unit]
    _items: dict[str, PieceSet] = field(default_factory=dict, init=False)

    def _plan(self, duration_s: float) -> tuple[float, int]:
        """Piece length and count for a recording of ``duration_s``: enough pieces to fill
        the pool's sessions in whole rounds."""
        count = piece_count(duration_s, self.run.piece_target_s, self.sessions.limit.size)
        return duration_s / count, count

    async def split(self, item: Item, started: datetime) -> None:
        """Cache and cut a long item; each piece is queued first as soon as it is settled,
        so streaming starts while the rest of the file is still decoding."""
        state = PieceSet(started, self.cache.path(item))
        self._items[item.item_id] = state
        rate = self.wire.sample_rate
        target_s, count = self._plan(item.duration_s or 0.0)

        def queue_piece(start: int, end: int) -> None:
            index = state.queued
            state.queued += 1
            self.pool.push_front([Unit(item, index, TimeMap.whole(start, end - start, rate))])

        try:
            cached = await self.cache.cut(
                item,
                target_s=target_s,
                pieces=count,
                on_piece=queue_piece,
                # Pieces already streaming came from this pass: a second would cut anew.
                again=lambda: state.queued == 0,
            )
        except InputError as error:
            state.failure = state.failure or (error, str(error))
            state.total = state.queued
        else:
            state.total = len(cached.pieces())
            state.total_samples = cached.total_samples
            logger.info("%s: %d pieces of about %.0f s", item.source, state.total, target_s)
        await self._settle(item, state)

    def queue_speech(self, item: Item, started: datetime, found: FoundSpeech) -> None:
        """Cut what a long recording streams once its silence is skipped (the shortened
        pauses are the quietest places) into pieces that fill the pool."""
        state = PieceSet(started, self.cache.path(item))
        self._items[item.item_id] = state
        timemap = found.timemap
        target_s, count = self._plan(timemap.streamed_s)
        frame = frame_samples(self.wire)
        cuts = choose_cuts(
            stream_energy(found.energy, frame, timemap),
            frame,
            timemap.streamed,
            target_s,
            self.run.split_window_s,
            pieces=count,
        )
        units = [
            Unit(item, index, timemap.window(start, end))
            for index, (start, end) in enumerate(itertools.pairwise(cuts))
        ]
        state.queued = state.total = len(units)
        state.total_samples = found.total
        self.pool.push_front(units)
        logger.info("%s: %d pieces of about %.0f s streamed", item.source, len(units), target_s)

    async def stream(self, unit: Unit) -> None:
        """Stream one piece; the item's row is written when it was the last to end."""
        item, index, timemap = unit.item, unit.piece, unit.timemap
        assert index is not None and timemap is not None
        state = self._items.get(item.item_id)
        if state is None or state.stopped:
            return  # another piece already failed the item: do not bill more audio
        piece = CachedSlice(state.cache_path, timemap, self.wire)
        first, _ = timemap.to_source(0.0)
        last, _ = timemap.to_source(timemap.streamed_s)
        state.in_flight += 1
        try:
            tried = await self.sessions.stream(
                unit, lambda: piece, piece.duration_s, max(0.0, last - first)
            )
        finally:
            state.in_flight -= 1
        state.attempts += tried.attempts
        if isinstance(tried.error, NotStarted):
            state.capped = True
            self.assembler.not_started(tried.error)
        elif tried.error is not None:
            message = f"piece {index} (from {first:.2f} s): {tried.error}"
            state.failure = state.failure or (tried.error, message)
        else:
            assert tried.value is not None
            result = tried.value.session
            state.done[index] = PieceResult(
                index, timemap, result.finals, result.languages, result.full_transcript
            )
            state.session_ids[index] = result.session_id or ""
            state.streamed_samples += timemap.streamed
            self.progress.pieces_done(item, len(state.done), state.total)
        await self._settle(item, state)

    async def _settle(self, item: Item, state: PieceSet) -> None:
        """Write the item's row once it is settled: failed (with every attempt counted) if
        any piece failed, ok once every piece is done; none if the cap stopped it."""
        if not state.settled:
            return
        # Settled: forget the pieces before waiting on the writer, so nothing settles twice.
        state.cache_path.unlink(missing_ok=True)
        del self._items[item.item_id]
        if state.failure is not None:
            error, message = state.failure
            await self.assembler.finish(
                item, state.started, attempts=state.attempts, error=error, message=message
            )
        elif not state.capped:
            rate = self.wire.sample_rate
            await self.assembler.finish(
                item,
                state.started,
                attempts=state.attempts,
                collected=stitch(list(state.done.values())),
                duration_s=state.total_samples / rate,
                streamed_s=state.streamed_samples / rate,
                session_id=",".join(state.session_ids[i] for i in sorted(state.session_ids)),
                pieces=len(state.done),
            )
        # Capped with no failure: no row, the rerun does the whole item again.
