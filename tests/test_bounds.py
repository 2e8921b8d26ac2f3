"""Bounded waiting: Retry-After values a service should never send, and a service that
refuses everything, end in bounded time (exit 6), never in a sleep for days."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from batch.errors import HandshakeRejected
from batch.pool import RefusalStreak
from batch.server import FaultConfig
from batch.session import _retry_after_s
from tests.conftest import point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_files

ITEMS = 6


def _run(tmp_path: Path, faults: FaultConfig, **run: Any) -> tuple[Any, dict[str, Any], Any]:
    tone_files(tmp_path / "media", ITEMS, [Burst(0.3, 0.2, 440)], 1.0)
    settings = {"concurrency": 3, "pace": 0, "max_attempts": 3, "backoff_initial_s": 0.05,
                "backoff_max_s": 0.3, **run}  # fmt: skip
    manifest = write_manifest(tmp_path, run=settings)
    with server_in_thread(faults=faults) as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest), timeout_s=60)
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
