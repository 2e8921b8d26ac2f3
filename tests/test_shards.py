"""Shards of one job as separate processes on one output: locks, exactly once across shards
and kills, the concurrency share, reports naming the shard, and `pulse-batch status`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from batch.job import plan_items
from batch.manifest import load_manifest
from batch.model import Item
from batch.output import JobOutput, OutputReader
from batch.server import LocalServer
from batch.shard import Shard, shard_of
from tests.conftest import (
    TIME_UNIT_S,
    kill_when,
    point_at,
    run_cli,
    server_in_thread,
    start_cli,
    unpaced,
    write_manifest,
)
from tests.media import Burst, tone_track, write_audio
from tests.s3server import FAKE_SECRET, S3Bucket


def _distinct_tones(folder: Path, count: int, duration_s: float, start: int = 0) -> dict[str, int]:
    """One file per item (numbers ``start`` to ``count - 1``), each a tone of its own pitch,
    so the server's words say which item a session carried. Returns file name -> Hz."""
    folder.mkdir(parents=True, exist_ok=True)
    pitches = {}
    for k in range(start, count):
        hz = 300 + 100 * k
        track = tone_track([Burst(0.2, 0.3, hz)], duration_s, 16000)
        write_audio(folder / f"call-{k:02d}.wav", [track], 16000)
        pitches[f"call-{k:02d}.wav"] = hz
    return pitches


def _rows(out: str) -> list[tuple[str, str, str]]:
    """(item_id, status, run_id) of every transcripts row of the job."""
    table = OutputReader(out).table("transcripts", "test-job", ["item_id", "status", "run_id"])
    return list(
        zip(
            table["item_id"].to_pylist(),
            table["status"].to_pylist(),
            table["run_id"].to_pylist(),
            strict=True,
        )
    )


def _planned(manifest: Path, shards: int) -> tuple[list[Item], dict[str, int], list[int]]:
    """The job's items, the shard of each, and how many each shard owns."""
    items = plan_items(load_manifest(manifest))
    owner = {i.item_id: shard_of(i.item_id, shards) for i in items}
    return items, owner, [sum(1 for o in owner.values() if o == s) for s in range(shards)]


def _summary(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    return dict(f.split("=", 1) for f in last.removeprefix("pulse-batch: ").split())


def _shard_of_session(user_agent: str | None) -> int:
    assert user_agent is not None and " shard/" in user_agent, user_agent
    return int(user_agent.split(" shard/")[1].split("/")[0])


def _sessions_by_item(server: LocalServer, hz_to_item: dict[int, str]) -> dict[str, list[int]]:
    """item_id -> the shard of every session whose finals name that item's tone."""
    seen: dict[str, list[int]] = defaultdict(list)
    for record in server.stats.sessions:
        tones = {int(w.removeprefix("tone")) for w in record.final_words}
        assert len(tones) <= 1, tones  # one item per session
        for hz in tones:
            seen[hz_to_item[hz]].append(_shard_of_session(record.user_agent))
    return seen


@pytest.fixture
def output_place(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Where the shards write: Parquet in a local folder, or Delta in a bucket of the
    loopback S3 server (its AWS_* environment set for the shard processes)."""
    if request.param == "parquet-on-disk":
        return {"path": str(tmp_path / "out"), "format": "parquet"}
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return {"path": bucket.url("lake").rstrip("/"), "format": "delta"}


@pytest.mark.parametrize(
    ("output_place", "count", "duration_s"),
    [
        pytest.param("delta-on-s3", 9, 1.5, id="delta-on-s3-short"),
        pytest.param("parquet-on-disk", 9, 1.5, id="parquet-on-disk-short", marks=pytest.mark.slow),
        pytest.param("delta-on-s3", 15, 3.0, id="delta-on-s3-long", marks=pytest.mark.slow),
        pytest.param("parquet-on-disk", 15, 3.0, id="parquet-on-disk-long", marks=pytest.mark.slow),
    ],
    indirect=["output_place"],
)
def test_shards_started_at_once_one_killed_and_rerun(
    tmp_path: Path, output_place: dict[str, str], count: int, duration_s: float
) -> None:
    """The short form has every case the long one has (a kill after the victim's first
    commit with items left, survivors sharing the concurrency); the long one, more items.
    The default suite runs it on Delta in a bucket (concurrent commits and leases across
    processes); on Parquet, a kill and rerun is `test_resume`'s sigkill test."""
    shards, concurrency = 3, 5
    pitches = _distinct_tones(tmp_path / "media", count, duration_s=duration_s)
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": concurrency, "pace": 1.0, "max_attempts": 2},
        output={**output_place, "commit_every_items": 1},
    )
    out = output_place["path"]
    # Items go to shards by a hash of their path (which holds tmp_path): add files until
    # every shard has two or more, so each shard runs and reports (bounded).
    items, owner, per_shard = _planned(manifest, shards)
    while min(per_shard) < 2 and len(items) < 3 * count:
        more = _distinct_tones(tmp_path / "media", len(items) + 1, duration_s, start=len(items))
        pitches |= more
        items, owner, per_shard = _planned(manifest, shards)
    assert min(per_shard) >= 2, per_shard
    count = len(items)
    hz_to_item = {pitches[Path(i.source).name]: i.item_id for i in items}
    victim = per_shard.index(max(per_shard))  # 3+ items, 2 sessions: the kill lands part-way
    with server_in_thread() as server:
        point_at(manifest, server.url)
        running = [
            start_cli("run", str(manifest), "--shard", f"{s}/{shards}", capture=True)
            for s in range(shards)
        ]

        def victim_committed_one() -> bool:
            # The server's counters first: reading the output is slow under load and
            # shares this process with both servers, so it waits for a finished session.
            finished = (
                r.completed and _shard_of_session(r.user_agent) == victim
                for r in list(server.stats.sessions)
            )
            return any(finished) and any(owner.get(i) == victim for i, _, _ in _rows(out))

        kill_when(running[victim], victim_committed_one, 90, poll_s=0.2)
        survivors = [p for s, p in enumerate(running) if s != victim]
        outputs = {s: p.communicate(timeout=120 * TIME_UNIT_S) for s, p in enumerate(running)}
        for s, process in enumerate(running):
            if s != victim:
                assert process.returncode == 0, outputs[s][1]
                assert _summary(outputs[s][0])["shard"] == f"{s}/{shards}"
        assert all(p.returncode == 0 for p in survivors)

        unfinished = run_cli("status", out, "--job", "test-job")
        assert unfinished.returncode == 1, unfinished.stdout + unfinished.stderr
        assert "incomplete" in unfinished.stdout and "not run yet" in unfinished.stdout
        committed_before = {i for i, status, _ in _rows(out) if owner[i] == victim}
        assert 1 <= len(committed_before) < per_shard[victim], "the kill should land part-way"

        unpaced(manifest)  # the rest at full speed: pace is no part of an item
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
    done = run_cli("status", out, "--job", "test-job", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    status = json.loads(done.stdout)
    assert status["complete"] and status["planned"] == status["ok"] == count
    assert status["by_shard"][f"{victim}/{shards}"]["ok"] == per_shard[victim]
    # The job across shards: which ran when, the killed one included.
    job = json.loads(run_cli("report", out, "--job", "test-job", "--json").stdout)
    assert job["job_so_far"]["ok"] == count
    runs = [(r["shard"], r["status"]) for r in job["runs"]]
    assert sorted(runs) == sorted(
        [(f"{s}/{shards}", "completed") for s in range(shards)] + [(f"{victim}/{shards}", "gone")]
    )
    assert runs[-1] == (f"{victim}/{shards}", "completed")  # the rerun came last
    human = run_cli("report", out, "--job", "test-job")
    assert "## The job so far" in human.stdout and f"| {victim}/{shards} | gone |" in human.stdout
    for printed in [*outputs.values(), (rerun.stdout, rerun.stderr), (human.stdout, "")]:
        assert FAKE_SECRET not in printed[0] + printed[1]


def _held(place: dict[str, str], shard: Shard | None) -> JobOutput:
    """The job's (or a shard's) lock, held by this test process as a run holds it: OS locks
    in a folder, leases in a bucket."""
    return JobOutput.open(place["path"], "test-job", ["job", "date"], place["format"], shard=shard)


@pytest.mark.parametrize(
    "output_place",
    # The leases' exclusions are test_lease's (in-process, on the S3 server), and a CLI run
    # refused by a lease, test_shard_overlap's exit-8 test: the bucket form is `slow`.
    ["parquet-on-disk", pytest.param("delta-on-s3", marks=pytest.mark.slow)],
    indirect=True,
)
def test_shard_locks_one_run_per_shard_and_none_beside_a_whole_job_run(
    tmp_path: Path, output_place: dict[str, str]
) -> None:
    _distinct_tones(tmp_path / "media", 4, duration_s=0.6)
    manifest = write_manifest(tmp_path, output=output_place)
    out = output_place["path"]
    with _held(output_place, Shard(0, 2)):
        same = run_cli("run", str(manifest), "--shard", "0/2")
        assert same.returncode == 4
        assert "shard 0/2 of job 'test-job' is already running" in same.stderr
        whole = run_cli("run", str(manifest))
        assert whole.returncode == 4
        other = run_cli("run", str(manifest), "--shard", "1/2")
        assert other.returncode == 0, other.stderr  # runs beside shard 0, its items all good
        assert "shard=1/2" in other.stdout
    with _held(output_place, None):
        refused = run_cli("run", str(manifest), "--shard", "0/2")
        assert refused.returncode == 4 and "running unsharded" in refused.stderr
    rest = run_cli("run", str(manifest), "--shard", "0/2")
    assert rest.returncode == 0, rest.stderr
    assert len(_rows(out)) == 4
    report = json.loads(run_cli("report", out, "--json").stdout)
    # The latest run that had work (a shard may own none of 4 items); each share is 1.
    assert report["shard"] in ("0/2", "1/2") and report["pool"]["job_concurrency"] == 2
    assert report["pool"]["concurrency"] == 1
    assert run_cli("status", out, "--job", "test-job").returncode == 0


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
