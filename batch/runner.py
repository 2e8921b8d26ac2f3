"""Take each item through sessions to rows: whole, or as pieces of a long recording.

A *unit* is one session's worth of work: a whole item, or one piece of a long one. The pool
runs units; this module streams each with retries, keeps the pieces of an item together,
and hands each finished item's rows (built by `collect.item_rows`) to the run's writer.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar

import anyio

from batch import __version__, score
from batch.budget import SpendCap
from batch.collect import Collected, Outcome, RunInfo, collect_finals, item_rows
from batch.credentials import Scrubber
from batch.decode import DecodedAudio, WireFormat
from batch.errors import (
    HandshakeRejected,
    InputError,
    InputUnavailable,
    JobAborted,
    NotStarted,
    Scope,
    ServiceRefusing,
    ServiceUnreachable,
    classify,
    error_kind,
    is_refusal,
    is_unreachable,
)
from batch.limits import reply_bounds, session_timeouts
from batch.manifest import LoadedManifest
from batch.model import Item, RunStatus
from batch.output import RunWriter
from batch.pool import AdaptiveLimit, Attempts, Backoff, Pool, RefusalStreak, with_retries
from batch.report import Failure, RunStats
from batch.session import AudioSource, Endpoint, SessionResult, run_session
from batch.speech import FoundSpeech, find_speech
from batch.split import (
    CachedSlice,
    PieceResult,
    cache_and_cut,
    choose_cuts,
    frame_samples,
    piece_count,
    stitch,
    stream_energy,
)
from batch.timemap import TimeMap

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Progress(Protocol):
    def item_done(
        self, item: Item, ok: bool, audio_s: float, failure: str | None = None
    ) -> None: ...

    def pieces_done(self, item: Item, done: int, total: int | None) -> None: ...

    def sessions_open(self, count: int) -> None: ...


class _Audio(AudioSource, Protocol):
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


@dataclass
class _Pieces:
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
    def failed(self) -> bool:
        return self.failure is not None


def wire_format(loaded: LoadedManifest) -> WireFormat:
    pulse, run = loaded.manifest.pulse, loaded.manifest.run
    if run.chunk_ms is not None:
        return WireFormat.with_chunk_ms(pulse.encoding, pulse.sample_rate, run.chunk_ms)
    return WireFormat(pulse.encoding, pulse.sample_rate, run.chunk_bytes)


def _collected(result: SessionResult, timemap: TimeMap | None = None) -> Collected:
    """A whole session's rows, with what it saw beside its finals."""
    return collect_finals(
        result.finals,
        timemap=timemap,
        languages=result.languages,
        full_transcript=result.full_transcript,
    )


class ItemRunner:
    """State of one run's streaming; `process` is the pool's worker."""

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
        self.loaded = loaded
        self.run = loaded.manifest.run
        self.stats = stats
        self.writer = writer
        self.endpoint = endpoint
        self.api_key = api_key
        # Belt and braces: session errors are scrubbed at the boundary already.
        self.scrubber = Scrubber(api_key)
        self.progress = progress
        self.pool = pool
        self.cache_dir = cache_dir
        self.wire = wire_format(loaded)
        # A shard opens only its share of run.concurrency (stats.concurrency).
        self.limit = AdaptiveLimit(stats.concurrency)
        self.refusals = RefusalStreak(self.run.max_refusals_in_a_row)
        self.backoff = Backoff(self.run.backoff_initial_s, self.run.backoff_max_s)
        self.rng = random.Random()
        self.run_info = RunInfo(stats.job, stats.run_id, stats.started_at.strftime("%Y-%m-%d"))
        self.fatal: BaseException | None = None
        self.cap = cap or SpendCap()
        self.finished: set[str] = set()  # items with a row in this run
        shard = f" shard/{stats.shard}" if stats.shard else ""
        self.user_agent = f"pulse-batch/{__version__}{shard}"
        self._pieces: dict[str, _Pieces] = {}
        # The detector is CPU work: one item per core at a time, first come first served,
        # so the items next in line get their speech found first.
        self._detectors = anyio.CapacityLimiter(os.cpu_count() or 1)

    # --- the worker ----------------------------------------------------------------

    async def process(self, unit: Unit) -> None:
        if unit.piece is not None:
            await self._process_piece(unit)
        else:
            await self._process_item(unit.item)

    async def _process_item(self, item: Item) -> None:
        started = datetime.now(UTC)
        if item.error is not None:
            await self._finish(item, started, attempts=0, error=item.error)
            return
        if self.run.skip_silence:
            await self._skip_silence(item, started)
            return
        if self._is_long(item):
            await self._split(item, started)
            return
        record = Attempts()
        holder: list[DecodedAudio] = []

        def audio() -> DecodedAudio:
            holder[:] = [self._decoder(item)]
            return holder[0]

        result = await self._stream_whole(item, started, audio, record, item.duration_s)
        if result is None:
            return
        await self._finish(
            item,
            started,
            attempts=record.count,
            collected=_collected(result),
            duration_s=holder[0].duration_s,
            streamed_s=holder[0].duration_s,
            session_id=result.session_id,
        )

    async def _stream_whole(
        self,
        item: Item,
        started: datetime,
        make_audio: Callable[[], _Audio],
        record: Attempts,
        duration_s: float | None,
        recorded_s: float | None = None,
    ) -> SessionResult | None:
        """Stream a whole item (see `_stream`). None when that did not work: its failed
        row is written, or the spend cap stopped the run (no row: a rerun does it)."""
        try:
            return await self._stream(item, make_audio, record, duration_s, recorded_s)
        except JobAborted:
            raise
        except NotStarted as error:
            self._capped(error)
        except Exception as error:
            await self._finish(item, started, attempts=record.count, error=error)
        return None

    def _capped(self, error: NotStarted) -> None:
        """The spend cap (or a signal) stops the run: nothing new starts; the item gets no
        row, so a rerun does it."""
        if self.stats.status == RunStatus.RUNNING:
            logger.warning("%s; starting nothing new", error)
            self.stats.status = RunStatus.CAPPED
            self.stats.abort_reason = str(error)
        self.pool.stop_starting()

    def _decoder(self, item: Item) -> DecodedAudio:
        return DecodedAudio(
            item.open_path or item.source,
            self.wire,
            channel=item.channel,
            stream_index=self.run.stream_index,
            storage_options=item.storage_options,
        )

    def _is_long(self, item: Item) -> bool:
        duration = item.duration_s or 0.0
        return self.run.split_long_files and duration > self.run.split_threshold_s

    def _piece_plan(self, duration_s: float) -> tuple[float, int]:
        """Piece length and count for a recording of ``duration_s``: enough pieces to fill
        the pool's sessions in whole rounds."""
        count = piece_count(duration_s, self.run.piece_target_s, self.limit.size)
        return duration_s / count, count

    async def _split(self, item: Item, started: datetime) -> None:
        """Cache and cut a long item; each piece is queued first as soon as it is settled,
        so streaming starts while the rest of the file is still decoding."""
        path = self.cache_dir / f"{item.item_id}.pcm"
        state = _Pieces(started, path)
        self._pieces[item.item_id] = state
        rate = self.wire.sample_rate
        target_s, count = self._piece_plan(item.duration_s or 0.0)

        def queue_piece(start: int, end: int) -> None:
            index = state.queued
            state.queued += 1
            self.pool.push_front([Unit(item, index, TimeMap.whole(start, end - start, rate))])

        try:
            cached = await self._read_whole(
                lambda: cache_and_cut(
                    self._decoder(item),
                    path,
                    target_s=target_s,
                    window_s=self.run.split_window_s,
                    pieces=count,
                    on_piece=lambda start, end: anyio.from_thread.run_sync(queue_piece, start, end),
                ),
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

    async def _skip_silence(self, item: Item, started: datetime) -> None:
        """Find the item's speech, then stream only that (with short pauses) from a cache:
        whole, or in pieces when what is left is long. No speech: no session at all."""
        path = self.cache_dir / f"{item.item_id}.pcm"
        try:
            found = await self._read_whole(
                lambda: find_speech(
                    self._decoder(item),
                    path,
                    pad_s=self.run.skip_silence_pad_s,
                    gap_s=self.run.skip_silence_gap_s,
                ),
                limiter=self._detectors,
            )
        except InputError as error:
            path.unlink(missing_ok=True)
            await self._finish(item, started, attempts=0, error=error)
            return
        timemap = found.timemap
        rate = self.wire.sample_rate
        duration_s = found.total / rate
        logger.info(
            "%s: %.1f s of %.1f s streamed (speech and short pauses)",
            item.source,
            timemap.streamed_s,
            duration_s,
        )
        if self.run.split_long_files and timemap.streamed_s > self.run.split_threshold_s:
            self._queue_skipped_pieces(item, started, path, found)
            return
        if not timemap.spans:  # nothing to hear: nothing to bill
            path.unlink(missing_ok=True)
            self.stats.billed_unskipped_s += duration_s
            await self._finish(
                item, started, attempts=0, collected=Collected(), duration_s=duration_s
            )
            return
        record = Attempts()
        audio = CachedSlice(path, timemap, self.wire)
        try:
            result = await self._stream_whole(
                item, started, lambda: audio, record, audio.duration_s, duration_s
            )
        finally:
            path.unlink(missing_ok=True)
        if result is None:
            return
        await self._finish(
            item,
            started,
            attempts=record.count,
            collected=_collected(result, timemap),
            duration_s=duration_s,
            streamed_s=timemap.streamed_s,
            session_id=result.session_id,
        )

    async def _read_whole(
        self,
        work: Callable[[], T],
        *,
        limiter: anyio.CapacityLimiter | None = None,
        again: Callable[[], bool] = lambda: True,
    ) -> T:
        """Run ``work`` (a decode of a whole item: its speech search or its cut) in a worker
        thread; while the store behind it fails for now (`InputUnavailable`) and ``again``
        allows, run it again after a backoff, up to ``run.max_attempts`` times in all."""
        for attempt in itertools.count(1):
            try:
                return await anyio.to_thread.run_sync(work, limiter=limiter)
            except InputUnavailable as error:
                if attempt >= self.run.max_attempts or not again():
                    raise
                delay_s = self.backoff.delay_s(attempt, None, self.rng)
                logger.info("%s; reading it again in %.1f s", error, delay_s)
                await anyio.sleep(delay_s)
        raise AssertionError("unreachable: the loop returns or raises")

    def _queue_skipped_pieces(
        self, item: Item, started: datetime, path: Path, found: FoundSpeech
    ) -> None:
        """Cut what a long recording streams once its silence is skipped (the shortened
        pauses are the quietest places) into pieces that fill the pool."""
        state = _Pieces(started, path)
        self._pieces[item.item_id] = state
        timemap = found.timemap
        target_s, count = self._piece_plan(timemap.streamed_s)
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

    async def _process_piece(self, unit: Unit) -> None:
        item, index = unit.item, unit.piece
        assert index is not None
        state = self._pieces.get(item.item_id)
        if state is None or state.failed or state.capped:
            return  # another piece already failed the item: do not bill more audio
        record = Attempts()
        assert unit.timemap is not None
        timemap = unit.timemap
        piece = CachedSlice(state.cache_path, timemap, self.wire)
        first, _ = timemap.to_source(0.0)
        last, _ = timemap.to_source(timemap.streamed_s)
        state.in_flight += 1
        try:
            result = await self._stream(
                item, lambda: piece, record, piece.duration_s, max(0.0, last - first), index
            )
        except JobAborted:
            raise
        except NotStarted as error:
            state.capped = True
            self._capped(error)
        except Exception as error:
            message = f"piece {index} (from {first:.2f} s): {error}"
            state.failure = state.failure or (error, message)
        else:
            state.done[index] = PieceResult(
                index, timemap, result.finals, result.languages, result.full_transcript
            )
            state.session_ids[index] = result.session_id or ""
            state.streamed_samples += timemap.streamed
            self.progress.pieces_done(item, len(state.done), state.total)
        finally:
            state.attempts += record.count
            state.in_flight -= 1
        await self._settle(item, state)

    async def _settle(self, item: Item, state: _Pieces) -> None:
        """Write the item's row once it is cut and no piece of it is streaming: failed (with
        every attempt counted) if any piece failed, ok once every piece is done."""
        if state.total is None or state.in_flight:
            return
        if state.failure is None and not state.capped and len(state.done) < state.total:
            return  # pieces still queued
        # Settled: forget the pieces before waiting on the writer, so nothing settles twice.
        state.cache_path.unlink(missing_ok=True)
        del self._pieces[item.item_id]
        if state.capped and state.failure is None:
            return  # no row: the rerun does the whole item again
        if state.failure is not None:
            error, message = state.failure
            await self._finish(
                item, state.started, attempts=state.attempts, error=error, message=message
            )
            return
        await self._finish(
            item,
            state.started,
            attempts=state.attempts,
            collected=stitch(list(state.done.values())),
            duration_s=state.total_samples / self.wire.sample_rate,
            streamed_s=state.streamed_samples / self.wire.sample_rate,
            session_id=",".join(state.session_ids[i] for i in sorted(state.session_ids)),
            pieces=len(state.done),
        )

    # --- one session, retried ------------------------------------------------------

    async def _stream(
        self,
        item: Item,
        make_audio: Callable[[], _Audio],
        record: Attempts,
        duration_s: float | None,
        recorded_s: float | None = None,
        piece: int | None = None,
    ) -> SessionResult:
        """``duration_s``: the audio each attempt streams (None: not known before);
        ``recorded_s``: the recording's audio it stands for (what streaming it all would
        bill; by default the same); ``piece``: which piece of a long item, for logs."""
        label = session_label(item, piece)
        try:
            return await with_retries(
                lambda: self._attempt(item, make_audio(), duration_s, recorded_s, label),
                limit=self.limit,
                max_attempts=self.run.max_attempts,
                backoff=self.backoff,
                rng=self.rng,
                record=record,
            )
        except Exception as error:
            if classify(error).scope is Scope.JOB:
                self.fatal = error
                raise JobAborted(str(error)) from error
            raise
        finally:
            self.stats.attempts += record.count
            self.stats.retries += max(0, record.count - 1)

    async def _attempt(
        self,
        item: Item,
        audio: _Audio,
        duration_s: float | None,
        recorded_s: float | None,
        label: str,
    ) -> SessionResult:
        if self.pool.stopping:  # a signal or the cap came while this waited for a slot
            raise NotStarted("the run is stopping: the session was not started")
        reserved_s = duration_s or 0.0
        self.cap.admit(reserved_s)
        self.progress.sessions_open(self.limit.open_now)
        watch = self.refusals.watch()
        try:
            result = await run_session(
                self.endpoint,
                item.options,
                audio,
                api_key=self.api_key,
                pace=self.run.pace,
                timeouts=session_timeouts(self.run, duration_s),
                user_agent=self.user_agent,
                on_open=watch.opened,
                label=label,
                bounds=reply_bounds(self.run),
            )
        except Exception as error:
            if isinstance(error, HandshakeRejected):
                self.stats.refused_handshakes += 1
            if is_unreachable(error) and self.refusals.refused():
                raise ServiceUnreachable(self.refusals.count, error, self.endpoint.host) from error
            if is_refusal(error) and self.refusals.refused():
                raise ServiceRefusing(self.refusals.count, error) from error
            raise
        finally:
            watch.ended()
            self.cap.settle(reserved_s, audio.duration_s)
            self.stats.billed_audio_s += audio.duration_s
            unskipped = recorded_s if recorded_s is not None else audio.duration_s
            self.stats.billed_unskipped_s += unskipped
        self.stats.busy_session_s += result.busy_s
        self.stats.connect_s.append(result.connect_s)
        if result.first_final_s is not None:
            self.stats.first_final_s.append(result.first_final_s)
        self.stats.end_to_last_s.append(result.end_to_last_s)
        return result

    # --- rows ----------------------------------------------------------------------

    async def _finish(
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
            scores = score.columns(item.reference, collected.transcript, item.options.language)
            rows.transcript.update(scores)
        stored = (await self.writer.add(rows)).transcript
        said: str | None = None  # "<error_kind>: <message>" for the progress display
        if stored["status"] == "ok":
            self.stats.ok += 1
            self.stats.audio_s += duration_s
            self.stats.streamed_s += streamed_s
        else:
            self.stats.failed += 1
            failure = Failure(item.item_id, item.source, stored["error_kind"], stored["error"])
            self.stats.failures.append(failure)
            said = f"{failure.kind}: {failure.message}"
        self.progress.item_done(item, stored["status"] == "ok", duration_s, said)


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


def whole_units(items: Iterable[Item]) -> list[Unit]:
    return [Unit(item) for item in items]
