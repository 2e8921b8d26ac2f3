"""CLI behaviour for cron and CI: exit-code policies, dry runs, reports, partitioning."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import av
import numpy as np

from tests.conftest import (
    TIME_UNIT_S,
    point_at,
    run_cli,
    server_in_thread,
    start_cli,
    wait_for,
    write_manifest,
)
from tests.media import Burst, tone_track, write_audio
from tests.tables import sql


def _media(folder: Path, count: int = 3, seconds: float = 1.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    track = tone_track([Burst(0.2, 0.2, 440)], seconds, 16000)
    for i in range(count):
        write_audio(folder / f"c{i}.wav", [track], 16000)
    (folder / "bad.wav").write_text("not audio")


def _summary(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("pulse-batch: ")
    return dict(field.split("=", 1) for field in last.removeprefix("pulse-batch: ").split())


def test_failure_allowances_decide_the_exit_code(tmp_path: Path) -> None:
    _media(tmp_path / "media")
    manifest = write_manifest(tmp_path)
    assert run_cli("run", str(manifest)).returncode == 1
    allowed = run_cli("run", str(manifest), "--max-failures", "1")
    assert allowed.returncode == 0
    assert _summary(allowed.stdout)["skipped"] == "3"  # the failed one was retried
    assert run_cli("run", str(manifest), "--max-failure-ratio", "0.5").returncode == 0
    assert run_cli("run", str(manifest), "--max-failure-ratio", "0.0").returncode == 1
    kept_failed = run_cli("run", str(manifest), "--no-retry-failed")
    assert kept_failed.returncode == 1  # the failed item was left failed, not fixed
    summary = _summary(kept_failed.stdout)
    # The line says why the exit code is 1 although nothing failed in this run.
    assert (summary["failed"], summary["skipped_failed"], summary["failing"]) == ("0", "1", "1")
    allowed = run_cli("run", str(manifest), "--no-retry-failed", "--max-failures", "1")
    assert allowed.returncode == 0 and _summary(allowed.stdout)["failing"] == "1"
    # An allowance that cannot mean anything is a usage error, not a silent green run.
    for flag, value in (("--max-failures", "-1"), ("--max-failure-ratio", "1.5")):
        refused = run_cli("run", str(manifest), flag, value)
        assert refused.returncode == 2 and flag in refused.stderr


def test_dry_run_lists_work_and_bills_nothing(tmp_path: Path) -> None:
    _media(tmp_path / "media", count=2, seconds=30.0)
    manifest = write_manifest(tmp_path, output={"path": "out", "price_per_minute": 0.01})
    done = run_cli("run", str(manifest), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["items"] == {"total": 3, "already_ok": 0, "to_stream": 2, "known_bad": 1}
    assert plan["billed_audio_minutes"] == 1.0 and plan["estimated_cost"] == 0.01
    assert {p["action"].split(":")[0] for p in plan["plan"]} == {"stream", "fail"}
    assert not (tmp_path / "out").exists()
    # After a run, the dry run of a rerun follows --force and --no-retry-failed as run does.
    assert run_cli("run", str(manifest)).returncode == 1
    plans = {
        flag: json.loads(run_cli("run", str(manifest), "--dry-run", "--json", *flag).stdout)
        for flag in ((), ("--force",), ("--no-retry-failed",))
    }
    assert plans[()]["items"] == {"total": 3, "already_ok": 2, "to_stream": 0, "known_bad": 1}
    assert plans[()]["billed_audio_minutes"] == 0.0
    assert plans[("--force",)]["items"]["to_stream"] == 2
    assert plans[("--force",)]["billed_audio_minutes"] == 1.0
    kept = plans[("--no-retry-failed",)]["plan"]
    assert sorted(p["action"] for p in kept) == [
        "skip",
        "skip",
        "skip: failed before (--no-retry-failed)",
    ]


def test_report_command_prints_the_latest(tmp_path: Path) -> None:
    _media(tmp_path / "media", count=1)
    manifest = write_manifest(tmp_path)
    run_cli("run", str(manifest))
    human = run_cli("report", str(tmp_path / "out"))
    assert human.returncode == 0 and "# pulse-batch report: test-job" in human.stdout
    assert "| not_media |" in human.stdout
    machine = json.loads(run_cli("report", str(tmp_path / "out"), "--json").stdout)
    assert machine["items"]["ok"] == 1 and machine["job_so_far"]["items"] == 2
    missing = run_cli("report", str(tmp_path / "out"), "--job", "nope")
    assert missing.returncode == 2 and "no report" in missing.stderr
    # A misspelt job: status names the jobs the output does hold.
    typo = run_cli("status", str(tmp_path / "out"), "--job", "test-jbo")
    assert typo.returncode == 2 and "(jobs here: test-job)" in typo.stderr, typo.stderr


def test_partition_by_language(tmp_path: Path) -> None:
    _media(tmp_path / "media", count=2)
    (tmp_path / "list.csv").write_text("path,language,ticket\nmedia/c0.wav,de,T-1\n")
    manifest = write_manifest(
        tmp_path,
        inputs=[{"glob": "media/c1.wav"}, {"list": "list.csv"}],
        output={"path": "out", "partition_by": ["job", "language"]},
    )
    assert run_cli("run", str(manifest)).returncode == 0
    folders = {p.parent.name for p in (tmp_path / "out" / "transcripts").rglob("*.parquet")}
    assert folders == {"language=de", "language=en"}
    rows = sql(
        tmp_path / "out", "select language, metadata['ticket'] from {transcripts} order by 1"
    )
    assert rows == [("de", "T-1"), ("en", None)]
    changed = write_manifest(tmp_path, output={"path": "out", "partition_by": ["job"]})
    refused = run_cli("run", str(changed))
    assert refused.returncode == 2 and "partition_by" in refused.stderr


def test_job_deadline_stops_starting_work(tmp_path: Path) -> None:
    _media(tmp_path / "media", count=6, seconds=3.0)
    # The first file alone takes 3 s at pace 1: the deadline falls inside it.
    run = {"concurrency": 1, "pace": 1.0, "job_deadline_s": 0.5}
    manifest = write_manifest(tmp_path, run=run)
    done = run_cli("run", str(manifest))
    assert done.returncode == 1
    fields = _summary(done.stdout)
    assert fields["status"] == "interrupted" and int(fields["not_run"]) >= 4


def test_second_signal_stops_at_once(tmp_path: Path) -> None:
    """The first SIGINT grants 60 s of grace, more than the 30 s files need; only the
    second can stop the streams. The server says whether they were stopped: no session of
    the run sent its last answer (a wall clock would flake on a loaded machine)."""
    _media(tmp_path / "media", count=4, seconds=30.0)
    manifest = write_manifest(tmp_path, run={"concurrency": 2, "pace": 1.0})
    with server_in_thread() as server:
        point_at(manifest, server.url)
        process = start_cli("run", str(manifest), "--grace-s", "60", capture=True)
        # Signals before the sessions open would hit the planning, not the streaming.
        assert wait_for(lambda: server.stats.open_now == 2, 60), "sessions never opened"
        process.send_signal(signal.SIGINT)
        time.sleep(0.5 * TIME_UNIT_S)
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=25 * TIME_UNIT_S)
        sessions = list(server.stats.sessions)
    assert process.returncode == 130
    assert _summary(stdout)["status"] == "interrupted"
    assert len(sessions) == 2 and not any(s.completed for s in sessions)
    assert all(s.audio_s < 30.0 for s in sessions)  # cut short, not streamed to the end
    write_manifest(tmp_path, run={"concurrency": 4, "pace": 0})  # same items, faster
    rerun = run_cli("run", str(manifest), "--max-failures", "1")
    assert _summary(rerun.stdout)["ok"] == "4"


def test_default_audio_stream_or_the_one_asked_for(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    path = media / "two-tracks.mkv"
    with av.open(str(path), "w") as out:
        streams = [out.add_stream("pcm_s16le", rate=16000, layout="mono") for _ in range(2)]
        for stream, hz in zip(streams, (440, 880), strict=True):
            pcm = (tone_track([Burst(0.3, 0.3, hz)], 1.0, 16000) * 32767).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    for index, word in ((None, "tone440"), (1, "tone880")):
        folder = tmp_path / f"run-{index}"
        folder.mkdir()
        (folder / "media").symlink_to(media)
        manifest = write_manifest(folder, run={"stream_index": index, "pace": 0})
        assert run_cli("run", str(manifest)).returncode == 0
        text = sql(folder / "out", "select transcript from {transcripts}")
        assert text == [(word,)]
