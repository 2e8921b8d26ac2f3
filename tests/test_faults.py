"""The fault matrix: every injected fault ends with every good item ok, exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batch.server import FaultConfig
from tests.conftest import TIME_UNIT_S, point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_files
from tests.tables import counts, sql

ITEMS = 8
BURSTS = [Burst(0.3, 0.2, 440), Burst(0.9, 0.2, 660), Burst(1.5, 0.2, 880)]


def _media(folder: Path, count: int = ITEMS, duration_s: float = 2.0) -> None:
    tone_files(folder, count, BURSTS, duration_s)


def _run_against(
    tmp_path: Path, faults: FaultConfig, reuse: bool = False, **sections: Any
) -> tuple[int, dict[str, Any], Any]:
    """A run against a server with ``faults``; ``reuse``: on its ``current`` path, where
    the files share sessions through finalize (`batch.reuse`)."""
    _media(tmp_path / "media")
    run = {"concurrency": 4, "pace": 0, "max_attempts": 6, "backoff_initial_s": 0.05,
           "backoff_max_s": 0.2, "final_timeout_s": 1.0, **sections.get("run", {})}  # fmt: skip
    manifest = write_manifest(tmp_path, run=run)
    with server_in_thread(faults=faults) as server:
        point_at(manifest, server.current_url if reuse else server.url)
        done = run_cli("run", str(manifest))
        stats = server.stats
    report_path = (
        Path(done.stdout.split("report: ")[1].split()[0]) if "report: " in done.stdout else None
    )
    report = json.loads(report_path.read_text()) if report_path else {}
    assert done.returncode == 0, done.stdout + done.stderr
    return done.returncode, report, stats


def _assert_complete_and_unique(out: Path) -> None:
    found = counts(out)
    assert (found.ok, found.ok_items) == (ITEMS, ITEMS)
    assert found.words == found.distinct_words == ITEMS * len(BURSTS)
    texts = sql(out, "select distinct transcript from {transcripts}")
    assert texts == [("tone440 tone660 tone880",)]


MATRIX = {
    "drop": FaultConfig(seed=3, drop_rate=0.5, fault_limit=8, fault_at_max_s=1.5),
    "refuse_429": FaultConfig(seed=4, refuse_429_rate=0.5, retry_after_s=0.1, fault_limit=8),
    "refuse_5xx": FaultConfig(seed=5, refuse_5xx_rate=0.5, fault_limit=8),
    "error": FaultConfig(seed=6, error_rate=0.5, fault_limit=8),
    "malformed": FaultConfig(seed=7, malformed_rate=0.5, fault_limit=8),
    "stall": FaultConfig(seed=8, stall_rate=0.4, fault_limit=4),
}


@pytest.mark.parametrize("reuse", [False, True], ids=["one-session-each", "reused-sessions"])
@pytest.mark.parametrize("kind", sorted(MATRIX))
def test_fault_is_survived(kind: str, reuse: bool, tmp_path: Path) -> None:
    # A stalled session is given up after final_timeout_s: short, as no answer ever comes.
    run = {"final_timeout_s": 0.5 * TIME_UNIT_S} if kind == "stall" else {}
    _, report, stats = _run_against(tmp_path, MATRIX[kind], reuse, run=run)
    assert stats.faults[kind] >= 2, "the fault must actually have been injected"
    assert report["items"]["ok"] == ITEMS and report["items"]["failed"] == 0
    assert report["retries"] >= stats.faults[kind]  # every fault cost one visible retry
    _assert_complete_and_unique(tmp_path / "out")


@pytest.mark.parametrize("reuse", [False, True], ids=["one-session-each", "reused-sessions"])
def test_is_last_before_all_audio_was_sent_is_not_trusted(reuse: bool, tmp_path: Path) -> None:
    # Paced, so the server's early is_last arrives while audio is still being sent.
    faults = FaultConfig(seed=9, early_last_rate=0.5, fault_limit=8, fault_at_max_s=1.2)
    _, report, stats = _run_against(tmp_path, faults, reuse, run={"pace": 4.0})
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
        tmp_path, faults, run={"concurrency": 4, "pace": 4.0, "max_attempts": 2}
    )
    assert stats.max_open <= 2
    assert report["items"]["ok"] == ITEMS  # refusals did not use up the 2 attempts
    assert report["pool"]["lowest_pool_size"] < 4
    _assert_complete_and_unique(tmp_path / "out")


def test_wrong_key_stops_the_job_at_once(tmp_path: Path) -> None:
    _media(tmp_path / "media")
    manifest = write_manifest(tmp_path)
    with server_in_thread(api_key="right-key") as server:
        point_at(manifest, server.url)
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
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest), "--verbose", env={"SMALLEST_API_KEY": key})
        assert server.stats.sessions_completed == ITEMS
    assert done.returncode == 0, done.stderr
    assert "Authorization" in done.stderr  # debug logging really was on
    assert key not in done.stdout + done.stderr
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written and all(key.encode() not in p.read_bytes() for p in written)


def _audio_spans(tmp_path: Path, encoding: str, pace: float) -> list[tuple[float, float]]:
    """Run the job's files at ``pace``, all at once; per session, as the server saw it: the
    audio seconds received, and the wall seconds from its first audio frame to its last."""
    manifest = write_manifest(
        tmp_path,
        pulse={"encoding": encoding},
        run={"concurrency": 4, "pace": pace},
        output={"path": f"out-{pace:g}"},
    )
    with server_in_thread() as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest))
        sessions = list(server.stats.sessions)
    assert done.returncode == 0, done.stderr
    spans = []
    for s in sessions:
        assert s.completed and s.first_audio_at is not None and s.last_audio_at is not None
        spans.append((s.audio_s, s.last_audio_at - s.first_audio_at))
    return spans


@pytest.mark.parametrize("encoding", ["linear16", "ogg_opus"])
def test_audio_is_paced_as_configured(encoding: str, tmp_path: Path) -> None:
    """A loaded machine can make a client slower, never faster. So each paced session is
    checked against the pace, less the last chunk (sent at (audio - chunk) / pace) and a
    time unit of scheduling jitter; and it may be slower than the pace only by what the
    same sessions took unpaced, measured here: the cost of making the audio on this
    machine now. Pacing at 1x or 4x, or not at all, still fails."""
    pace, last_chunk_s, jitter_s = 2.0, 0.13, 0.15 * TIME_UNIT_S  # PCM: 128 ms chunks
    _media(tmp_path / "media", count=4, duration_s=2.0)
    unpaced_s = max(wall_s for _, wall_s in _audio_spans(tmp_path, encoding, 0))
    paced = _audio_spans(tmp_path, encoding, pace)
    assert len(paced) == 4
    for audio_s, wall_s in paced:
        assert audio_s == pytest.approx(2.0, abs=0.05)
        assert wall_s >= (audio_s - last_chunk_s) / pace - jitter_s, (paced, unpaced_s)
        assert wall_s <= audio_s / pace + unpaced_s + jitter_s, (paced, unpaced_s)
