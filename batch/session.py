"""One Pulse streaming session: connect, send paced audio, collect finals until ``is_last``.

This is the I/O edge for the service, and only that: it moves bytes and waits, while
`batch.pulse.machine.SessionMachine` decides everything else (the end signal, finals and
``is_last``, the final wait, the reply budget, liveness, reuse's units). websockets errors
are translated here into the `batch.errors` tree; nothing above this module sees a
third-party exception. The API key travels in the Authorization header only and never
appears in an error message.
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import anyio.lowlevel
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import CloseCode
from websockets.http11 import USER_AGENT

from batch import hangup, pacing, stallwatch
from batch.credentials import Scrubber
from batch.errors import (
    ConnectionLost,
    HandshakeRejected,
    InputError,
    ProtocolViolation,
    PulseBatchError,
    SessionTimeout,
    Unreachable,
)
from batch.hangup import ResettingConnection
from batch.pulse import protocol
from batch.pulse.bounds import DEFAULT_BOUNDS, ReplyBounds
from batch.pulse.machine import ANSWERED, COMPLETED, DEFAULT_TIMEOUTS, SessionMachine, UnitFinalised
from batch.pulse.machine import SessionResult as SessionResult
from batch.pulse.machine import Timeouts as Timeouts
from batch.readahead import AudioSource as AudioSource  # what sessions stream
from batch.readahead import ReadAhead
from batch.speech_gauge import SpeechGauge

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


def _retry_after_s(headers: Any) -> float | None:
    """Seconds the service asks us to wait: delta-seconds or an HTTP date. Anything else
    (``inf``, ``nan``, negative, garbage) is ignored and our own backoff applies; the
    caller caps what is left (`batch.retry.Backoff`)."""
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
    """The two halves of a session over one open connection; `SessionMachine` decides."""

    def __init__(
        self,
        ws: ClientConnection,
        machine: SessionMachine,
        deadline: anyio.CancelScope | None = None,
        on_unit: Callable[[UnitFinalised], None] | None = None,
    ) -> None:
        self.ws = ws
        self.machine = machine
        self.write_timeout_s = machine.timeouts.write_timeout_s
        self.deadline = deadline  # the session's, moved later as audio is sent
        self.on_unit = on_unit
        self.gauge: SpeechGauge | None = None
        self._paced_from = 0.0  # pacing's origin: the loop's clock
        self._grid = pacing.grid()  # the loop's, made in it
        self._waiting: anyio.CancelScope | None = None
        self._answer = anyio.Event()

    async def _send(self, data: str | bytes) -> None:
        await pacing.send(self.ws, data, self.write_timeout_s)

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
        machine = self.machine
        await self._send(machine.end_signal())
        machine.ended(anyio.current_time())
        if self._waiting is not None:  # a wait begun before the end signal is now bounded too
            self._waiting.deadline = machine.receive_deadline

    async def _send_chunk(self, chunk: bytes, position_s: float, pace: float) -> None:
        """Send one chunk, then wait until ``position_s`` (the audio sent with it) is due.
        An empty chunk ends a unit of a reused session (`batch.reuse`): ``finalize``."""
        machine = self.machine
        if not chunk:
            await self._send(machine.finalize())
            return
        if machine.started_at is None:
            self._paced_from = anyio.current_time()
            machine.begin_audio(self._paced_from)
        if machine.must_hold:  # the service is silent: none until it answers
            self._answer = anyio.Event()
            await stallwatch.hold(machine, self._send, self._answer, anyio.current_time())
        await pacing.send(self.ws, chunk, self.write_timeout_s)
        gauge = self.gauge
        machine.sent(position_s, gauge.take() if gauge is not None else None)
        deadline = self.deadline
        if deadline is not None:
            grown = machine.session_deadline
            if grown > deadline.deadline:  # a move reschedules its timer: only if later
                deadline.deadline = grown
        if pace > 0:  # on a grid shared by all sessions: one wake serves many (`pacing`)
            await self._grid.wait_until(self._paced_from + position_s / pace)
        else:
            await anyio.lowlevel.checkpoint()  # unpaced: still let other sessions run

    async def receive(self) -> None:
        machine, ws = self.machine, self.ws
        with anyio.CancelScope() as scope:  # one for the session, not one per message
            self._waiting = scope
            while True:
                if machine.end_sent:  # the final wait: from the signal or the last message
                    scope.deadline = machine.receive_deadline
                raw = await ws.recv()
                for event in machine.receive(raw, anyio.current_time()):
                    if event is COMPLETED:
                        return
                    if event is ANSWERED:
                        self._answer.set()
                    elif isinstance(event, UnitFinalised) and self.on_unit is not None:
                        self.on_unit(event)
        raise machine.final_timeout()  # the scope ran out: cancelled


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
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    user_agent: str | None = None,
    on_open: Callable[[], None] | None = None,
    label: str | None = None,
    bounds: ReplyBounds = DEFAULT_BOUNDS,
    result: SessionResult | None = None,
    on_unit: Callable[[UnitFinalised], None] | None = None,
) -> SessionResult:
    """Stream ``audio`` through one session, paced by its ``position_s``; return the finals.
    ``on_open`` is called once the service has accepted the session (the upgrade passed).

    ``label`` names what is streamed (the source, its channel, its piece) in the session's
    log lines. ``bounds`` limits what the service may send (`batch.pulse.bounds`).
    ``user_agent`` replaces websockets' User-Agent (the runner names itself and its shard,
    for anyone reading the service's logs). ``result``, filled in place, keeps a failed
    session's finals. ``on_unit``: the audio is units of a reused session, an empty chunk
    between each two (`batch.reuse`); it hears each unit as it is known complete.
    Complete only at ``is_last``. Raises `SessionError` subclasses (see
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
                machine = SessionMachine(
                    endpoint.generation,
                    options,
                    anyio.current_time(),
                    timeouts=timeouts,
                    bounds=bounds,
                    scrubber=scrubber,
                    result=result,
                    units=on_unit is not None,
                    label=label or "a session",
                )
                stream = _Stream(ws, machine, deadline, on_unit)
                audio, stream.gauge = stallwatch.gauged(audio, machine, options)
                try:
                    await _stream_both(stream, audio, pace)
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
        raise _lost(
            exc, scrubber, stream is not None and stream.machine.took_audio(anyio.current_time())
        ) from None
    except InvalidHandshake as exc:
        raise Unreachable(f"handshake failed: {exc.__class__.__name__}") from None
    except OSError as exc:
        # A reset during a TLS handshake has no text at all: its class says what happened.
        detail = scrubber.scrub(str(exc.strerror or exc) or exc.__class__.__name__)
        # Refused, DNS, TLS: no session opened. After the upgrade it is a lost connection.
        lost = ConnectionLost if result.connect_s else Unreachable
        raise lost(f"cannot reach the service: {detail}") from None
    return result
