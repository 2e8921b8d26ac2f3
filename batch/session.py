"""One Pulse streaming session: connect, send paced audio, collect finals until ``is_last``.

This is the I/O edge for the service. websockets errors are translated here into the
`batch.errors` tree; nothing above this module sees a third-party exception. The API key
travels in the Authorization header only and never appears in an error message.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import anyio.lowlevel
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode
from websockets.http11 import USER_AGENT

from batch import hangup, pacing
from batch.credentials import Scrubber
from batch.errors import (
    ConnectionLost,
    HandshakeRejected,
    InputError,
    ProtocolViolation,
    PulseBatchError,
    ServerReported,
    SessionTimeout,
    Unreachable,
)
from batch.hangup import ResettingConnection
from batch.pulse import protocol
from batch.pulse.bounds import DEFAULT_BOUNDS, ReplyBounds, ReplyMeter
from batch.readahead import AudioSource as AudioSource  # what sessions stream
from batch.readahead import ReadAhead
from batch.stallwatch import DEFAULT_POLICY, LivenessPolicy, StallWatch

logger = logging.getLogger(__name__)


class _ScrubAuthorization(logging.Filter):
    """websockets logs handshake headers and frames at DEBUG; the key must reach no log,
    neither in our header nor echoed back in a frame or a response from the service."""

    # The whole header value: a scheme and a key with odd spacing are one secret.
    _header = re.compile(r"(authorization:\s*)[^\r\n]*", re.IGNORECASE)

    def __init__(self) -> None:
        super().__init__()
        self.scrubber = Scrubber()

    def remember(self, key: str) -> None:
        if key not in self.scrubber.secrets:
            self.scrubber = Scrubber(key, *self.scrubber.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.scrubber.scrub(self._header.sub(r"\1[redacted]", message))
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


# The connection's own logger: scrubbed here, whatever logging the caller configures.
_wire_logger = logging.getLogger("batch.session.wire")
_wire_filter = _ScrubAuthorization()
_wire_logger.addFilter(_wire_filter)

# Far above any real message (a final's words for a long utterance, or a three-hour
# full_transcript, are a few hundred KB); a larger one fails the session as `protocol`.
_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Messages websockets may hold unread (each up to the size above): with its default of 16,
# a flood of large frames could pin 64 MB per session before our budget sees them.
_MAX_QUEUED_MESSAGES = 4
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Endpoint:
    """A Pulse WebSocket URL and the protocol generation it speaks."""

    url: str
    generation: protocol.Generation

    @classmethod
    def resolve(cls, url: str, forced: str = "auto") -> Endpoint:
        """The generation from the path, or ``forced``; raises `UnknownEndpointPath`."""
        return cls(url, protocol.generation_for(url, forced))

    def session_url(self, options: protocol.PulseOptions) -> str:
        return f"{self.url}?{urlencode(protocol.build_query(options, self.generation))}"

    @property
    def host(self) -> str:
        """``host:port`` of the URL, for messages: never a user or password in it."""
        parts = urlsplit(self.url)
        host = parts.hostname or "?"
        shown = f"[{host}]" if ":" in host else host
        return f"{shown}:{parts.port}" if parts.port else shown

    @property
    def is_loopback(self) -> bool:
        return urlsplit(self.url).hostname in _LOOPBACK_HOSTS


@dataclass(frozen=True)
class Timeouts:
    """Every wait of a session, named, in seconds."""

    connect_timeout_s: float = 10.0
    final_timeout_s: float = 30.0  # for each message once the end signal is sent
    session_deadline_s: float = 600.0  # the whole session, scaled to the audio by the caller
    # The deadline grows with the audio actually sent, to at least start + this x the audio
    # seconds sent + the slack: a file longer than its header said (a VBR MP3 without a
    # Xing header probes short) is never timed out for that. 0: the deadline is fixed.
    deadline_per_audio_s: float = 0.0
    deadline_slack_s: float = 0.0
    # Each send (an audio chunk, the end signal) must be taken by the peer within this: a
    # peer that stops reading fills the socket's buffers, and a send then waits forever.
    write_timeout_s: float = 30.0
    liveness: LivenessPolicy = DEFAULT_POLICY  # when a silent service is stalled

    def grown_deadline_s(self, audio_sent_s: float) -> float:
        """The session deadline (seconds from its start) once ``audio_sent_s`` was sent."""
        if self.deadline_per_audio_s <= 0:
            return self.session_deadline_s
        grown = audio_sent_s * self.deadline_per_audio_s + self.deadline_slack_s
        return max(self.session_deadline_s, grown)


@dataclass
class SessionResult:
    """What one complete session (ended by ``is_last``) produced, plus its timings."""

    session_id: str | None = None
    finals: list[protocol.Transcription] = field(default_factory=list)
    connect_s: float = 0.0
    first_final_s: float | None = None  # from the first audio byte sent
    end_to_last_s: float = 0.0  # from the end signal to ``is_last``
    busy_s: float = 0.0  # socket open time

    # Every language reported on a final (first-seen order) and the service's own
    # cumulative transcript, from every final, empty ones (the terminal one) included.
    languages: list[str] = field(default_factory=list)
    full_transcript: str | None = None

    @property
    def language(self) -> str | None:
        return next((f.language for f in reversed(self.finals) if f.language), None)

    def note_final(self, message: protocol.Transcription) -> None:
        for language in (message.language, *message.languages):
            if language and language not in self.languages:
                self.languages.append(language)
        if message.full_transcript is not None:
            self.full_transcript = message.full_transcript


def _retry_after_s(headers: Any) -> float | None:
    """Seconds the service asks us to wait: delta-seconds or an HTTP date. Anything else
    (``inf``, ``nan``, negative, garbage) is ignored and our own backoff applies; the
    caller caps what is left (`batch.pool.Backoff`)."""
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = (when - datetime.now(UTC)).total_seconds()
        return max(0.0, seconds)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _rejected(exc: InvalidStatus, scrubber: Scrubber) -> HandshakeRejected:
    response = exc.response
    # Scrubbed before it is cut short, so no piece of an echoed key survives the cut.
    body = scrubber.scrub(bytes(response.body or b"").decode("utf-8", "replace"))
    body = " ".join(body[:200].split())
    return HandshakeRejected(response.status_code, body, _retry_after_s(response.headers))


# A service at its concurrency limit refuses a session as it opens (close 1008 at once).
# A 1008 later than this, with audio read all along, ends a session the service took: a
# failed attempt that counts against max_attempts, or a file could be streamed forever.
REFUSAL_WINDOW_S = 2.0


def _lost(exc: ConnectionClosed, scrubber: Scrubber, took_audio: bool) -> ConnectionLost:
    code = exc.rcvd.code if exc.rcvd is not None else None
    reason = scrubber.scrub(exc.rcvd.reason) if exc.rcvd is not None else ""
    described = f"close code {code}" if code is not None else "no close frame"
    detail = f" ({reason})" if reason else ""
    # Once the service took the audio, a close is a failed attempt, not a refusal to start.
    phase = "after the service took the audio" if took_audio else "while streaming"
    message = f"connection ended {phase} before is_last: {described}{detail}"
    return ConnectionLost(message, code, after_audio=took_audio)


def _unwrap(group: BaseExceptionGroup[Any]) -> BaseException:
    """The error that explains a failed session best: input problems first, then ours."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    for wanted in (InputError, PulseBatchError):
        for leaf in leaves:
            if isinstance(leaf, wanted):
                return leaf
    return leaves[0]


class _Stream:
    """The two halves of a session over one open connection."""

    def __init__(
        self,
        ws: ClientConnection,
        result: SessionResult,
        timeouts: Timeouts,
        generation: protocol.Generation,
        options: protocol.PulseOptions,
        scrubber: Scrubber,
        deadline: anyio.CancelScope | None = None,
        label: str = "a session",
        bounds: ReplyBounds = DEFAULT_BOUNDS,
    ) -> None:
        self.ws = ws
        self.label = label  # what is streamed (source, channel, piece), for log lines
        self.generation = generation
        self.diarize = options.diarize
        self.watch = StallWatch(timeouts.liveness, generation, options, label)
        self.scrubber = scrubber
        self.deadline = deadline  # the session's, moved later as audio is sent
        self.began = anyio.current_time()
        self._warned: set[str] = set()
        self.result = result
        self.timeouts = timeouts
        self.end_sent = anyio.Event()
        self.started_at: float | None = None
        self.end_sent_at = self._paced_from = 0.0  # pacing's origin: the loop's clock
        self._grid = pacing.grid()  # the loop's, made in it
        self._waiting: anyio.CancelScope | None = None
        self.meter = ReplyMeter(bounds)
        self._full_chars = 0  # the latest full_transcript's length
        self.audio_sent_s = 0.0
        self.heard = False  # the service sent words: it took audio

    @property
    def took_audio(self) -> bool:
        """The service heard audio (it answered with words), got all of it, or kept reading
        past the window in which a concurrency refusal comes."""
        if self.heard or self.end_sent.is_set():
            return True
        streaming_s = time.monotonic() - self.started_at if self.started_at is not None else 0.0
        return streaming_s > REFUSAL_WINDOW_S

    async def _send(self, data: str | bytes) -> None:
        await pacing.send(self.ws, data, self.timeouts.write_timeout_s)

    async def send(self, audio: AudioSource, pace: float) -> None:
        # The audio is read (decoded, fetched from storage) in a worker thread: a slow read
        # must not stall the event loop, which paces and keeps alive every other session.
        reader = ReadAhead(audio)
        try:
            while batch := await reader.next():
                for chunk, position_s in batch:
                    await self._send_chunk(chunk, position_s, pace)
        finally:
            reader.close()
        await self._send(protocol.end_message(self.generation))
        self.end_sent_at = time.monotonic()
        self.end_sent.set()
        if self._waiting is not None:  # a wait begun before the end signal is now bounded too
            self._waiting.deadline = anyio.current_time() + self.timeouts.final_timeout_s

    async def _send_chunk(self, chunk: bytes, position_s: float, pace: float) -> None:
        """Send one chunk, then wait until ``position_s`` (the audio sent with it) is due."""
        if self.started_at is None:
            self.started_at = time.monotonic()
            self._paced_from = anyio.current_time()
        watch = self.watch
        if chunk and not watch.holding:  # the usual chunk: straight to the socket
            await pacing.send(self.ws, chunk, self.timeouts.write_timeout_s)
            watch.fed(position_s)
        else:  # a unit's end (finalize), or a silent service (none until it answers)
            await watch.send(self._send, chunk, position_s)
        self.audio_sent_s = position_s
        self._grow_deadline(position_s)
        if pace > 0:  # on a grid shared by all sessions: one wake serves many (`pacing`)
            await self._grid.wait_until(self._paced_from + position_s / pace)
        else:
            await anyio.lowlevel.checkpoint()  # unpaced: still let other sessions run

    def _grow_deadline(self, audio_sent_s: float) -> None:
        if self.deadline is not None:
            grown = self.began + self.timeouts.grown_deadline_s(audio_sent_s)
            if grown > self.deadline.deadline:  # a move reschedules its timer: only if later
                self.deadline.deadline = grown

    async def receive(self) -> None:
        with anyio.CancelScope() as scope:  # one for the session, not one per message
            self._waiting = scope
            while True:
                if self.end_sent.is_set():
                    scope.deadline = anyio.current_time() + self.timeouts.final_timeout_s
                raw = await self.ws.recv()
                if isinstance(raw, bytes):
                    raise ProtocolViolation("service sent a binary frame; only JSON is expected")
                if self._handle(raw):
                    return
        raise SessionTimeout("final_timeout_s", self.timeouts.final_timeout_s)  # cancelled

    def _note_coerced(self, fields: tuple[str, ...]) -> None:
        for name in fields:
            if name not in self._warned:  # once per field per session, not per message
                self._warned.add(name)
                logger.warning(
                    "%s: the service sent an odd %s value; stored as null", self.label, name
                )

    def _repeated(self, message: object) -> int:
        """Characters of a cumulative ``full_transcript`` the budget already counted: it
        repeats the transcript so far on every final, and only the latest is kept."""
        if not isinstance(message, protocol.Transcription) or not message.full_transcript:
            return 0
        repeated = min(len(message.full_transcript), self._full_chars)
        self._full_chars = len(message.full_transcript)
        return repeated

    def _handle(self, raw: str) -> bool:
        """Record one message; True when it is the terminal one."""
        # A service that echoes the key into a transcript or message must not get it stored.
        raw = self.scrubber.scrub_whole(raw)
        try:
            scrub = self.scrubber.scrub if self.scrubber.may_hide_in(raw) else None
            message = protocol.parse_message(raw, scrub)
        except protocol.MalformedMessage as exc:
            detail = self.scrubber.scrub(str(exc))
            raise ProtocolViolation(f"unreadable message from the service: {detail}") from None
        over = self.meter.take(len(raw) - self._repeated(message), self.audio_sent_s)
        if over is not None:
            raise ProtocolViolation(over)
        if isinstance(message, protocol.ServerError):
            code = self.scrubber.scrub(message.code) if message.code else None
            raise ServerReported(self.scrubber.scrub(message.message), code)
        if isinstance(message, protocol.Ignored):
            logger.debug("ignored a %r message from the service", self.scrubber.scrub(message.kind))
            return False
        self.heard = self.heard or bool(message.transcript or message.words)
        self.watch.answered(message)
        self._note_coerced(message.dropped)
        if not self.diarize:
            message = message.without_speakers()
        result = self.result
        result.session_id = message.session_id or result.session_id
        if message.is_final:
            result.note_final(message)
        if message.is_final and (message.transcript or message.words or message.is_last):
            if result.first_final_s is None and self.started_at is not None:
                result.first_final_s = time.monotonic() - self.started_at
            if message.transcript or message.words:
                # Only the latest full_transcript is kept (`note_final`): not one per final.
                result.finals.append(replace(message, full_transcript=None))
        if message.is_last:
            if not self.end_sent.is_set():
                # A terminal message before all the audio was sent: the rest would be lost.
                raise ProtocolViolation("service sent is_last before the end of the audio")
            result.end_to_last_s = time.monotonic() - self.end_sent_at
            return True
        return False


async def _stream_both(stream: _Stream, audio: AudioSource, pace: float) -> None:
    """Send and receive at once until ``is_last``; the error that explains a failure."""
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(stream.send, audio, pace)
            await stream.receive()
            tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _unwrap(group) from None


async def run_session(
    endpoint: Endpoint,
    options: protocol.PulseOptions,
    audio: AudioSource,
    *,
    api_key: str | None,
    pace: float = 1.0,
    timeouts: Timeouts = Timeouts(),
    user_agent: str | None = None,
    on_open: Callable[[], None] | None = None,
    label: str | None = None,
    bounds: ReplyBounds = DEFAULT_BOUNDS,
    result: SessionResult | None = None,
) -> SessionResult:
    """Stream ``audio`` through one session, paced by its ``position_s``; return the finals.
    ``on_open`` is called once the service has accepted the session (the upgrade passed).

    ``label`` names what is streamed (the source, its channel, its piece) in the session's
    log lines. ``bounds`` limits what the service may send (`batch.pulse.bounds`).
    ``user_agent`` replaces websockets' User-Agent (the runner names itself and its shard,
    for anyone reading the service's logs). ``result``, filled in place, keeps a failed
    session's finals. Complete only at ``is_last``. Raises `SessionError` subclasses (see
    `batch.errors`) and `InputError` if the audio source fails while streaming.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    scrubber = Scrubber(api_key)
    if api_key:
        _wire_filter.remember(api_key)
    result = result if result is not None else SessionResult()
    stream: _Stream | None = None
    began = time.monotonic()
    begun = anyio.current_time()
    try:
        with anyio.fail_after(timeouts.session_deadline_s) as deadline:
            async with connect(
                endpoint.session_url(options),
                additional_headers=headers,
                user_agent_header=user_agent or USER_AGENT,
                compression=None,  # deflate costs 6-35x throughput on PCM
                write_limit=pacing.WRITE_LIMIT_BYTES,
                open_timeout=timeouts.connect_timeout_s,
                max_size=_MAX_MESSAGE_BYTES,
                max_queue=_MAX_QUEUED_MESSAGES,
                proxy=None if endpoint.is_loopback else True,
                close_timeout=5,
                create_connection=ResettingConnection,  # no FIN-WAIT orphans
                logger=_wire_logger,
            ) as ws:
                opened = time.monotonic()
                result.connect_s = opened - began
                if on_open is not None:
                    on_open()
                stream = _Stream(
                    ws,
                    result,
                    timeouts,
                    endpoint.generation,
                    options,
                    scrubber,
                    deadline,
                    label or "a session",
                    bounds,
                )
                try:
                    await _stream_both(stream, stream.watch.wrap(audio), pace)
                except BaseException:
                    hangup.abort(ws)
                    raise
                result.busy_s = time.monotonic() - opened
    except TimeoutError as exc:
        if result.connect_s == 0.0:
            raise SessionTimeout("connect_timeout_s", timeouts.connect_timeout_s) from exc
        ran_s = anyio.current_time() - begun
        raise SessionTimeout("session_deadline_s", ran_s) from exc
    # Translated `from None`: the websockets errors carry the service's raw text (a body or
    # close reason that may echo the key); ours carry the scrubbed text only.
    except InvalidStatus as exc:
        raise _rejected(exc, scrubber) from None
    except ConnectionClosed as exc:
        if exc.sent is not None and exc.sent.code == CloseCode.MESSAGE_TOO_BIG:
            limit_mb = _MAX_MESSAGE_BYTES // 2**20
            raise ProtocolViolation(f"the service sent a message over {limit_mb} MB") from None
        raise _lost(exc, scrubber, stream is not None and stream.took_audio) from None
    except InvalidHandshake as exc:
        raise Unreachable(f"handshake failed: {exc.__class__.__name__}") from None
    except OSError as exc:
        # A reset during a TLS handshake has no text at all: its class says what happened.
        detail = scrubber.scrub(str(exc.strerror or exc) or exc.__class__.__name__)
        # Refused, DNS, TLS: no session opened. After the upgrade it is a lost connection.
        lost = ConnectionLost if result.connect_s else Unreachable
        raise lost(f"cannot reach the service: {detail}") from None
    return result
