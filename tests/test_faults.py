"""The fault matrix: every injected fault ends with every good item ok, exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import pytest

from batch.server import FaultConfig
from tests.conftest import run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_track, write_audio

ITEMS = 8
BURSTS = [Burst(0.3, 0.2, 440), Burst(0.9, 0.2, 660), Burst(1.5, 0.2, 880)]


def _media(folder: Path) -> None:
    folder.mkdir()
    track = tone_track(BURSTS, 2.0, 16000)
    for i in range(ITEMS):
        write_audio(folder / f"item-{i}.wav", [track], 16000)


def _run_against(
    tmp_path: Path, faults: FaultConfig, **sections: Any
) -> tuple[int, dict[str, Any], Any]:
    _media(tmp_path / "media")
    run = {"concurrency": 4, "pace": 0, "max_attempts": 6, "backoff_initial_s": 0.05,
           "backoff_max_s": 0.5, "final_timeout_s": 1.0, **sections.get("run", {})}  # fmt: skip
    manifest = write_manifest(tmp_path, run=run)
    with server_in_thread(faults=faults) as server:
        text = manifest.read_text().replace("endpoint: local", f"endpoint: {server.url}")
        manifest.write_text(text)
        done = run_cli("run", str(manifest))
        stats = server.stats
    report_path = (
        Path(done.stdout.split("report: ")[1].split()[0]) if "report: " in done.stdout else None
    )
    report = json.loads(report_path.read_text()) if report_path else {}
    assert done.returncode == 0, done.stdout + done.stderr
    return done.returncode, report, stats


def _assert_complete_and_unique(out: Path) -> None:
    t = f"read_parquet('{out}/transcripts/**/*.parquet', hive_partitioning=true)"
    w = f"read_parquet('{out}/words/**/*.parquet', hive_partitioning=true)"
    rows = duckdb.sql(f"select count(*), count(distinct item_id) from {t} where status='ok'")
    assert rows.fetchall() == [(ITEMS, ITEMS)]
    words = duckdb.sql(f"select count(*), count(distinct (item_id, idx)) from {w}").fetchall()
    assert words == [(ITEMS * len(BURSTS), ITEMS * len(BURSTS))]
    texts = duckdb.sql(f"select distinct transcript from {t}").fetchall()
    assert texts == [("tone440 tone660 tone880",)]


MATRIX = {
    "drop": FaultConfig(seed=3, drop_rate=0.5, fault_limit=8, fault_at_max_s=1.5),
    "refuse_429": FaultConfig(seed=4, refuse_429_rate=0.5, retry_after_s=0.1, fault_limit=8),
    "refuse_5xx": FaultConfig(seed=5, refuse_5xx_rate=0.5, fault_limit=8),
    "error": FaultConfig(seed=6, error_rate=0.5, fault_limit=8),
    "malformed": FaultConfig(seed=7, malformed_rate=0.5, fault_limit=8),
    "stall": FaultConfig(seed=8, stall_rate=0.4, fault_limit=4),
}


@pytest.mark.parametrize("kind", sorted(MATRIX))
def test_fault_is_survived(kind: str, tmp_path: Path) -> None:
    _, report, stats = _run_against(tmp_path, MATRIX[kind])
    assert stats.faults[kind] >= 2, "the fault must actually have been injected"
    assert report["items"]["ok"] == ITEMS and report["items"]["failed"] == 0
    assert report["retries"] >= stats.faults[kind]  # every fault cost one visible retry
    _assert_complete_and_unique(tmp_path / "out")


def test_is_last_before_all_audio_was_sent_is_not_trusted(tmp_path: Path) -> None:
    # Paced, so the server's early is_last arrives while audio is still being sent.
    faults = FaultConfig(seed=9, early_last_rate=0.5, fault_limit=8, fault_at_max_s=1.2)
    _, report, stats = _run_against(tmp_path, faults, run={"pace": 4.0})
    assert stats.faults["early_last"] >= 2
    assert report["retries"] >= stats.faults["early_last"]
    _assert_complete_and_unique(tmp_path / "out")


def test_first_attempts_dropped_at_least_30_percent(tmp_path: Path) -> None:
    _, report, stats = _run_against(
        tmp_path, FaultConfig(seed=11, drop_rate=0.45, fault_limit=ITEMS, fault_at_max_s=1.8)
    )
    first_attempts = stats.sessions[:ITEMS]
    dropped = sum(1 for s in first_attempts if s.fault == "drop")
    assert dropped / ITEMS >= 0.3
    assert report["items"]["ok"] == ITEMS
    _assert_complete_and_unique(tmp_path / "out")


def test_server_concurrency_limit_below_pool_size(tmp_path: Path) -> None:
    faults = FaultConfig(max_sessions=2, retry_after_s=0.1)
    _, report, stats = _run_against(
        tmp_path, faults, run={"concurrency": 4, "pace": 2.0, "max_attempts": 2}
    )
    assert stats.max_open <= 2
    assert report["items"]["ok"] == ITEMS  # refusals did not use up the 2 attempts
    assert report["pool"]["lowest_pool_size"] < 4
    _assert_complete_and_unique(tmp_path / "out")


def test_wrong_key_stops_the_job_at_once(tmp_path: Path) -> None:
    _media(tmp_path / "media")
    manifest = write_manifest(tmp_path)
    with server_in_thread(api_key="right-key") as server:
        text = manifest.read_text().replace("endpoint: local", f"endpoint: {server.url}")
        manifest.write_text(text)
        done = run_cli("run", str(manifest), env={"SMALLEST_API_KEY": "wrong-key-123"})
        assert server.stats.sessions_opened == 0
        assert server.stats.refused[401] <= 2  # no retries of a fatal answer
    assert done.returncode == 3
    assert "401" in done.stderr
    assert "wrong-key-123" not in done.stdout + done.stderr


def test_key_stays_out_of_debug_logs_and_outputs(tmp_path: Path) -> None:
    _media(tmp_path / "media")
    manifest = write_manifest(tmp_path)
    key = "sk-test-5ecret-value-0042"
    with server_in_thread(api_key=key) as server:
        text = manifest.read_text().replace("endpoint: local", f"endpoint: {server.url}")
        manifest.write_text(text)
        done = run_cli("run", str(manifest), "--verbose", env={"SMALLEST_API_KEY": key})
        assert server.stats.sessions_completed == ITEMS
    assert done.returncode == 0, done.stderr
    assert "Authorization" in done.stderr  # debug logging really was on
    assert key not in done.stdout + done.stderr
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and all(key.encode() not in p.read_bytes() for p in written)


@pytest.mark.parametrize("encoding", ["linear16", "ogg_opus"])
def test_audio_is_paced_as_configured(encoding: str, tmp_path: Path) -> None:
    _media(tmp_path / "media")
    manifest = write_manifest(
        tmp_path, pulse={"encoding": encoding}, run={"concurrency": 4, "pace": 2.0}
    )
    with server_in_thread() as server:
        text = manifest.read_text().replace("endpoint: local", f"endpoint: {server.url}")
        manifest.write_text(text)
        done = run_cli("run", str(manifest))
        paces = [s.pace for s in server.stats.sessions]
    assert done.returncode == 0, done.stderr
    assert len(paces) == ITEMS
    assert all(p is not None and 1.8 <= p <= 2.25 for p in paces), paces
