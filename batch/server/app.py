"""The local Pulse-compatible WebSocket server: handshake gate, sessions, lifecycle.

``local_server(...)`` starts it on a loopback port and yields a `LocalServer` with its
URLs and `ServerStats`. Refusals happen in ``process_request``, before the upgrade,
in this order: 404 unknown path, 401 bad key, 400 bad parameter (the stateless gate
in `batch.server.handshake`), then 429 concurrency limit, then injected 429/5xx.
Only requests that pass the stateless gate get a session index (see `faults`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import anyio
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import State

from batch.pulse.protocol import Generation
from batch.server.engines import Engine, make_engine
from batch.server.faults import FaultConfig, FaultDraw, FaultKind, draw_fault
from batch.server.handshake import Admission, Refusal, check_request
from batch.server.stats import ServerStats, SessionRecord
from batch.server.stream import SessionSettings, StreamSession

logger = logging.getLogger(__name__)

# websockets logs request headers at DEBUG; this logger redacts Authorization first.
WIRE_LOGGER_NAME: Final = "batch.server.wire"
DEFAULT_RECOGNIZE_CONCURRENCY: Final = 2
DEFAULT_PARTIAL_INTERVAL_S: Final = 2.0
MAX_MESSAGE_BYTES: Final = 1 << 20


class _RedactAuthorization(logging.Filter):
    """Replaces the value of logged ``Authorization`` headers (websockets DEBUG lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) == 2 and str(args[0]).lower() == "authorization":
            record.args = (args[0], "[redacted]")
        return True


def _wire_logger() -> logging.Logger:
    wire = logging.getLogger(WIRE_LOGGER_NAME)
    if not any(isinstance(f, _RedactAuthorization) for f in wire.filters):
        wire.addFilter(_RedactAuthorization())
    return wire


def format_retry_after(seconds: float) -> str:
    """Whole seconds as an integer (the HTTP form); fractions kept, for fast tests."""
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


class LocalServer:
    """A running server's address, stats and behaviour; create it with `local_server`."""

    def __init__(
        self,
        *,
        engine: Engine,
        api_key: str | None,
        faults: FaultConfig,
        partial_interval_s: float,
        recognize_concurrency: int,
    ) -> None:
        self.engine = engine
        self.faults = faults
        self.stats = ServerStats()
        self.host = "127.0.0.1"
        self.port = 0
        self._api_key = api_key
        self._partial_interval_s = partial_interval_s
        self._limiter = anyio.CapacityLimiter(recognize_concurrency)
        self._next_index = 0
        self._changed = asyncio.Event()  # set (and replaced) whenever a session ends
        # Admitted by process_request, handler not started yet: counts toward the limit.
        self._admitted: dict[ServerConnection, tuple[Admission, int, FaultDraw | None]] = {}
        self._live: set[ServerConnection] = set()
        self._echoes: dict[ServerConnection, str | None] = {}  # echo_authorization fault

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The reference page's endpoint (ends on ``{"type": "end"}``)."""
        return self.url_for(Generation.LEGACY)

    @property
    def unified_url(self) -> str:
        """The unified endpoint (needs ``model=pulse``; ends on ``close_stream``)."""
        return self.url_for(Generation.UNIFIED)

    @property
    def current_url(self) -> str:
        """Today's API reference endpoint (ends on ``close_stream``)."""
        return self.url_for(Generation.CURRENT)

    def url_for(self, generation: Generation) -> str:
        return self.base_url + generation.path

    async def wait_idle(self, timeout_s: float = 5.0, *, open_at_most: int = 0) -> None:
        """Wait until at most ``open_at_most`` sessions are open or being admitted.

        Clients see the close before the server's handler has finished, so tests call
        this before reading final stats. Raises ``TimeoutError``.
        """
        with anyio.fail_after(timeout_s):
            while self.stats.open_now + len(self._admitted) > open_at_most:
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _bind(self, server: Server) -> None:
        sockname = next(iter(server.sockets)).getsockname()
        self.host, self.port = str(sockname[0]), int(sockname[1])

    # --- handshake ---------------------------------------------------------------

    async def answer_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        """`process_request`, after the configured reply latency."""
        if self.faults.reply_latency_s > 0:
            await anyio.sleep(self.faults.reply_latency_s)
        return self.process_request(connection, request)

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """websockets' hook: an HTTP refusal, or None to go on with the upgrade."""
        authorization = request.headers.get("Authorization")
        checked = check_request(request.path, authorization, self._api_key)
        echo = authorization if self.faults.echo_authorization else None
        if isinstance(checked, Refusal):
            return self._refuse(connection, checked, echo)
        index = self._next_index
        self._next_index += 1
        limit = self.faults.max_sessions
        if limit is not None and self._concurrent() >= limit:
            reason = f"too many concurrent sessions (limit {limit}); retry later"
            return self._refuse(connection, Refusal(429, reason, self.faults.retry_after_s), echo)
        fault = self._assign_fault(index)
        if fault is not None and fault.kind is FaultKind.REFUSE_429:
            reason = "injected fault: rate limited; retry later"
            return self._refuse(connection, Refusal(429, reason, self.faults.retry_after_s), echo)
        if fault is not None and fault.kind is FaultKind.REFUSE_5XX:
            reason = "injected fault: service unavailable; retry later"
            return self._refuse(connection, Refusal(self.faults.refuse_5xx_status, reason), echo)
        self._admitted[connection] = (checked, index, fault)
        self._echoes[connection] = echo
        # If the upgrade never completes, the handler never runs: free the slot anyway.
        connection.connection_lost_waiter.add_done_callback(lambda _: self._forget(connection))
        return None

    def _concurrent(self) -> int:
        """Sessions being admitted or open, less those already closing: a client that
        got its close has freed its slot, even if our handler has not returned yet."""
        live = sum(1 for c in self._live if c.state in (State.CONNECTING, State.OPEN))
        return live + len(self._admitted)

    def _forget(self, connection: ServerConnection) -> None:
        self._echoes.pop(connection, None)
        if self._admitted.pop(connection, None) is not None:
            self._notify()

    def _assign_fault(self, index: int) -> FaultDraw | None:
        """The session's fault, unless ``fault_limit`` faults were already handed out."""
        limit = self.faults.fault_limit
        if limit is not None and self.stats.faults_total >= limit:
            return None
        fault = draw_fault(self.faults, index)
        if fault is not None:
            self.stats.faults[fault.kind] += 1
        return fault

    def _refuse(
        self, connection: ServerConnection, refusal: Refusal, echo: str | None = None
    ) -> Response:
        self.stats.refused[refusal.status] += 1
        logger.info("refused handshake: %d %s", refusal.status, refusal.reason)
        body = refusal.reason + (f" (request had Authorization: {echo})" if echo else "")
        response = connection.respond(refusal.status, body + "\n")
        if refusal.retry_after_s is not None:
            raw = self.faults.retry_after_header
            value = raw if raw is not None else format_retry_after(refusal.retry_after_s)
            response.headers["Retry-After"] = value
        return response

    # --- sessions ----------------------------------------------------------------

    async def handle(self, connection: ServerConnection) -> None:
        """websockets' connection handler: run one admitted session to its end."""
        admitted = self._admitted.pop(connection, None)
        if admitted is None:  # cannot happen: process_request admits every upgrade
            await connection.close(1011, "session was not admitted")
            return
        admission, index, fault = admitted
        session_id = f"sess_{uuid.uuid4().hex[:16]}"
        record = SessionRecord(
            session_id=session_id,
            session_index=index,
            path=admission.path,
            query=admission.query,
            fault=fault.kind if fault is not None else None,
            user_agent=connection.request.headers.get("User-Agent") if connection.request else None,
        )
        settings = SessionSettings(
            session_id=session_id,
            options=admission.options,
            generation=admission.generation,
            engine=self.engine,
            limiter=self._limiter,
            partial_interval_s=self._partial_interval_s,
            fault=fault,
            echo=self._echoes.pop(connection, None),
            reply_latency_s=self.faults.reply_latency_s,
        )
        self._live.add(connection)
        self.stats.session_opened(record, self._concurrent())
        try:
            outcome = await StreamSession(connection, settings, record).run()
            record.outcome = outcome.value
        finally:
            self._live.discard(connection)
            self.stats.session_closed()
            self._notify()


@asynccontextmanager
async def local_server(
    *,
    engine: str | Engine = "synthetic",
    api_key: str | None = None,
    faults: FaultConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    partial_interval_s: float | None = None,
    recognize_concurrency: int | None = None,
) -> AsyncIterator[LocalServer]:
    """Serve until the block exits; port 0 picks a free ephemeral port.

    ``api_key=None`` accepts any (or no) key. ``partial_interval_s`` and
    ``recognize_concurrency`` default to the engine's ``partial_interval_s`` and
    ``max_concurrency`` attributes when it has them. On exit open sessions are closed
    (1001) and handlers awaited. Raises ``OSError`` if the port cannot be bound.
    """
    chosen = make_engine(engine) if isinstance(engine, str) else engine
    server = LocalServer(
        engine=chosen,
        api_key=api_key,
        faults=faults or FaultConfig(),
        partial_interval_s=partial_interval_s
        or float(getattr(chosen, "partial_interval_s", DEFAULT_PARTIAL_INTERVAL_S)),
        recognize_concurrency=recognize_concurrency
        or int(getattr(chosen, "max_concurrency", DEFAULT_RECOGNIZE_CONCURRENCY)),
    )
    async with serve(
        server.handle,
        host,
        port,
        process_request=server.answer_request,
        compression=None,
        max_size=MAX_MESSAGE_BYTES,
        logger=_wire_logger(),
    ) as ws_server:
        server._bind(ws_server)
        logger.info("local Pulse server listening on %s", server.base_url)
        yield server
