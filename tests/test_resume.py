"""Exactly-once output under kills and reruns, resume without new sessions, --force."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import duckdb
import pytest

from batch.output.parquet import recover
from tests.conftest import (
    TIME_UNIT_S,
    kill_when,
    point_at,
    run_cli,
    server_in_thread,
    start_cli,
    unpaced,
    wait_for,
    write_manifest,
)
from tests.media import CALL_BURSTS, Burst, tone_calls
from tests.tables import counts, parquet, sql


def _counts(out: Path) -> tuple[int, int, int, int]:
    """(ok rows, distinct ok items, word rows, distinct (item, idx) words)."""
    found = counts(out)
    return found.ok, found.ok_items, found.words, found.distinct_words


def test_rerun_of_finished_job_opens_no_session(tmp_path: Path) -> None:
    tone_calls(tmp_path / "media", 5)
    manifest = write_manifest(tmp_path)
    with server_in_thread() as server:
        point_at(manifest, server.url)
        first = run_cli("run", str(manifest))
        assert first.returncode == 0, first.stderr
        opened = server.stats.sessions_opened
        assert opened == 5
        second = run_cli("run", str(manifest))
        assert second.returncode == 0, second.stderr
        assert server.stats.sessions_opened == opened  # nothing streamed again
    assert "skipped=5" in second.stdout
    assert _counts(tmp_path / "out") == (5, 5, 15, 15)


def test_force_redoes_items_and_keeps_one_ok_row_each(tmp_path: Path) -> None:
    tone_calls(tmp_path / "media", 3)
    manifest = write_manifest(tmp_path)
    with server_in_thread() as server:
        point_at(manifest, server.url)
        assert run_cli("run", str(manifest)).returncode == 0
        forced = run_cli("run", str(manifest), "--force")
        assert forced.returncode == 0, forced.stderr
        assert server.stats.sessions_opened == 6
    assert _counts(tmp_path / "out") == (3, 3, 9, 9)
    run_ids = sql(tmp_path / "out", "select distinct run_id from {words}")
    assert len(run_ids) == 1  # the superseded run's words are gone too


def test_changing_an_option_makes_new_work(tmp_path: Path) -> None:
    tone_calls(tmp_path / "media", 2)
    manifest = write_manifest(tmp_path)
    with server_in_thread() as server:
        point_at(manifest, server.url)
        assert run_cli("run", str(manifest)).returncode == 0
        manifest.write_text(
            manifest.read_text().replace("local_engine", "diarize: true\n  local_engine")
        )
        assert run_cli("run", str(manifest)).returncode == 0
        assert server.stats.sessions_opened == 4


def _committed_items(out: Path) -> int:
    files = list((out / "transcripts").rglob("*.parquet")) if (out / "transcripts").exists() else []
    return len(files)


@pytest.mark.parametrize(
    "reuse",
    # A kill with reused sessions, in the default suite: test_torture's reused-sessions form.
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["one-session-each", "reused-sessions"],
)
def test_sigkill_then_rerun_gives_every_item_exactly_once(tmp_path: Path, reuse: bool) -> None:
    count = 12
    tone_calls(tmp_path / "media", count)
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": 3, "pace": 1.0},
        output={"path": "out", "commit_every_items": 1},
    )
    out = tmp_path / "out"
    with server_in_thread() as server:
        point_at(manifest, server.current_url if reuse else server.url)  # finalize: reuse
        process = start_cli("run", str(manifest))
        kill_when(process, lambda: _committed_items(out) >= 3, 60)
        # A batch killed past its commit point is rolled forward by the next opener, as the
        # rerun would: count after that.
        recover(out, "test-job")
        assert 3 <= _committed_items(out) < count, "the kill should land part-way"
        killed_at = _counts(out)[1]

        unpaced(manifest)  # the rest at full speed: pace is no part of an item
        rerun = run_cli("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
    assert f"skipped={killed_at}" in rerun.stdout
    ok_rows, ok_items, words, distinct_words = _counts(out)
    assert (ok_rows, ok_items) == (count, count)
    assert words == distinct_words == count * len(CALL_BURSTS)
    assert not any((out / "_staging").rglob("*.parquet"))
    # The killed run committed items, so its starting report's zeros would be a lie.
    shown = run_cli("report", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    killed, finished = json.loads(shown.stdout)["runs"]
    assert (killed["status"], killed["ok"], killed["failed"]) == ("gone", None, None)
    assert (finished["status"], finished["ok"]) == ("completed", count - killed_at)


@pytest.mark.parametrize(
    "reuse",
    # The reused sessions' form has every case (a session carrying several calls finishes
    # them in its grace); a SIGTERM mid-stream with one session each, in the default suite:
    # test_session_bounds' test_no_session_starts_after_sigterm.
    [pytest.param(False, marks=pytest.mark.slow), True],
    ids=["one-session-each", "reused-sessions"],
)
def test_sigterm_stops_cleanly_and_rerun_finishes(tmp_path: Path, reuse: bool) -> None:
    # A reused session finishes the calls it has taken on (read ahead: up to ~2 s of
    # audio past the one being sent), so more calls, for some to be left.
    count = 16 if reuse else 8
    tone_calls(tmp_path / "media", count, duration_s=1.2)
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": 2, "pace": 1.0},
        output={"path": "out", "commit_every_items": 50},
    )
    out = tmp_path / "out"
    with server_in_thread() as server:
        point_at(manifest, server.current_url if reuse else server.url)  # finalize: reuse
        process = start_cli("run", str(manifest), "--grace-s", "10", capture=True)
        # Two calls' words heard (in a reused session, a session ends with its last call).
        heard = lambda: sum(len(r.final_words) for r in server.stats.sessions)  # noqa: E731
        wait_for(lambda: heard() >= 2 * len(CALL_BURSTS), 30)
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=30 * TIME_UNIT_S)
        assert process.returncode == 143
        report = json.loads(Path(stdout.split("report: ")[1].split()[0]).read_text())
        assert report["status"] == "interrupted"
        finished = report["items"]["ok"]
        assert 2 <= finished < count and report["items"]["not_run"] == count - finished
        assert _counts(out)[1] == finished  # everything completed was committed

        unpaced(manifest)  # the rest at full speed: pace is no part of an item
        rerun = run_cli("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
    assert _counts(out)[:2] == (count, count)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("count", "output"),
    [
        # A quarter of the items, committed every 50: as many commits, so as many files.
        (250, {"commit_every_items": 50}),
        pytest.param(1000, {}, marks=pytest.mark.slow),  # the default commit_every_items
    ],
    ids=["250", "1000"],
)
def test_tiny_items_leave_few_files(tmp_path: Path, count: int, output: dict[str, int]) -> None:
    tone_calls(tmp_path / "media", count, duration_s=0.3, bursts=[Burst(0.05, 0.1, 440)])
    manifest = write_manifest(
        tmp_path, run={"concurrency": 16, "pace": 0}, output={"path": "out", **output}
    )
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.stderr
    for table in ("transcripts", "words"):
        partitions = {p.parent for p in (tmp_path / "out" / table).rglob("*.parquet")}
        assert len(partitions) == 1
        files = list((tmp_path / "out" / table).rglob("*.parquet"))
        assert len(files) <= 6, f"{table}: {len(files)} files for {count} items"
    assert _counts(tmp_path / "out")[:2] == (count, count)


def test_report_agrees_with_tables_and_server_counters(tmp_path: Path) -> None:
    from batch.server import FaultConfig

    tone_calls(tmp_path / "media", 6)
    (tmp_path / "media" / "broken.wav").write_text("not audio")
    manifest = write_manifest(tmp_path, run={"concurrency": 3, "pace": 0, "max_attempts": 4})
    faults = FaultConfig(seed=2, drop_rate=0.5, fault_limit=3, fault_at_max_s=1.0)
    with server_in_thread(faults=faults) as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest))
        deadline = time.monotonic() + 5
        while server.stats.open_now and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = server.stats
    assert done.returncode == 1
    report = json.loads(Path(done.stdout.split("report: ")[1].split()[0]).read_text())
    t = parquet(tmp_path / "out", "transcripts")
    ok, failed, audio, attempts = duckdb.sql(
        f"select count(*) filter (status = 'ok'), count(*) filter (status = 'failed'),"
        f" sum(duration_s) filter (status = 'ok'), sum(attempts) from {t}"
    ).fetchall()[0]
    assert (report["items"]["ok"], report["items"]["failed"]) == (ok, failed) == (6, 1)
    assert abs(report["audio_s"] - audio) < 0.01
    assert report["attempts"] == attempts == stats.sessions_opened == 6 + stats.faults["drop"]
    assert report["retries"] == stats.faults["drop"] >= 1
    assert report["pool"]["max_open_sessions"] >= stats.max_open > 0
    received = sum(s.audio_s for s in stats.sessions)
    assert report["billing"]["billed_audio_minutes"] * 60 >= received - 0.01
    assert report["job_so_far"] == {
        "runs_with_rows": 1,
        "items": 7,
        "ok": 6,
        "failed": 1,
        "audio_s": round(audio, 3),
    }


def test_second_run_of_a_running_job_is_refused(tmp_path: Path) -> None:
    from batch.output import JobOutput

    tone_calls(tmp_path / "media", 1)
    manifest = write_manifest(tmp_path)
    with JobOutput.open(tmp_path / "out", "test-job", ["job", "date"]):
        done = run_cli("run", str(manifest))
    assert done.returncode == 4
    assert "already running" in done.stderr
    assert run_cli("run", str(manifest)).returncode == 0  # the lock is gone with its holder


def test_rerun_does_not_touch_files_already_transcribed(tmp_path: Path) -> None:
    files = tone_calls(tmp_path / "media", 2)
    manifest = write_manifest(tmp_path, inputs=[{"path": f"media/{f.name}"} for f in files])
    assert run_cli("run", str(manifest)).returncode == 0
    files[0].write_bytes(b"")  # truncated after it was transcribed: not even opened again
    files[1].unlink()  # archived away: its result stays, it is not a failure
    rerun = run_cli("run", str(manifest))
    assert rerun.returncode == 0, rerun.stderr
    assert "skipped=2" in rerun.stdout


def test_force_of_one_job_leaves_another_job_in_the_same_output_alone(tmp_path: Path) -> None:
    tone_calls(tmp_path / "media", 3)
    output = {"path": "out", "partition_by": ["date"]}  # job is a column, not a folder
    alpha = write_manifest(tmp_path, job="alpha", output=output)
    alpha = alpha.rename(tmp_path / "alpha.yaml")
    beta = write_manifest(tmp_path, job="beta", output=output)
    assert run_cli("run", str(alpha)).returncode == 0
    assert run_cli("run", str(beta)).returncode == 0
    assert run_cli("run", str(alpha), "--force").returncode == 0
    t = parquet(tmp_path / "out", "transcripts")
    w = parquet(tmp_path / "out", "words")
    per_job = duckdb.sql(f"select job, count(*) from {t} group by job order by job").fetchall()
    assert per_job == [("alpha", 3), ("beta", 3)]
    words = duckdb.sql(f"select job, count(*) from {w} group by job order by job").fetchall()
    assert words == [("alpha", 9), ("beta", 9)]


def test_a_failed_retry_after_ok_makes_the_item_work_again(tmp_path: Path) -> None:
    files = tone_calls(tmp_path / "media", 2)
    manifest = write_manifest(tmp_path)
    assert run_cli("run", str(manifest)).returncode == 0
    files[0].write_text("now corrupt")
    assert run_cli("run", str(manifest), "--force").returncode == 1
    rerun = run_cli("run", str(manifest))  # the latest result of that item is a failure
    assert rerun.returncode == 1 and "skipped=1" in rerun.stdout
