"""Shards of one job as separate processes on one output: locks, exactly once across shards
and kills, the concurrency share, reports naming the shard, and `pulse-batch status`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import duckdb

from batch.job import plan_items
from batch.manifest import load_manifest
from batch.output import JobOutput
from batch.server import LocalServer
from batch.shard import Shard, shard_of
from tests.conftest import TIME_UNIT_S, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_track, write_audio


def _distinct_tones(folder: Path, count: int, duration_s: float) -> dict[str, int]:
    """One file per item, each a tone of its own pitch, so the server's words say which
    item a session carried. Returns file name -> Hz."""
    folder.mkdir(parents=True, exist_ok=True)
    pitches = {}
    for k in range(count):
        hz = 300 + 100 * k
        track = tone_track([Burst(0.2, 0.3, hz)], duration_s, 16000)
        write_audio(folder / f"call-{k:02d}.wav", [track], 16000)
        pitches[f"call-{k:02d}.wav"] = hz
    return pitches


def _point_at(manifest: Path, url: str) -> None:
    manifest.write_text(manifest.read_text().replace("endpoint: local", f"endpoint: {url}"))


def _rows(out: Path) -> list[tuple[str, str, str]]:
    """(item_id, status, run_id) of every transcripts row."""
    return [
        (str(a), str(b), str(c))
        for a, b, c in duckdb.sql(
            f"select item_id, status, run_id from read_parquet("
            f"'{out}/transcripts/**/*.parquet', hive_partitioning=true)"
        ).fetchall()
    ]


def _summary(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    return dict(f.split("=", 1) for f in last.removeprefix("pulse-batch: ").split())


def _shard_of_session(user_agent: str | None) -> int:
    assert user_agent is not None and " shard/" in user_agent, user_agent
    return int(user_agent.split(" shard/")[1].split("/")[0])


def _start_shard(manifest: Path, index: int, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batch", "run", str(manifest), "--shard", f"{index}/{count}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s * TIME_UNIT_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _sessions_by_item(server: LocalServer, hz_to_item: dict[int, str]) -> dict[str, list[int]]:
    """item_id -> the shard of every session whose finals name that item's tone."""
    seen: dict[str, list[int]] = defaultdict(list)
    for record in server.stats.sessions:
        tones = {int(w.removeprefix("tone")) for w in record.final_words}
        assert len(tones) <= 1, tones  # one item per session
        for hz in tones:
            seen[hz_to_item[hz]].append(_shard_of_session(record.user_agent))
    return seen


def test_shards_started_at_once_one_killed_and_rerun(tmp_path: Path) -> None:
    count, shards, concurrency = 15, 3, 5
    pitches = _distinct_tones(tmp_path / "media", count, duration_s=3.0)
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": concurrency, "pace": 1.0, "max_attempts": 2},
        output={"path": "out", "commit_every_items": 1},
    )
    out = tmp_path / "out"
    items = plan_items(load_manifest(manifest))
    owner = {i.item_id: shard_of(i.item_id, shards) for i in items}
    hz_to_item = {pitches[Path(i.source).name]: i.item_id for i in items}
    per_shard = [sum(1 for o in owner.values() if o == s) for s in range(shards)]
    victim = per_shard.index(max(per_shard))  # at least 5 items: the kill lands part-way
    with server_in_thread() as server:
        _point_at(manifest, server.url)
        running = [_start_shard(manifest, s, shards) for s in range(shards)]

        def victim_finished_one() -> bool:
            return any(
                r.completed and _shard_of_session(r.user_agent) == victim
                for r in list(server.stats.sessions)
            )

        _wait_for(victim_finished_one, 60)
        time.sleep(0.3)  # let that item's commit land
        os.kill(running[victim].pid, signal.SIGKILL)
        running[victim].wait(timeout=10 * TIME_UNIT_S)
        survivors = [p for s, p in enumerate(running) if s != victim]
        outputs = {s: p.communicate(timeout=120 * TIME_UNIT_S) for s, p in enumerate(running)}
        for s, process in enumerate(running):
            if s != victim:
                assert process.returncode == 0, outputs[s][1]
                assert _summary(outputs[s][0])["shard"] == f"{s}/{shards}"
        assert all(p.returncode == 0 for p in survivors)

        unfinished = run_cli("status", str(out), "--job", "test-job")
        assert unfinished.returncode == 1, unfinished.stdout + unfinished.stderr
        assert "incomplete" in unfinished.stdout and "not run yet" in unfinished.stdout
        committed_before = {i for i, status, _ in _rows(out) if owner[i] == victim}
        assert 1 <= len(committed_before) < per_shard[victim], "the kill should land part-way"

        rerun = run_cli("run", str(manifest), "--shard", f"{victim}/{shards}")
        assert rerun.returncode == 0, rerun.stderr
        summary = _summary(rerun.stdout)
        assert summary["shard"] == f"{victim}/{shards}"
        assert int(summary["skipped"]) == len(committed_before)
        assert int(summary["ok"]) == per_shard[victim] - len(committed_before)
        most_open = server.stats.max_open
        seen = _sessions_by_item(server, hz_to_item)

    rows = _rows(out)
    assert sorted(i for i, _, _ in rows) == sorted(owner)  # every item exactly one row
    assert {status for _, status, _ in rows} == {"ok"}
    # The server saw each item's audio from its own shard only, once per attempt.
    assert set(seen) == set(owner)
    for item, from_shards in seen.items():
        assert set(from_shards) == {owner[item]}
        if owner[item] != victim:
            assert len(from_shards) == 1  # no faults: one session per item
    # The shards together never held more than run.concurrency sessions open.
    assert 2 <= most_open <= concurrency
    done = run_cli("status", str(out), "--job", "test-job", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["complete"] and status["planned"] == status["ok"] == count
    assert status["by_shard"][f"{victim}/{shards}"]["ok"] == per_shard[victim]
    # The job across shards: which ran when, the killed one included.
    job = json.loads(run_cli("report", str(out), "--job", "test-job", "--json").stdout)
    assert job["job_so_far"]["ok"] == count
    runs = [(r["shard"], r["status"]) for r in job["runs"]]
    assert sorted(runs) == sorted(
        [(f"{s}/{shards}", "completed") for s in range(shards)] + [(f"{victim}/{shards}", "gone")]
    )
    assert runs[-1] == (f"{victim}/{shards}", "completed")  # the rerun came last
    human = run_cli("report", str(out), "--job", "test-job").stdout
    assert "## The job so far" in human and f"| {victim}/{shards} | gone |" in human


def test_shard_locks_one_run_per_shard_and_none_beside_a_whole_job_run(tmp_path: Path) -> None:
    _distinct_tones(tmp_path / "media", 4, duration_s=0.6)
    manifest = write_manifest(tmp_path)
    out = tmp_path / "out"
    with JobOutput.open(out, "test-job", ["job", "date"], shard=Shard(0, 2)):
        same = run_cli("run", str(manifest), "--shard", "0/2")
        assert same.returncode == 4
        assert "shard 0/2 of job 'test-job' is already running" in same.stderr
        whole = run_cli("run", str(manifest))
        assert whole.returncode == 4
        other = run_cli("run", str(manifest), "--shard", "1/2")
        assert other.returncode in (0, 1), other.stderr  # runs beside shard 0
        assert "shard=1/2" in other.stdout
    with JobOutput.open(out, "test-job", ["job", "date"]):
        refused = run_cli("run", str(manifest), "--shard", "0/2")
        assert refused.returncode == 4 and "running unsharded" in refused.stderr
    rest = run_cli("run", str(manifest), "--shard", "0/2")
    assert rest.returncode == 0, rest.stderr
    assert len(_rows(out)) == 4
    report = json.loads(run_cli("report", str(out), "--json").stdout)
    assert report["shard"] == "0/2" and report["pool"]["job_concurrency"] == 2
    assert report["pool"]["concurrency"] == 1
    assert run_cli("status", str(out), "--job", "test-job").returncode == 0


def test_bad_shard_settings_exit_2_naming_the_flag_or_variable(tmp_path: Path) -> None:
    _distinct_tones(tmp_path / "media", 1, duration_s=0.6)
    manifest = write_manifest(tmp_path, run={"concurrency": 2})
    out_of_range = run_cli("run", str(manifest), "--shard", "3/3")
    assert out_of_range.returncode == 2 and "--shard: shard index 3" in out_of_range.stderr
    no_count = run_cli("run", str(manifest), env={"JOB_COMPLETION_INDEX": "1"})
    assert no_count.returncode == 2 and "PULSE_BATCH_SHARDS" in no_count.stderr
    too_few = run_cli("run", str(manifest), "--shard", "0/3")
    assert too_few.returncode == 2 and "run.concurrency: 2 is below the shard count 3" in (
        too_few.stderr
    )
    from_k8s = run_cli("run", str(manifest), "--shards", "2", env={"JOB_COMPLETION_INDEX": "1"})
    assert "shard=1/2" in from_k8s.stdout, from_k8s.stderr
    unknown = run_cli("status", str(tmp_path / "nowhere"), "--job", "test-job")
    assert unknown.returncode == 2 and "--manifest" in unknown.stderr
