"""One WebSocket session on the local server: audio in, transcripts out.

Two tasks per session, joined by an unbounded job queue:

- the *receiver* reads frames, decodes audio, segments it (`Segmenter`), queues a
  final job per closed segment and a best-effort partial job now and then, handles
  control messages, and fires the session's injected fault;
- the *worker* runs the engine in a thread (bounded by the server's limiter) and
  sends the results in order, ending with ``is_last`` and a 1000 close.

Keeping the receiver free of recognition means a slow engine never stops the socket
from being read, so keepalive pings are answered and fast clients are not blocked.

Client protocol errors (a text frame that is not a JSON object with a known
``type``) get an error message and close code 1003 (unsupported data). 1008 is
avoided on purpose: the vendor uses it for "concurrency limit, retry later".
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from batch.pulse.protocol import Generation, PulseOptions, Word
from batch.server.audio import make_wire_decoder
from batch.server.engines import Engine
from batch.server.faults import FaultDraw, FaultKind
from batch.server.messages import (
    FinalFacts,
    error_message,
    shift_words,
    speech_event,
    transcript_message,
    transcript_text,
    wants_vad_events,
)
from batch.server.odd import ODD_VALUES, OddValue
from batch.server.redact import Redactor
from batch.server.stats import SessionRecord
from batch.server.text import digits_as_words, words_as_digits
from batch.server.vad import Segment, Segmenter

logger = logging.getLogger(__name__)

MALFORMED_FRAME: Final = "<<injected fault: this frame is not JSON>>"
FINALIZE_TYPE: Final = "finalize"


class Outcome(Enum):
    """How the receiver stopped; decides what the session does last."""

    END = "end"  # end signal: the worker sends the rest, is_last, then closes 1000
    CLIENT_GONE = "client_gone"
    PROTOCOL_ERROR = "protocol_error"  # error message, close 1003
    DROP = "drop"  # injected: abort the TCP connection, no close frame
    ERROR = "error"  # injected: error message, close 1011
    STALL = "stall"  # injected: say nothing more, keep reading until the client leaves
    LATE_1008 = "late_1008"  # injected: finals for what was heard, then close 1008


_FAULT_OUTCOMES: Final = {
    FaultKind.DROP: Outcome.DROP,
    FaultKind.ERROR: Outcome.ERROR,
    FaultKind.STALL: Outcome.STALL,
}


@dataclass(frozen=True)
class Job:
    """Work for the session's worker: recognise ``segment`` (None: an empty final)."""

    kind: Literal["partial", "final"]
    segment: Segment | None
    is_last: bool = False


@dataclass(frozen=True)
class SessionSettings:
    """What a session needs from the server besides its socket."""

    session_id: str
    options: PulseOptions
    generation: Generation
    engine: Engine
    limiter: anyio.CapacityLimiter
    partial_interval_s: float
    fault: FaultDraw | None = None
    echo: str | None = None  # the request's Authorization header, to repeat in errors
    reply_latency_s: float = 0.0  # each message waits this before it is sent


class StreamSession:
    """Runs one accepted connection to its end; `run` never raises for client faults."""

    def __init__(
        self, ws: ServerConnection, settings: SessionSettings, record: SessionRecord
    ) -> None:
        self._ws = ws
        self._settings = settings
        self._options = settings.options
        self._record = record
        self._decoder = make_wire_decoder(settings.options.encoding, settings.options.sample_rate)
        self._segmenter = Segmenter(settings.options.sample_rate)
        self._jobs_in, self._jobs_out = anyio.create_memory_object_stream[Job](math.inf)
        self._end_type = settings.generation.end_type
        self._closed_through = -1  # highest segment index already queued as final
        self._partial_queued = False
        self._partial_mark = 0  # open-segment length (samples) at the last partial
        self._finals: list[str] = []
        self._languages: list[str] = []  # every language reported so far, first-seen order
        options = settings.options
        self._redactor = Redactor(pci=options.redact_pci, pii=options.redact_pii)
        self._hotwords = " ".join(k.rpartition(":")[0] for k in options.keywords) or None
        self._fault_fired = False
        self._silent = False  # the silent fault fired: read on, say nothing
        self._odd_pending: OddValue | None = None  # to put into the next fitting final
        self._problem = ""

    async def run(self) -> Outcome:
        """Serve the session; returns how it ended."""
        outcome = Outcome.CLIENT_GONE
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._work, self._jobs_out)
                outcome = await self._receive()
                if outcome in (Outcome.END, Outcome.LATE_1008):
                    self._jobs_in.close()  # the worker drains the queue, then stops
                else:
                    tg.cancel_scope.cancel()
        finally:
            self._jobs_in.close()
            self._jobs_out.close()
        await self._conclude(outcome)
        return outcome

    # --- receiver --------------------------------------------------------------

    async def _receive(self) -> Outcome:
        try:
            async for message in self._ws:
                if isinstance(message, bytes):
                    outcome = await self._on_audio(message)
                else:
                    outcome = await self._on_text(message)
                if outcome is not None:
                    return outcome
        except ConnectionClosed:
            pass
        return Outcome.CLIENT_GONE

    async def _on_audio(self, data: bytes) -> Outcome | None:
        samples = self._decoder.decode(data)
        segments = self._segmenter.push(samples)
        self._note_audio()
        if self._silent:
            return None
        for segment in segments:
            self._queue_final(segment)
        self._maybe_queue_partial()
        return await self._maybe_fault(at_end=False)

    def _note_audio(self) -> None:
        now = time.monotonic()
        record = self._record
        if record.first_audio_at is None:
            record.first_audio_at = now
        elif record.last_audio_at is not None:
            record.max_audio_gap_s = max(record.max_audio_gap_s, now - record.last_audio_at)
        record.last_audio_at = now
        record.audio_s = self._segmenter.samples_received / self._options.sample_rate

    async def _on_text(self, text: str) -> Outcome | None:
        try:
            data: Any = json.loads(text)
        except json.JSONDecodeError:
            return self._protocol_error("text frames must be JSON control messages")
        kind = data.get("type") if isinstance(data, dict) else None
        if self._silent:
            return None  # no finalize, no end: a socket that reads and never answers
        if kind == self._end_type:
            outcome = await self._maybe_fault(at_end=True)
            if outcome is not None or self._silent:
                return outcome
            self._queue_flush(is_last=True)
            return Outcome.END
        newer = self._settings.generation is not Generation.LEGACY
        if kind == FINALIZE_TYPE and newer:
            self._queue_flush(is_last=False)
            return None
        # Strict: each path takes only its own end signal (``end`` on close_stream paths
        # would leave a real client waiting for an is_last that never comes).
        expected = [self._end_type, FINALIZE_TYPE] if newer else [self._end_type]
        return self._protocol_error(f"unknown control message type {kind!r}; expected {expected}")

    def _protocol_error(self, problem: str) -> Outcome:
        self._problem = problem
        return Outcome.PROTOCOL_ERROR

    def _queue_final(self, segment: Segment, *, is_last: bool = False) -> None:
        self._closed_through = segment.index
        self._partial_mark = 0
        self._jobs_in.send_nowait(Job("final", segment, is_last))

    def _queue_flush(self, *, is_last: bool) -> None:
        """Finals for everything buffered; always at least one (maybe empty) final."""
        segments = self._segmenter.flush()
        if not segments:
            self._jobs_in.send_nowait(Job("final", None, is_last))
        for position, segment in enumerate(segments, start=1):
            self._queue_final(segment, is_last=is_last and position == len(segments))

    def _maybe_queue_partial(self) -> None:
        """Queue a partial per ``partial_interval_s`` of new speech, if a recogniser is idle.

        Partials are best effort: skipped while one is queued or every recogniser slot
        is busy, so they never slow down finals.
        """
        open_samples = self._segmenter.open_samples
        interval = self._settings.partial_interval_s * self._options.sample_rate
        if self._partial_queued or open_samples - self._partial_mark < interval:
            return
        if self._settings.limiter.available_tokens < 1:
            return
        snapshot = self._segmenter.snapshot()
        if snapshot is None:
            return
        self._partial_queued = True
        self._partial_mark = open_samples
        self._jobs_in.send_nowait(Job("partial", snapshot))

    async def _maybe_fault(self, *, at_end: bool) -> Outcome | None:
        """Fire the injected mid-stream fault once its time has come (or at the end)."""
        fault = self._settings.fault
        if fault is None or fault.kind.at_handshake or self._fault_fired:
            return None
        if fault.kind is FaultKind.LATE_1008 and not at_end:
            return None  # fires only once the service has all the audio
        if not at_end and self._record.audio_s < fault.trigger_s:
            return None
        self._fault_fired = True
        logger.info("session %s: injecting fault %s", self._settings.session_id, fault.kind)
        if fault.kind is FaultKind.MALFORMED:
            await self._ws.send(MALFORMED_FRAME)  # then carry on as if nothing happened
            return None
        if fault.kind is FaultKind.ODD_VALUES and fault.odd_value is not None:
            self._odd_pending = ODD_VALUES[fault.odd_value]
            return None
        if fault.kind is FaultKind.EARLY_LAST:
            self._queue_flush(is_last=True)  # as if the end signal had come now
            return Outcome.END
        if fault.kind is FaultKind.LATE_1008:
            self._queue_flush(is_last=False)  # finals for everything, but no is_last
            return Outcome.LATE_1008
        if fault.kind is FaultKind.SILENT:
            self._silent = True  # even results already queued are never sent
            return None
        return _FAULT_OUTCOMES[fault.kind]

    # --- worker ----------------------------------------------------------------

    async def _work(self, jobs: MemoryObjectReceiveStream[Job]) -> None:
        try:
            async for job in jobs:
                if job.kind == "partial":
                    await self._send_partial(job)
                elif await self._send_final(job):
                    return
        except ConnectionClosed:
            pass  # the client left; the receiver notices too
        except Exception:
            # An engine bug must not look like a clean session: tell the client, 1011.
            # The receiver is still reading, so no draining here.
            logger.exception("session %s: recognition failed", self._settings.session_id)
            await self._fail("recognition failed", "internal_error", 1011, drain=False)

    async def _send_partial(self, job: Job) -> None:
        self._partial_queued = False
        if job.segment is None or job.segment.index <= self._closed_through:
            return  # its final is already queued: a partial now would only be noise
        words = await self._recognize(job.segment, final=False)
        # Partials are redacted too (with their own numbering): nothing in clear leaves.
        options = self._options
        words, _ = self._written(words, Redactor(pci=options.redact_pci, pii=options.redact_pii))
        await self._send(self._message(words, is_final=False))

    async def _send_final(self, job: Job) -> bool:
        """Send one final; after the last one close 1000. True when the session is done."""
        heard = await self._recognize(job.segment) if job.segment is not None else []
        words, entities = self._written(heard, self._redactor)
        self._record.final_words.extend(w.word for w in words)  # as sent
        language = self._settings.engine.language_of(heard, self._options.language)
        if words and language not in self._languages:
            self._languages.append(language)
        segment = job.segment if wants_vad_events(self._options) and words else None
        if segment is not None:  # events interleave with transcripts, as the service's do
            await self._event("speech_started", segment.start_s)
        text = transcript_text(words)
        if text:
            self._finals.append(text)
        final = FinalFacts(language, self._languages, entities, " ".join(self._finals))
        await self._send(self._message(words, is_final=True, is_last=job.is_last, final=final))
        if segment is not None and not job.is_last:
            await self._event("speech_ended", segment.start_s + segment.duration_s)
        if job.is_last:
            self._record.completed = True
            await self._close(1000, "", drain=True)  # the receiver has stopped reading
        return job.is_last

    async def _event(self, kind: str, at_s: float) -> None:
        await self._send(json.dumps(speech_event(self._settings.session_id, kind, at_s)))

    def _written(self, words: list[Word], redactor: Redactor) -> tuple[list[Word], list[str]]:
        """Words as the session asked them written: numerals, then redaction (digits
        first, so spoken card numbers are caught); or redaction before spelling out."""
        numerals = self._options.numerals
        if numerals == "true":
            return redactor.redact(words_as_digits(words))
        redacted, entities = redactor.redact(words)
        return (digits_as_words(redacted) if numerals == "false" else redacted), entities

    async def _recognize(self, segment: Segment, *, final: bool = True) -> list[Word]:
        engine = self._settings.engine
        words = await anyio.to_thread.run_sync(
            functools.partial(engine.recognize, hotwords=self._hotwords, final=final),
            segment.audio,
            segment.sample_rate,
            limiter=self._settings.limiter,
        )
        return shift_words(words, segment.start_s)

    def _message(
        self,
        words: list[Word],
        *,
        is_final: bool,
        is_last: bool = False,
        final: FinalFacts | None = None,
    ) -> str:
        message = transcript_message(
            session_id=self._settings.session_id,
            words=words,
            options=self._options,
            generation=self._settings.generation,
            is_final=is_final,
            is_last=is_last,
            final=final,
        )
        odd = self._odd_pending
        if is_final and odd is not None and (message.get("words") or not odd.needs_words):
            self._odd_pending = None
            odd.apply(message)
        return json.dumps(message)

    async def _send(self, text: str) -> None:
        if self._settings.reply_latency_s > 0:
            await anyio.sleep(self._settings.reply_latency_s)
        if not self._silent:
            await self._ws.send(text)

    # --- ending ----------------------------------------------------------------

    async def _conclude(self, outcome: Outcome) -> None:
        if outcome is Outcome.DROP:
            self._ws.transport.abort()
        elif outcome is Outcome.ERROR:
            await self._fail("injected fault: internal server error", "internal_error", 1011)
        elif outcome is Outcome.PROTOCOL_ERROR:
            await self._fail(self._problem, "bad_request", 1003)
        elif outcome is Outcome.LATE_1008:
            await self._close(1008, "too many sessions", drain=True)
        elif outcome is Outcome.STALL:
            await self._drain()  # read and ignore: the socket stays healthy but silent

    async def _fail(self, message: str, code: str, close_code: int, *, drain: bool = True) -> None:
        """Send an error message, then close with ``close_code``."""
        reason = code.replace("_", " ")
        if self._settings.echo is not None:  # the echo_authorization fault
            message = f"{message} (request had Authorization: {self._settings.echo})"
            # A close reason holds at most 123 bytes: the echoed key is cut off inside it.
            echoed = f"{reason}; Authorization: {self._settings.echo}".encode()[:123]
            reason = echoed.decode("utf-8", "ignore")
        try:
            await self._send(json.dumps(error_message(self._settings.session_id, message, code)))
            await self._close(close_code, reason, drain=drain)
        except ConnectionClosed:
            pass

    async def _close(self, code: int, reason: str, *, drain: bool) -> None:
        """Close, reading meanwhile when no other task does.

        Unread messages pause the transport once websockets' queue is full, and then
        the client's close frame is never seen: the close would wait out its timeout.
        """
        if not drain:
            await self._ws.close(code, reason)
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._drain)
            await self._ws.close(code, reason)
            tg.cancel_scope.cancel()

    async def _drain(self) -> None:
        try:
            async for _ in self._ws:
                pass
        except ConnectionClosed:
            pass
