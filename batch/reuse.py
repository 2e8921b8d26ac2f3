"""Several whole items through one session: ``finalize`` between them, each its own rows.

A short file pays a handshake and a final wait of its own; both cost more than the file
when it is a few seconds long. On endpoints with ``finalize`` (`batch.pulse.reuse`), a
worker streams its item, then the next queued item with the same options, and so on, in
one session: a `Chain` of units with an empty chunk between them (the sender sends
``finalize`` for it). Units are taken from the pool as the audio goes, so the cap on open
sessions holds. The session's machine (`batch.pulse.machine`) tells each unit's finals
apart by their times and hands them on, times relative to the unit's own audio, as soon as
a later unit's final (or ``is_last``) shows it complete (`UnitFinalised`); they become its
rows. A session that fails keeps the units known complete; the rest are retried in a new
session, and a unit whose file cannot be read fails alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from batch.assemble import Assembler
from batch.attempts import Sessions, StreamedAudio, Unit, log_fields, outcome, session_label
from batch.collect import collect_finals
from batch.errors import (
    InputError,
    JobAborted,
    NotStarted,
    OutputError,
    Scope,
    SpendCapReached,
    classify,
    error_kind,
)
from batch.limits import reply_bounds, session_timeouts
from batch.pool import SessionWatch, with_retries
from batch.pulse.machine import UnitFinalised
from batch.pulse.protocol import PCM_SAMPLE_BYTES, PulseOptions, Transcription
from batch.sent import CountedAudio
from batch.session import SessionResult, run_session

logger = logging.getLogger(__name__)

# A reused session takes no new unit once it has streamed this much audio: a failure then
# retries at most what was not yet complete, and no session outlives the service's limits.
MAX_SESSION_AUDIO_S: Final = 900.0


@dataclass(eq=False)
class Link:
    """One unit in a chain: its audio this attempt, and where that lies in the session."""

    unit: Unit
    started: datetime
    make_audio: Callable[[], StreamedAudio]
    audio: StreamedAudio | None = None
    start_s: float = 0.0
    end_s: float | None = None
    error: InputError | None = None  # its file could not be read: it fails alone
    attempts: int = 0


@dataclass(eq=False)
class Chain:
    """An `AudioSource` over links, in order: ``queued`` first (carried over from a failed
    attempt), then what ``take`` hands out (from the event loop) until it has none or the
    session holds `MAX_SESSION_AUDIO_S`. Iterated in the session's reader thread.
    ``silence`` is one sample of silence in the wire's PCM encoding, at ``rate``.

    ``links`` is every unit the chain holds (``queued`` and those taken, in order; kept on
    the event loop), ``started`` the ones whose audio it began (kept by the reader).
    Once ``closed`` (the attempt is over) it takes and streams nothing more: a reader
    abandoned mid-read must not take a unit that no one would stream."""

    queued: list[Link]
    take: Callable[[], Link | None]
    silence: bytes
    rate: int
    links: list[Link] = field(default_factory=list)
    started: list[Link] = field(default_factory=list)
    closed: bool = False
    sent_bytes: int = 0
    reserved_s: float = 0.0  # what the spend cap holds for its units
    # The event loop `take` runs on (the reader is a plain thread): made on that loop.
    token: anyio.lowlevel.EventLoopToken = field(default_factory=anyio.lowlevel.current_token)

    @property
    def position_s(self) -> float:
        """Audio seconds yielded so far, counted as the service counts them: in samples."""
        return self.sent_bytes // len(self.silence) / self.rate

    @property
    def duration_s(self) -> float:
        return self.position_s

    def _next(self) -> Link | None:
        if self.closed:
            return None
        if self.queued:
            return self.queued.pop(0)
        if self.position_s >= MAX_SESSION_AUDIO_S:
            return None
        return anyio.from_thread.run_sync(self.take, token=self.token)

    def __iter__(self) -> Iterator[bytes]:
        link = self._next()
        while link is not None:
            yield from self._stream(link)
            link = self._next()
            if link is not None:
                yield from self._align()
                yield b""  # the unit boundary: the sender sends finalize

    def _align(self) -> Iterator[bytes]:
        """One sample of silence when the next unit would start on exactly half a
        millisecond: the service rounds times to milliseconds, and a time moved by a
        half could not be moved back exactly (any other offset can)."""
        samples = self.sent_bytes // len(self.silence)
        half_ms, rest = divmod(samples * 2000, self.rate)
        if rest == 0 and half_ms % 2 == 1:
            self.sent_bytes += len(self.silence)
            yield self.silence

    def _stream(self, link: Link) -> Iterator[bytes]:
        link.attempts += 1
        link.start_s = self.position_s
        link.end_s, link.error = None, None
        self.started.append(link)  # read on the event loop: after its start is set
        link.audio = audio = link.make_audio()
        try:
            for chunk in audio:
                if self.closed:
                    return
                if chunk:
                    self.sent_bytes += len(chunk)
                    yield chunk
        except InputError as error:
            link.error = error  # its own row says why; the session goes on
        link.end_s = self.position_s


def one_sample_of_silence(options: PulseOptions) -> bytes:
    """Silence for one sample of a PCM wire encoding (G.711 has its own zero codes)."""
    return {"mulaw": b"\xff", "alaw": b"\xd5"}.get(
        options.encoding, bytes(PCM_SAMPLE_BYTES[options.encoding])
    )


@dataclass
class Settled:
    """A unit done with: its finals (own time base) from ``session``, or its ``error``."""

    link: Link
    finals: list[Transcription] = field(default_factory=list)
    session: SessionResult | None = None
    error: Exception | None = None


class Reuse:
    """Streams a whole item and the reusable items queued after it through shared sessions,
    and writes each one's rows."""

    def __init__(
        self,
        sessions: Sessions,
        assembler: Assembler,
        make_audio: Callable[[Unit], StreamedAudio],
        wanted: Callable[[Unit], bool],
    ) -> None:
        self.sessions = sessions
        self.assembler = assembler
        self.make_audio = make_audio
        self.wanted = wanted
        self.active = 0  # chains streaming (or waiting for their slot)
        # Items whose reused session failed (one session each from then on): attempts had.
        self.alone: dict[str, int] = {}
        self._ended = anyio.Event()  # set (and replaced) as each chain ends

    def _link(self, unit: Unit) -> Link:
        return Link(unit, datetime.now(UTC), lambda: self._counted(unit))

    def _counted(self, unit: Unit) -> CountedAudio:
        """The unit's audio, counted on the progress display as the session reads it."""
        progress = self.sessions.progress
        return CountedAudio(self.make_audio(unit), lambda s: progress.audio_sent(unit.item, s))

    def _take(self, chain: Chain, options: PulseOptions) -> Link | None:
        """The next queued unit with the same options, if the spend cap admits it (then
        reserved for ``chain``). Runs on the event loop."""

        if chain.closed:
            return None

        def joins(unit: Unit) -> bool:
            if not self.wanted(unit) or unit.item.options != options:
                return False
            try:
                self.sessions.cap.admit(unit.item.duration_s or 0.0)
            except SpendCapReached:
                return False  # left queued: its own turn finds the cap reached
            chain.reserved_s += unit.item.duration_s or 0.0
            return True

        head = self.sessions.pool.take_next(joins)
        if head is None:
            return None
        link = self._link(head)
        chain.links.append(link)
        return link

    async def stream(self, unit: Unit) -> None:
        """Stream ``unit`` and whatever joins it; every unit taken gets its row as soon as
        it is known complete (or, when the run stops before it started, none: a rerun
        does it)."""
        sessions = self.sessions
        if self.active >= sessions.limit.size and not sessions.pool.stopping:
            # Every slot streams a chain: this (spare) worker would hold the unit until
            # one ends, then stream it alone. Back in the queue, a chain takes it on.
            sessions.pool.push_front([unit])
            await self._ended.wait()
            return
        self.active += 1
        try:
            await self._stream(unit)
        finally:
            self.active -= 1
            self._ended.set()
            self._ended = anyio.Event()

    async def _stream(self, unit: Unit) -> None:
        sessions = self.sessions
        pending = [self._link(unit)]
        timeline = sessions.stats.timeline
        key = timeline.new_unit()  # the chain's attempts, on the run's timeline

        def counted(attempt: int) -> None:
            sessions.count_attempt(attempt)
            if attempt > 1:
                timeline.retried(key)

        sink, rows = anyio.create_memory_object_stream[Settled](math.inf)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._write, rows)
            async with sink:
                while True:  # until every unit is settled, or retrying cannot help
                    tried = await with_retries(
                        lambda watch: self._attempt(pending, sink, key, watch),
                        limit=sessions.limit,
                        policy=sessions.retry,
                        rng=sessions.rng,
                        streak=sessions.refusals,
                        on_attempt=counted,
                        log_fields=log_fields(unit.item),
                        label=session_label(unit.item),
                        on_retry=sessions.count_retry,
                    )
                    if tried.error is not None or not pending:
                        break
                for link in pending:
                    sink.send_nowait(Settled(link, error=tried.error))
        timeline.done(key)
        error = tried.error
        if error is not None and classify(error).scope is Scope.JOB:
            raise JobAborted(str(error)) from error

    async def _write(self, rows: MemoryObjectReceiveStream[Settled]) -> None:
        async with rows:
            async for each in rows:
                await self._finish(each)

    async def _attempt(
        self,
        pending: list[Link],
        sink: MemoryObjectSendStream[Settled],
        key: int,
        watch: SessionWatch,
    ) -> None:
        sessions = self.sessions
        if sessions.pool.stopping:
            raise NotStarted("the run is stopping: the session was not started")
        first = pending[0].unit.item
        rate = first.options.sample_rate
        silence = one_sample_of_silence(first.options)
        chain = Chain(
            list(pending), lambda: self._take(chain, first.options), silence, rate, list(pending)
        )
        chain.reserved_s = sum(link.unit.item.duration_s or 0.0 for link in pending)
        sessions.cap.admit(chain.reserved_s)
        sessions.progress.sessions_open(sessions.limit.open_now)
        result = SessionResult()
        settler = _Settler(chain, sink, result)
        label = f"{session_label(first)} (reused session)"
        span = sessions.stats.timeline.begin(key, label)

        def opened() -> None:
            watch.opened()
            span.open()

        try:
            await run_session(
                sessions.endpoint,
                first.options,
                chain,
                api_key=sessions.api_key,
                pace=sessions.run.pace,
                timeouts=session_timeouts(sessions.run, first.duration_s),
                user_agent=sessions.user_agent,
                on_open=opened,
                label=label,
                bounds=reply_bounds(sessions.run),
                result=result,
                on_unit=settler.finalised,
            )
        except Exception as error:
            chain.closed = True
            for link in chain.started:  # those retried are sent again (done ones: ignored)
                if isinstance(link.audio, CountedAudio):
                    link.audio.settle(kept=False)
            pending[:] = settler.settle()
            span.end(outcome(error), error_kind(error))
            sessions.count_failure(error)
            if chain.position_s > 0 and self._stream_alone(pending, error, label):
                return  # each unfinished file goes on in a session of its own
            raise
        except BaseException:  # cancelled: the slot is given back all the same
            span.end("failed", "cancelled")
            raise
        finally:
            chain.closed = True
            sessions.stats.billed_audio_s += chain.position_s
            sessions.stats.billed_unskipped_s += chain.position_s
            sessions.cap.settle(chain.reserved_s, chain.position_s)
        pending[:] = settler.settle()
        sessions.counted_session(result)
        span.end("ok")
        logger.debug("%s: %d files in one session", session_label(first), len(chain.started))

    def _stream_alone(self, pending: list[Link], error: Exception, label: str) -> bool:
        """After a reused session failed with audio sent, its unfinished files are queued
        again to stream each in a session of its own, with the rest of its own attempts
        (at least one): a file that always breaks its session must not take the files
        beside it down with it (retried together, they would share its fate and one
        attempt budget). Each goes on as a retry. Not for an error of the whole job or
        the output, which stop the run."""
        if isinstance(error, OutputError) or classify(error).scope is Scope.JOB:
            return False
        for link in pending:
            self.alone[link.unit.item.item_id] = link.attempts
            self.sessions.count_retry(error)
        self.sessions.pool.push_front(link.unit for link in pending)  # none once stopping
        logger.info(
            "%s failed (%s); its %d unfinished file(s) go on in sessions of their own",
            label,
            error,
            len(pending),
        )
        pending.clear()
        return True

    async def _finish(self, settled_unit: Settled) -> None:
        link, item = settled_unit.link, settled_unit.link.unit.item
        error = link.error or settled_unit.error
        if isinstance(error, NotStarted):  # the run stops: no row, a rerun does it
            self.assembler.not_started(error)
            return
        if error is not None:
            await self.assembler.finish(item, link.started, attempts=link.attempts, error=error)
            return
        session = settled_unit.session
        assert session is not None and link.audio is not None
        languages = list(dict.fromkeys(f.language for f in settled_unit.finals if f.language))
        collected = collect_finals(
            settled_unit.finals, languages=languages or session.languages[:1]
        )
        await self.assembler.finish(
            item,
            link.started,
            attempts=link.attempts,
            collected=collected,
            duration_s=link.audio.duration_s,
            streamed_s=link.audio.duration_s,
            session_id=session.session_id,
        )


@dataclass(eq=False)
class _Settler:
    """Hands each unit of one attempt's chain to the row writer as the session's machine
    finalises it (`UnitFinalised`, in order), or once its file failed."""

    chain: Chain
    sink: MemoryObjectSendStream[Settled]
    result: SessionResult
    handed: int = 0  # units of chain.started handed on

    def finalised(self, unit: UnitFinalised) -> None:
        """The session knows unit ``unit.index`` complete: its row can be written."""
        link = self.chain.started[unit.index]
        self.sink.send_nowait(Settled(link, unit.finals, self.result, link.error))
        self.handed = unit.index + 1

    def settle(self) -> list[Link]:
        """The session is over: hand on the units whose file failed; returns the rest of
        those not finalised, to stream again."""
        again: list[Link] = []
        for link in self.chain.links[self.handed :]:  # none once complete
            if link.error is not None:  # its file failed: retrying cannot help
                self.sink.send_nowait(Settled(link, error=link.error))
            else:
                again.append(link)
        return again
