"""Delta Lake outputs, in a local folder and in a bucket of a real S3 API on loopback."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pytest
from deltalake import DeltaTable

from batch.output import OutputReader
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
from tests.media import CALL_BURSTS, tone_calls
from tests.runcli import CliResult
from tests.s3server import FAKE_SECRET, S3Bucket
from tests.tables import counts


def _counts(location: str, job: str = "test-job") -> tuple[int, int, int, int, int]:
    """(rows, distinct items, ok rows, word rows, distinct (item, idx) words) of a job."""
    found = counts(location, job)
    return found.rows, found.items, found.ok, found.words, found.distinct_words


def _delta_manifest(tmp_path: Path, path: str, **run: object) -> Path:
    settings = {"concurrency": 2, "pace": 0, **run}
    return write_manifest(
        tmp_path, run=settings, output={"path": path, "format": "delta", "commit_every_items": 2}
    )


def test_delta_output_in_a_bucket_keeps_one_row_per_item(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    files = tone_calls(tmp_path / "media", 4)
    good = files[0].read_bytes()
    files[0].write_text("not audio")
    url = s3_bucket.url("lake")
    manifest = _delta_manifest(tmp_path, url)
    first = run_cli("run", str(manifest))
    assert first.returncode == 1, first.stderr  # one input is broken
    assert _counts(url) == (4, 4, 3, 9, 9)
    files[0].write_bytes(good)  # fixed: the rerun replaces its failed row
    assert run_cli("run", str(manifest)).returncode == 0
    assert _counts(url) == (4, 4, 4, 12, 12)
    forced = run_cli("run", str(manifest), "--force")
    assert forced.returncode == 0, forced.stderr
    assert _counts(url) == (4, 4, 4, 12, 12)
    runs = set(OutputReader(url).table("words", "test-job", ["run_id"])["run_id"].to_pylist())
    assert len(runs) == 1  # every word is the forced run's

    dry = run_cli("run", str(manifest), "--dry-run", "--json")
    assert dry.returncode == 0 and '"already_ok": 4' in dry.stdout
    report = run_cli("report", url, "--json")
    assert report.returncode == 0 and '"job_so_far"' in report.stdout
    for done in (first, forced, dry, report):
        assert FAKE_SECRET not in done.stdout + done.stderr
    for key in s3_bucket.client.list_objects_v2(Bucket=s3_bucket.name)["Contents"]:
        body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=key["Key"])["Body"].read()
        assert FAKE_SECRET.encode() not in body, key["Key"]


@pytest.mark.slow  # in the default suite: test_shards' kill on Delta in a bucket
def test_sigkill_mid_run_then_rerun_gives_exactly_one_row_per_item_in_a_bucket(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    count = 10
    tone_calls(tmp_path / "media", count)
    url = s3_bucket.url("lake")
    manifest = _delta_manifest(tmp_path, url, concurrency=3, pace=1.0)
    manifest.write_text(
        manifest.read_text().replace("commit_every_items: 2", "commit_every_items: 1")
    )
    with server_in_thread() as server:
        point_at(manifest, server.url)
        process = start_cli("run", str(manifest))
        kill_when(process, lambda: len(OutputReader(url).history("test-job").ok) >= 3, 60)
        killed_at = len(OutputReader(url).history("test-job").ok)
        assert 3 <= killed_at < count, "the kill should land part-way"
        unpaced(manifest)  # the rest at full speed: pace is no part of an item
        rerun = run_cli("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
    assert f"skipped={killed_at}" in rerun.stdout
    assert _counts(url) == (count, count, count, count * len(CALL_BURSTS), count * len(CALL_BURSTS))


@pytest.mark.parametrize(
    "where",
    # Processes creating and committing to one Delta output in a bucket at once: in the
    # default suite, test_shards' three shards on Delta in a bucket; two jobs' leases side
    # by side in one bucket output, test_lease's exclusion test.
    ["local", pytest.param("bucket", marks=pytest.mark.slow)],
)
def test_two_jobs_write_one_delta_output_at_once(
    tmp_path: Path, where: str, s3_bucket: S3Bucket
) -> None:
    tone_calls(tmp_path / "media", 6)
    location = s3_bucket.url("shared") if where == "bucket" else str(tmp_path / "shared")
    manifests = []
    for job in ("alpha", "beta"):
        manifest = write_manifest(
            tmp_path,
            job=job,
            output={"path": location, "format": "delta", "commit_every_items": 1},
        )
        manifests.append(manifest.rename(tmp_path / f"{job}.yaml"))
    processes = [start_cli("run", str(m), capture=True) for m in manifests]
    for process in processes:
        _, stderr = process.communicate(timeout=120 * TIME_UNIT_S)
        assert process.returncode == 0, stderr
    for job in ("alpha", "beta"):
        assert _counts(location, job) == (6, 6, 6, 18, 18)
    assert OutputReader(location).table("transcripts").num_rows == 12


def test_a_local_delta_output_reads_with_polars_duckdb_and_compacts(tmp_path: Path) -> None:
    tone_calls(tmp_path / "media", 5)
    manifest = _delta_manifest(tmp_path, "out")
    assert run_cli("run", str(manifest)).returncode == 0
    assert run_cli("run", str(manifest), "--force").returncode == 0
    table = str(tmp_path / "out" / "transcripts")
    assert pl.read_delta(table).height == 5
    transcripts = ds.dataset(  # noqa: F841 - DuckDB finds it by name, as the README shows
        DeltaTable(table).file_uris(),
        format="parquet",
        partitioning="hive",
        partition_base_dir=table,
    )
    found = duckdb.sql("select job, count(distinct item_id) from transcripts group by job")
    assert found.fetchall() == [("test-job", 5)]
    compacted = run_cli("compact", str(tmp_path / "out"))
    assert compacted.returncode == 0, compacted.stderr
    assert "transcripts:" in compacted.stdout
    assert _counts(str(tmp_path / "out")) == (5, 5, 5, 15, 15)
    # A mistyped output is said to be one, not "compacted" with exit 0.
    typo = run_cli("compact", str(tmp_path / "ouput"))
    assert typo.returncode == 2 and "no pulse-batch output here" in typo.stderr


def test_a_delta_output_in_a_missing_bucket_is_an_output_error(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    tone_calls(tmp_path / "media", 1)
    manifest = _delta_manifest(tmp_path, "s3://no-such-bucket-pulse/lake")
    done = run_cli("run", str(manifest))
    assert done.returncode == 5, done.stderr
    assert "s3://no-such-bucket-pulse/lake" in done.stderr and "NoSuchBucket" in done.stderr
    assert "Traceback" not in done.stderr and FAKE_SECRET not in done.stderr


def _one_clean_line(done: CliResult, url: str) -> str:
    """The error is one line naming ``url``: no colour codes, no Rust error chain, no
    traceback, no secret."""
    assert done.returncode == 5, done.stdout + done.stderr
    assert "\x1b[" not in done.stderr and "↳" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert url in lines[0] and FAKE_SECRET not in done.stdout + done.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["export", "compact", "report"])
def test_delta_in_a_missing_bucket_says_so_in_one_line(
    tmp_path: Path, s3_bucket: S3Bucket, command: str
) -> None:
    url = "s3://no-such-bucket-pulse/lake"
    extra = ["--job", "test-job", "--to", str(tmp_path / "x")] if command == "export" else []
    said = _one_clean_line(run_cli(command, url, *extra), url)
    assert "bucket no-such-bucket-pulse does not exist (NoSuchBucket)" in said


def test_delta_with_credentials_the_store_refuses_says_what_to_set(
    tmp_path: Path, s3_bucket: S3Bucket
) -> None:
    from moto.core.authorization import enable_iam_authentication

    tone_calls(tmp_path / "media", 1)
    url = s3_bucket.url("lake")
    manifest = _delta_manifest(tmp_path, url)
    assert run_cli("run", str(manifest)).returncode == 0
    # From here the store checks signatures: the environment's key is unknown to it.
    with enable_iam_authentication():
        exported = run_cli("export", url, "--job", "test-job", "--to", str(tmp_path / "x"))
        rerun = run_cli("run", str(manifest), "--force")
    said = _one_clean_line(exported, url)
    assert "the store refused the credentials (InvalidAccessKeyId)" in said
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in said
    assert "InvalidAccessKeyId" in _one_clean_line(rerun, url)
