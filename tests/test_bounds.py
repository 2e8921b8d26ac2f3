"""Bounded waiting: Retry-After values a service should never send, a service that
refuses everything and an endpoint that cannot be reached end in bounded time (exit 6),
never in a sleep for days."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from batch.errors import HandshakeRejected
from batch.job import JobResult, run_job
from batch.manifest import load_manifest
from batch.pool import RefusalStreak
from batch.server import FaultConfig, local_server
from batch.session import _retry_after_s
from tests.conftest import TIME_UNIT_S, point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_files

ITEMS = 6


def _media(folder: Path) -> None:
    tone_files(folder, ITEMS, [Burst(0.3, 0.2, 440)], 1.0)


def _run(tmp_path: Path, faults: FaultConfig, **run: Any) -> tuple[Any, dict[str, Any], Any]:
    _media(tmp_path / "media")
    settings = {"concurrency": 3, "pace": 0, "max_attempts": 3, "backoff_initial_s": 0.05,
                "backoff_max_s": 0.3, **run}  # fmt: skip
    manifest = write_manifest(tmp_path, run=settings)
    with server_in_thread(faults=faults) as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest))
        stats = server.stats
    assert "report: " in done.stdout, done.stdout + done.stderr
    report = json.loads(Path(done.stdout.split("report: ")[1].split()[0]).read_text())
    return done, report, stats


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("2", 2.0),
        ("0.25", 0.25),
        ("inf", None),
        ("-inf", None),
        ("nan", None),
        ("-3", None),
        ("soon", None),
        ("", None),
        ("1e8", 1e8),
    ],
)
def test_retry_after_header_values(header: str, expected: float | None) -> None:
    assert _retry_after_s({"Retry-After": header}) == expected


def test_retry_after_http_date_is_seconds_from_now() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    seconds = _retry_after_s({"Retry-After": when})
    assert seconds is not None and 25 <= seconds <= 31
    past = format_datetime(datetime.now(UTC) - timedelta(days=1), usegmt=True)
    assert _retry_after_s({"Retry-After": past}) == 0.0


@pytest.mark.parametrize("header", ["inf", "1e8", "nan", "soon"])
def test_odd_retry_after_never_stalls_the_job(header: str, tmp_path: Path) -> None:
    faults = FaultConfig(seed=4, refuse_429_rate=0.5, fault_limit=6, retry_after_header=header)
    done, report, stats = _run(tmp_path, faults)
    assert stats.refused[429] >= 2, "the odd Retry-After must really have been sent"
    assert done.returncode == 0, done.stderr
    assert report["items"]["ok"] == ITEMS
    # Capped at backoff_max_s (0.3 s): six refusals cost seconds, not 1e8 s or forever.
    assert report["wall_s"] < 20


def test_service_refusing_everything_stops_with_exit_6(tmp_path: Path) -> None:
    faults = FaultConfig(refuse_429_rate=1.0, retry_after_s=0.01)
    done, report, stats = _run(tmp_path, faults, max_refusals_in_a_row=8)
    assert done.returncode == 6, done.stdout + done.stderr
    assert "refused 8 sessions in a row" in done.stderr
    assert report["status"] == "aborted" and report["abort_kind"] == "service_refusing"
    assert report["items"]["ok"] == 0 and report["items"]["not_run"] == ITEMS
    # Stopped at the limit, give or take the attempts already in flight.
    assert 8 <= stats.refused[429] <= 8 + 3
    assert stats.sessions_opened == 0


def test_service_failing_every_handshake_with_503_stops_too(tmp_path: Path) -> None:
    faults = FaultConfig(refuse_5xx_rate=1.0)
    done, report, stats = _run(tmp_path, faults, max_refusals_in_a_row=5, max_attempts=50)
    assert done.returncode == 6, done.stdout + done.stderr
    assert report["abort_kind"] == "service_refusing"
    assert stats.refused[503] <= 5 + 3


def test_refusals_while_sessions_succeed_do_not_stop_the_job(tmp_path: Path) -> None:
    # One session at a time on the server, four in the pool: many 429s, but never with
    # none of ours open, so a small streak limit is never reached.
    faults = FaultConfig(max_sessions=1, retry_after_s=0.01)
    done, report, stats = _run(
        tmp_path, faults, concurrency=4, pace=4.0, max_refusals_in_a_row=8, max_attempts=1
    )
    assert stats.refused[429] >= 3, "the server's limit must really have refused sessions"
    assert done.returncode == 0, done.stdout + done.stderr
    assert report["items"]["ok"] == ITEMS


def test_streak_counts_only_refusals_with_nothing_open() -> None:
    streak = RefusalStreak(3)
    refused = HandshakeRejected(429)
    assert refused and not streak.refused() and not streak.refused()
    watch = streak.watch()
    watch.opened()  # a session got through: the count starts again
    assert streak.count == 0
    assert not any(streak.refused() for _ in range(10))  # one of ours is open
    watch.ended()
    watch.ended()  # ending twice does not go negative
    assert streak.open_now == 0
    assert [streak.refused() for _ in range(3)] == [False, False, True]


def test_fault_settings_for_odd_answers_are_checked() -> None:
    from batch.server.faults import FaultConfigError

    assert FaultConfig(retry_after_header="inf").retry_after_header == "inf"
    with pytest.raises(FaultConfigError, match="retry_after_header"):
        FaultConfig(retry_after_header="1\r\nX-Injected: yes")
    with pytest.raises(FaultConfigError, match="echo_authorization"):
        FaultConfig.from_mapping({"echo_authorization": "yes"})


LEGACY_PATH = "/api/v1/pulse/get_text"
FAST_RETRIES = {"concurrency": 3, "pace": 0, "backoff_initial_s": 0.05, "backoff_max_s": 0.3}


@contextlib.contextmanager
def _dead_port() -> Iterator[socket.socket]:
    """A loopback port held bound but not listening: every connection is refused, and no
    other process can take the port while the socket is open."""
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", 0))
        yield blocker
    finally:
        blocker.close()


def _report(done: Any) -> dict[str, Any]:
    assert "report: " in done.stdout, done.stdout + done.stderr
    return dict(json.loads(Path(done.stdout.split("report: ")[1].split()[0]).read_text()))


def _run_against(tmp_path: Path, endpoint: str, **run: Any) -> tuple[Any, dict[str, Any]]:
    _media(tmp_path / "media")
    manifest = write_manifest(
        tmp_path,
        pulse={"endpoint": endpoint, "local_engine": "synthetic"},
        run={**FAST_RETRIES, **run},
    )
    done = run_cli("run", str(manifest), env={"SMALLEST_API_KEY": "sk-unreach-5ecret"})
    return done, _report(done)


def test_endpoint_with_nothing_listening_stops_with_exit_6(tmp_path: Path) -> None:
    with _dead_port() as blocker:
        port = blocker.getsockname()[1]
        # Enough attempts per item that, without the streak, each would grind on for ages.
        done, report = _run_against(
            tmp_path, f"ws://127.0.0.1:{port}{LEGACY_PATH}", max_attempts=50,
            max_refusals_in_a_row=6,
        )  # fmt: skip
    assert done.returncode == 6, done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert f"cannot reach the service at 127.0.0.1:{port}" in said
    # Sessions failing at the same moment can take the streak past 6 before the stop.
    in_a_row = re.search(r"(\d+) connection attempts in a row", said)
    assert in_a_row is not None and int(in_a_row.group(1)) >= 6, said
    assert "pulse.endpoint" in said
    assert "sk-unreach-5ecret" not in done.stdout + done.stderr
    assert report["status"] == "aborted" and report["abort_kind"] == "service_unreachable"
    assert "sk-unreach-5ecret" not in json.dumps(report)
    # No item used up its attempts: none has a row, a rerun does them all.
    assert report["items"]["ok"] == 0 and report["items"]["failed"] == 0
    assert report["items"]["not_run"] == ITEMS
    assert not (tmp_path / "out" / "transcripts").exists()
    assert report["wall_s"] < 20  # 50 attempts x 6 items would take minutes


def test_tls_to_a_plain_server_stops_with_exit_6(tmp_path: Path) -> None:
    with server_in_thread() as server:
        endpoint = server.url.replace("ws://", "wss://")
        done, report = _run_against(tmp_path, endpoint, max_attempts=50, max_refusals_in_a_row=4)
        opened = server.stats.sessions_opened
    assert done.returncode == 6, done.stdout + done.stderr
    said = " ".join(done.stderr.split())
    assert f"cannot reach the service at 127.0.0.1:{server.port}" in said
    assert report["abort_kind"] == "service_unreachable"
    assert "ConnectionResetError" in said or "SSL" in said  # what failed, never empty
    assert opened == 0


class _FailedAttempts(logging.Handler):
    """Counts the pool's retry log lines (how many connections failed) and
    sets ``enough`` at ``wanted``; the pool logs on the event loop's thread."""

    def __init__(self, wanted: int) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self.wanted = wanted
        self.enough: anyio.Event | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) == "session_retry":
            self.count += 1
            if self.count >= self.wanted and self.enough is not None:
                self.enough.set()


def test_a_short_outage_does_not_stop_the_job(tmp_path: Path) -> None:
    """Three failed connections in a row, then the server is up: a streak of 5 is never
    reached, every item is done, exit code 0."""
    _media(tmp_path / "media")
    failed = _FailedAttempts(3)
    pool_logger = logging.getLogger("batch.pool")
    pool_logger.addHandler(failed)
    level = pool_logger.level
    pool_logger.setLevel(logging.INFO)

    async def scenario(blocker: socket.socket) -> tuple[JobResult, int]:
        port = blocker.getsockname()[1]
        manifest = write_manifest(
            tmp_path,
            pulse={"endpoint": f"ws://127.0.0.1:{port}{LEGACY_PATH}", "local_engine": "synthetic"},
            run={**FAST_RETRIES, "concurrency": 1, "max_attempts": 10,
                 "max_refusals_in_a_row": 5, "backoff_initial_s": 0.2},
        )  # fmt: skip
        results: list[JobResult] = []
        finished = anyio.Event()
        failed.enough = anyio.Event()

        async def job() -> None:
            results.append(await run_job(load_manifest(manifest)))
            finished.set()

        with anyio.fail_after(60 * TIME_UNIT_S):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(job)
                await failed.enough.wait()
                blocker.close()  # the outage ends: the service comes up on the same port
                async with local_server(engine="synthetic", port=port) as server:
                    await finished.wait()
                    opened = server.stats.sessions_opened
        return results[0], opened

    try:
        with _dead_port() as blocker:
            result, opened = anyio.run(scenario, blocker)
    finally:
        pool_logger.removeHandler(failed)
        pool_logger.setLevel(level)
    assert failed.count >= 3
    assert result.report["status"] == "completed", result.report.get("abort_reason")
    assert result.report["items"]["ok"] == ITEMS
    assert opened == ITEMS
