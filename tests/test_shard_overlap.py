"""Shards of one job with different counts never overlap; duplicate rows are reported by
`status` and repaired by the next run; locks that were deleted stop a run."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import anyio
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from deltalake import write_deltalake

from batch.errors import ExitCode, LockedError, ShardCountConflict
from batch.job import JobResult, Observer, RunOptions, exit_code, run_job
from batch.manifest import load_manifest
from batch.model import Item
from batch.output import TABLES, JobOutput, OutputReader
from batch.output.delta import delta_options
from batch.output.layout import Location
from batch.shard import Shard
from tests.conftest import TIME_UNIT_S, run_cli, write_manifest
from tests.emulators import AzContainer
from tests.media import Burst, tone_track, write_audio
from tests.s3server import S3Bucket


def _tones(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        track = tone_track([Burst(0.1, 0.2, 300 + 50 * k)], 0.5, 16000)
        write_audio(folder / f"call-{k:02d}.wav", [track], 16000)


async def _two_counts_at_once(manifest: Path) -> list[JobResult | BaseException]:
    loaded = load_manifest(manifest)
    results: list[JobResult | BaseException] = []

    async def one(shard: Shard) -> None:
        try:
            results.append(await run_job(loaded, RunOptions(shard=shard)))
        except LockedError as exc:
            results.append(exc)

    with anyio.fail_after(60 * TIME_UNIT_S):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(one, Shard(0, 1))
            tasks.start_soon(one, Shard(0, 2))
    return results


@pytest.mark.anyio
async def test_two_shard_counts_at_once_never_duplicate(tmp_path: Path) -> None:
    _tones(tmp_path / "media", 12)
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": 2, "pace": 0, "max_attempts": 2},
        output={"path": str(tmp_path / "out"), "commit_every_items": 1},
    )
    results = await _two_counts_at_once(manifest)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 1 and isinstance(refused[0], ShardCountConflict), results
    assert "shards of different counts would run some items twice" in str(refused[0])
    ids = OutputReader(tmp_path / "out").table("transcripts", "test-job", ["item_id"])["item_id"]
    assert len(ids) == len(set(ids.to_pylist())) > 0


@pytest.fixture(params=["parquet-on-disk", "delta-on-disk", "delta-on-s3", "delta-on-azurite"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Where the runs write: Parquet or Delta in a local folder, or Delta in a bucket of
    the loopback S3 server or a container of Azurite (leases on both)."""
    if request.param.endswith("on-disk"):
        return {"path": str(tmp_path / "out"), "format": request.param.split("-")[0]}
    if request.param == "delta-on-azurite":
        container: AzContainer = request.getfixturevalue("az_container")
        return {"path": container.url("lake"), "format": "delta"}
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return {"path": bucket.url("lake").rstrip("/"), "format": "delta"}


def _open(place: dict[str, str], shard: Shard | None) -> JobOutput:
    return JobOutput.open(place["path"], "test-job", ["job"], place["format"], shard=shard)


def test_another_shard_count_is_refused_with_exit_8(tmp_path: Path, place: dict[str, str]) -> None:
    _tones(tmp_path / "media", 2)
    manifest = write_manifest(tmp_path, output={**place, "partition_by": ["job"]})
    with _open(place, Shard(1, 2)):
        with pytest.raises(ShardCountConflict, match=r"as shard 1/2.*this is shard 0/3"):
            _open(place, Shard(0, 3))
        with _open(place, Shard(0, 2)):  # the same count runs beside it
            pass
        done = run_cli("run", str(manifest), "--shard", "0/1")
        assert done.returncode == 8, done.output
        assert "run with --shard I/2" in done.output
        assert "I/2 (" not in done.output  # the count alone, not the holder's note
    with _open(place, Shard(0, 3)):  # free again once shard 1/2 is gone
        pass


class _Deleter(Observer):
    """Deletes ``victim`` after the run's first commit, then starts a second run's open."""

    def __init__(self, victim: Path, out: Path) -> None:
        self.victim, self.out = victim, out
        self.done = 0
        self.second: BaseException | None = None

    def item_done(self, item: Item, ok: bool, audio_s: float, failure: str | None = None) -> None:
        self.done += 1
        if self.done != 1:
            return
        shutil.rmtree(self.victim)
        try:
            JobOutput.open(self.out, "test-job", ["job", "date"]).close()
        except LockedError as exc:
            self.second = exc


@pytest.mark.anyio
@pytest.mark.parametrize("victim", ["_locks", "."])
async def test_a_run_whose_locks_are_deleted_stops_and_commits_nothing_more(
    tmp_path: Path, victim: str
) -> None:
    _tones(tmp_path / "media", 4)
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": 1, "pace": 0},
        output={"path": str(out), "commit_every_items": 1, "partition_by": ["job", "date"]},
    )
    watcher = _Deleter(out / victim, out)
    with anyio.fail_after(30 * TIME_UNIT_S):
        result = await run_job(load_manifest(manifest), observer=watcher)
    assert result.report["status"] == "failed_output"
    assert exit_code(result.report) == ExitCode.OUTPUT
    if victim == "_locks":
        assert "lock file was deleted or replaced" in result.report["abort_reason"]
        # The second run saw the first one's run lock and did not start beside it.
        assert isinstance(watcher.second, LockedError) and "gone" in str(watcher.second)
        ids = OutputReader(out).table("transcripts", "test-job", ["item_id"])["item_id"].to_pylist()
        assert len(ids) == 1  # the first commit only
        assert (out / "_locks" / "README-DO-NOT-DELETE.txt").exists()  # the second open's
    else:
        assert "output folder was deleted or replaced" in result.report["abort_reason"]
        # A fresh output was made by the second open; the first run wrote nothing into it.
        assert OutputReader(out).table("transcripts", "test-job").num_rows == 0
        assert not (out / "_reports").exists()


def _duplicate_every_row(place: dict[str, str]) -> None:
    """What overlapping runs left before shard counts were locked: a second copy of every
    row of the job, under another run id, finished a second later."""
    for table in TABLES:
        data = OutputReader(place["path"]).table(table, "test-job")
        if data.num_rows == 0:
            continue
        column = data.schema.get_field_index("run_id")
        data = data.set_column(column, "run_id", pa.array(["overlap"] * data.num_rows))
        if table == "transcripts":
            later = [t + timedelta(seconds=1) for t in data["finished_at"].to_pylist()]
            column = data.schema.get_field_index("finished_at")
            kind = data.schema.field(column).type
            data = data.set_column(column, "finished_at", pa.array(later, kind))
        if place["format"] == "delta":
            where = Location.of(place["path"])
            write_deltalake(
                where.child(table),
                data,
                mode="append",
                partition_by=["job"],
                schema_mode="merge",
                storage_options=delta_options(where, {}),
            )
        else:
            ds.write_dataset(
                data,
                Path(place["path"]) / table,
                format="parquet",
                partitioning=ds.partitioning(pa.schema([("job", pa.string())]), flavor="hive"),
                basename_template="part-overlap-{i}.parquet",
                existing_data_behavior="overwrite_or_ignore",
            )


def _run_ids(place: dict[str, str], table: str) -> list[tuple[str, str]]:
    data = OutputReader(place["path"]).table(table, "test-job", ["item_id", "run_id"])
    return list(zip(data["item_id"].to_pylist(), data["run_id"].to_pylist(), strict=True))


@pytest.mark.anyio
@pytest.mark.parametrize(
    "place",
    # The repair is the same Delta code on disk and in a bucket (Delta deletes in a bucket:
    # test_forget's bucket form): the bucket form is `slow`.
    ["parquet-on-disk", "delta-on-disk", pytest.param("delta-on-s3", marks=pytest.mark.slow)],
    indirect=True,
)
async def test_duplicate_rows_fail_status_and_the_next_run_keeps_the_latest(
    tmp_path: Path, place: dict[str, str]
) -> None:
    _tones(tmp_path / "media", 3)
    manifest = write_manifest(tmp_path, output={**place, "partition_by": ["job"]})
    first = await run_job(load_manifest(manifest))
    assert exit_code(first.report) == 0
    words = len(_run_ids(place, "words"))
    _duplicate_every_row(place)
    assert len(_run_ids(place, "transcripts")) == 6

    told = run_cli("status", place["path"], "--job", "test-job")
    assert told.returncode == 1, told.output
    assert "3 item(s) have more than one row" in told.output
    assert "job test-job: incomplete" in told.output

    again = await run_job(load_manifest(manifest))  # every item is ok: nothing to stream
    assert again.nothing_to_do
    for table in ("transcripts", "words"):
        rows = _run_ids(place, table)
        assert {run_id for _, run_id in rows} == {"overlap"}  # each item's latest result
    assert len(_run_ids(place, "transcripts")) == 3 and len(_run_ids(place, "words")) == words
    assert run_cli("status", place["path"], "--job", "test-job").returncode == 0
