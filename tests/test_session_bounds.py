"""Sessions are bounded whatever the service does: a budget on what it may send, a peer that
stops reading is dropped (and its socket aborted at once), a close after the service took
the audio is a failed attempt, and no session starts once the run is stopping."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from batch.errors import ConnectionLost, classify, is_refusal
from batch.hangup import ResettingConnection
from batch.job import JobResult, RunOptions, run_job
from batch.manifest import load_manifest
from batch.pulse import protocol
from batch.pulse.bounds import ReplyBounds, ReplyMeter
from batch.server import FaultConfig
from tests.conftest import TIME_UNIT_S, point_at, server_in_thread, write_manifest
from tests.media import Burst, tone_files
from tests.tables import sql

BURSTS = [Burst(0.3, 0.2, 440), Burst(1.2, 0.2, 660)]


def _rows(out: Path) -> list[tuple[Any, ...]]:
    return sql(out, "select status, error_kind, error, attempts from {transcripts} order by source")


# --- the budget, pure ------------------------------------------------------------


def test_budget_grows_with_the_audio_sent() -> None:
    bounds = ReplyBounds(chars_per_audio_s=100, messages_per_audio_s=2, chars_slack=50,
                         messages_slack=3)  # fmt: skip
    meter = ReplyMeter(bounds)
    assert meter.take(50, 0.0) is None  # the slack alone
    over = meter.take(1, 0.0)
    assert over is not None and "51 characters" in over and "max_reply_chars" in over
    meter = ReplyMeter(bounds)
    assert meter.take(300, 3.0) is None  # 50 + 3 x 100
    assert all(meter.take(1, 3.0) is None for _ in range(8))  # 3 + 3 x 2 messages in all
    flood = meter.take(1, 3.0)
    assert flood is not None and "10 messages" in flood and "max_replies" in flood


def test_error_false_on_a_final_is_no_error() -> None:
    for value in ("false", '""', "null"):
        text = f'{{"transcript": "hi", "is_final": true, "is_last": true, "error": {value}}}'
        message = protocol.parse_message(text)
        assert isinstance(message, protocol.Transcription) and message.transcript == "hi"
    for value in ("true", '"quota"', '{"message": "quota"}'):
        text = f'{{"transcript": "hi", "is_final": true, "error": {value}}}'
        assert isinstance(protocol.parse_message(text), protocol.ServerError)


def test_a_close_after_the_audio_is_no_refusal() -> None:
    early = ConnectionLost("limit", close_code=1008)
    late = ConnectionLost("limit", close_code=1008, after_audio=True)
    assert classify(early).overloaded and is_refusal(early)
    assert not classify(late).overloaded and not is_refusal(late) and classify(late).retry


# --- misbehaving servers in the test ---------------------------------------------

Handler = Callable[[ServerConnection], Awaitable[None]]


@contextlib.asynccontextmanager
async def odd_server(handler: Handler) -> AsyncIterator[str]:
    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}{protocol.LEGACY_PATH}"


async def _until_end(ws: ServerConnection) -> None:
    async for message in ws:
        if isinstance(message, str) and json.loads(message).get("type") == "end":
            return


def _final(text: str, *, is_last: bool = False, is_final: bool = True) -> str:
    return json.dumps({"session_id": "odd", "transcript": text, "is_final": is_final,
                       "is_last": is_last})  # fmt: skip


async def _run(tmp_path: Path, url: str, **run: Any) -> JobResult:
    tone_files(tmp_path / "media", 1, BURSTS, 3.0)
    settings = {"concurrency": 1, "pace": 0, "max_attempts": 2, "backoff_initial_s": 0.05,
                "final_timeout_s": 5.0 * TIME_UNIT_S, **run}  # fmt: skip
    manifest = write_manifest(tmp_path, run=settings)
    point_at(manifest, url)
    return await run_job(load_manifest(manifest), RunOptions())


@pytest.mark.anyio
async def test_many_large_finals_fail_the_item_and_memory_stays_flat(tmp_path: Path) -> None:
    big = _final("x" * 4_000_000)  # 40 of these: 160 MB for a 3 s file
    sent: list[int] = []

    async def flood(ws: ServerConnection) -> None:
        count = 0
        with contextlib.suppress(ConnectionClosed):
            await _until_end(ws)
            for _ in range(40):
                await ws.send(big)
                count += 1
            await ws.send(_final("", is_last=True))
        sent.append(count)

    tracemalloc.start()
    try:
        async with odd_server(flood) as url:
            result = await _run(tmp_path, url)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.report["items"]["failed"] == 1
    [(status, kind, error, attempts)] = _rows(tmp_path / "out")
    assert (status, kind, attempts) == ("failed", "protocol", 2)  # retried, as usual
    assert "characters for 3.0 s of audio" in error
    assert len(sent) == 2 and max(sent) < 40  # dropped long before the flood's end
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.0f} MB"  # a few frames, not 160 MB


@pytest.mark.anyio
async def test_a_cumulative_full_transcript_counts_only_what_it_adds(tmp_path: Path) -> None:
    # 100 finals, each repeating the whole transcript so far: 5 MB of frames for a 3 s
    # file, five times its budget if counted whole, though only the latest is kept.
    words = [f"{i:03d}" + "w" * 996 for i in range(100)]

    async def cumulative(ws: ServerConnection) -> None:
        await _until_end(ws)
        for i, word in enumerate(words):
            message = {"transcript": word, "is_final": True, "is_last": i == len(words) - 1,
                       "full_transcript": " ".join(words[: i + 1])}  # fmt: skip
            await ws.send(json.dumps(message))
        await ws.wait_closed()

    async with odd_server(cumulative) as url:
        tone_files(tmp_path / "media", 1, BURSTS, 3.0)
        manifest = write_manifest(tmp_path, run={"pace": 0, "max_attempts": 1},
                                  pulse={"full_transcript": True})  # fmt: skip
        point_at(manifest, url)
        result = await run_job(load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 1, result.report["failures"]
    [(full,)] = sql(tmp_path / "out", "select full_transcript from {transcripts}")
    assert full == " ".join(words)


@pytest.mark.anyio
async def test_a_message_over_4_mb_is_a_protocol_failure(tmp_path: Path) -> None:
    async def huge(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await _until_end(ws)
            await ws.send(_final("x" * 5_000_000, is_last=True))
            await ws.wait_closed()

    async with odd_server(huge) as url:
        result = await _run(tmp_path, url, max_attempts=1)
    assert result.report["items"]["failed"] == 1
    [(status, kind, error, _)] = _rows(tmp_path / "out")
    assert (status, kind) == ("failed", "protocol") and "a message over 4 MB" in error


@pytest.mark.anyio
async def test_a_flood_of_partials_ends_the_session(tmp_path: Path) -> None:
    partial = _final("a", is_final=False)

    async def flood(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            await ws.recv()  # the first audio
            for _ in range(20_000):
                await ws.send(partial)
            await _until_end(ws)
            await ws.send(_final("hello", is_last=True))

    async with odd_server(flood) as url:
        result = await _run(tmp_path, url, max_attempts=1)
    assert result.report["items"]["failed"] == 1
    [(status, kind, error, _)] = _rows(tmp_path / "out")
    # Without a budget the 20,000 partials are read, parsed and dropped: an ok row.
    assert (status, kind) == ("failed", "protocol") and "messages for" in error


# --- a deaf peer -----------------------------------------------------------------


class DeafServer:
    """Accepts TCP, answers the WebSocket upgrade, then never reads again (small receive
    buffer), as a hung or hostile peer does. Keeps every socket open until it stops."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted.append(conn)
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            key = next(
                line.split(b":", 1)[1].strip()
                for line in request.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            magic = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
            accept = base64.b64encode(hashlib.sha1(key + magic).digest())
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )  # and never read again

    @contextlib.contextmanager
    def running(self) -> Iterator[DeafServer]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            for conn in self.accepted:
                conn.close()
            self.listener.close()


def _client_sockets(port: int) -> list[str]:
    """Statuses of this process's TCP sockets connected to ``port`` (the client's side)."""
    connections = psutil.Process().net_connections(kind="tcp")
    return [c.status for c in connections if c.raddr and c.raddr.port == port]


def _orphans(port: int) -> int:
    """Sockets to ``port`` still closing, held by any process or none (FIN-WAIT orphans)."""
    closing = {psutil.CONN_FIN_WAIT1, psutil.CONN_FIN_WAIT2, psutil.CONN_CLOSING,
               psutil.CONN_LAST_ACK}  # fmt: skip
    connections = psutil.net_connections(kind="tcp")
    return sum(1 for c in connections if c.raddr and c.raddr.port == port and c.status in closing)


def test_a_peer_that_stops_reading_is_dropped_and_its_sockets_aborted(tmp_path: Path) -> None:
    # 7.7 MB of audio each: more than the kernel's send buffer can grow to (4 MB).
    tone_files(tmp_path / "media", 3, BURSTS, 240.0)
    run = {"concurrency": 2, "pace": 0, "max_attempts": 1,
           "write_timeout_s": 0.5 * TIME_UNIT_S}  # fmt: skip
    manifest = write_manifest(tmp_path, run=run)
    most = 0
    with DeafServer().running() as deaf:
        point_at(manifest, f"ws://127.0.0.1:{deaf.port}{protocol.LEGACY_PATH}")
        done = threading.Event()

        def count() -> None:
            nonlocal most
            while not done.is_set():
                most = max(most, _client_sockets(deaf.port).count("ESTABLISHED"))
                time.sleep(0.01)

        counter = threading.Thread(target=count)
        counter.start()
        began = time.monotonic()
        try:
            result = anyio.run(run_job, load_manifest(manifest), RunOptions())
        finally:
            done.set()
            counter.join()
        took_s = time.monotonic() - began
        left = _client_sockets(deaf.port)
        orphans = _orphans(deaf.port)
        sessions = len(deaf.accepted)
    assert result.report["items"]["failed"] == 3
    rows = _rows(tmp_path / "out")
    assert {(status, kind) for status, kind, _, _ in rows} == {("failed", "timeout")}
    assert all("write_timeout_s" in error for _, _, error, _ in rows)
    assert sessions == 3
    assert 1 <= most <= 2, most  # never more open than run.concurrency
    assert left == [] and orphans == 0  # aborted: nothing lingers after the run
    assert took_s < 30 * TIME_UNIT_S  # not the session deadline (60 s x 1.5 + 60)


@pytest.mark.anyio
async def test_a_connection_websockets_gives_up_on_is_reset_not_left_in_fin_wait() -> None:
    # Paced, a deaf peer's buffers fill slowly, so websockets' keepalive ends the session
    # first (20 s + 20 s, then close_timeout) and aborts the transport itself, outside our
    # `abort`: a plain abort left the socket in FIN-WAIT holding the queued audio.
    with DeafServer().running() as deaf:
        url = f"ws://127.0.0.1:{deaf.port}{protocol.LEGACY_PATH}"
        quick = {"ping_interval": 0.1, "ping_timeout": 0.1, "close_timeout": 0.1}
        async with connect(url, create_connection=ResettingConnection, **quick) as ws:
            for _ in range(4):  # queued behind the peer's small receive buffer
                await ws.send(b"\0" * 65536)
            with anyio.fail_after(5):
                await ws.wait_closed()  # the pong never came
        assert ws.close_code == 1006
        assert _client_sockets(deaf.port) == [] and _orphans(deaf.port) == 0


# --- late refusals, and stopping --------------------------------------------------


def test_a_1008_after_the_end_signal_counts_against_max_attempts(tmp_path: Path) -> None:
    tone_files(tmp_path / "media", 1, BURSTS, 2.0)
    run = {"concurrency": 1, "pace": 0, "max_attempts": 2, "backoff_initial_s": 0.05,
           "max_refusals_in_a_row": 3}  # fmt: skip
    manifest = write_manifest(tmp_path, run=run)
    with server_in_thread(faults=FaultConfig(late_1008_rate=1.0)) as server:
        point_at(manifest, server.url)
        result = anyio.run(run_job, load_manifest(manifest), RunOptions())
        opened = server.stats.sessions_opened
    assert opened == 2  # max_attempts, not 50 "overloads" (nor forever)
    assert result.report["status"] == "completed"  # a failed item, not a refusing service
    [(status, kind, error, attempts)] = _rows(tmp_path / "out")
    assert (status, kind, attempts) == ("failed", "connection_lost", 2)
    assert "after the service took the audio" in error and "1008" in error


@pytest.mark.anyio
async def test_a_1008_partway_through_the_audio_counts_against_max_attempts(
    tmp_path: Path,
) -> None:
    # Over 2 s by nature: the service reads past the refusal window before it closes.
    opened: list[float] = []

    async def read_then_close_1008(ws: ServerConnection) -> None:
        opened.append(time.monotonic())
        with anyio.move_on_after(2.6):
            async for _ in ws:
                pass
        await ws.close(1008, "session limit")

    async with odd_server(read_then_close_1008) as url:
        result = await _run(
            tmp_path, url, pace=1.0, max_attempts=1, max_refusals_in_a_row=2, backoff_max_s=0.2
        )
    assert len(opened) == 1  # one attempt, not a "refusal" retried until the stop
    assert result.report["status"] == "completed"
    [(status, kind, error)] = sql(
        tmp_path / "out", "select status, error_kind, error from {transcripts}"
    )
    assert (status, kind) == ("failed", "connection_lost")
    assert "after the service took the audio" in error and "1008" in error


def test_no_session_starts_after_sigterm(tmp_path: Path) -> None:
    # One slot, two workers: while the first item streams, the second waits for the slot.
    tone_files(tmp_path / "media", 3, BURSTS, 3.0)
    run = {"concurrency": 1, "pace": 2.0, "max_attempts": 1}
    manifest = write_manifest(tmp_path, run=run)
    with server_in_thread() as server:
        point_at(manifest, server.url)

        def terminate_once_streaming() -> None:
            deadline = time.monotonic() + 20 * TIME_UNIT_S
            while time.monotonic() < deadline:
                if server.stats.open_now >= 1 and server.stats.sessions[0].audio_s > 0.3:
                    os.kill(os.getpid(), signal.SIGTERM)  # the run's handler takes it
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=terminate_once_streaming)
        killer.start()
        options = RunOptions(handle_signals=True, grace_s=20 * TIME_UNIT_S)
        try:
            result = anyio.run(run_job, load_manifest(manifest), options)
        finally:
            killer.join()
        opened = server.stats.sessions_opened
    assert result.signal_name == "SIGTERM"
    assert opened == 1, "a worker waiting for the slot opened a session after SIGTERM"
    assert result.report["items"]["ok"] == 1  # the one in flight finished in its grace
    assert [row[0] for row in _rows(tmp_path / "out")] == ["ok"]  # the others get no row
