"""Small frictions a new user met (issue 24, items 5 and 6), each checked on the real thing."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest

import batch
from batch.decode import DecodedAudio, WireFormat
from batch.errors import ConnectionLost, ExitCode, OutputError, ServerReported, exit_code_for
from batch.output.delta import delta_options
from batch.output.layout import Location
from batch.pool import retry_line
from batch.settled import local_changed_at, settled_failures
from batch.split import CachedSlice, cache_and_cut
from batch.timemap import TimeMap
from batch.version import __version__
from tests.conftest import run_cli, write_manifest
from tests.media import tone_calls
from tests.s3server import S3Bucket

SERVICE = "wss://api.smallest.ai/waves/v1/pulse/get_text"


def test_version() -> None:
    done = run_cli("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"pulse-batch {__version__}")


def test_validate_warns_when_a_remote_endpoints_key_is_unset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tone_calls(tmp_path / "media", 1)
    manifest = write_manifest(
        tmp_path, pulse={"endpoint": SERVICE, "api_key_env": "PULSE_TEST_KEY_UNSET"}
    )
    monkeypatch.delenv("PULSE_TEST_KEY_UNSET", raising=False)
    done = run_cli("validate", str(manifest))
    assert done.returncode == 0, done.stderr
    assert "valid" in done.stdout
    warning = next(line for line in done.stdout.splitlines() if "warning:" in line)
    assert "PULSE_TEST_KEY_UNSET is not set" in warning and "run refuses" in warning
    fine = run_cli("validate", str(manifest), env={"PULSE_TEST_KEY_UNSET": "k-123456"})
    assert fine.returncode == 0 and "warning" not in fine.stdout


def test_score_exits_1_when_no_reference_matches_json_or_not(tmp_path: Path) -> None:
    tone_calls(tmp_path / "media", 1)
    assert batch.run_job(write_manifest(tmp_path)).ok == 1
    refs = tmp_path / "refs.csv"
    refs.write_text("path,reference\nelsewhere/call-0000.wav,hello\n")
    args = ("score", str(tmp_path / "out"), "--job", "test-job", "--references", str(refs))
    for extra in ((), ("--json",)):
        done = run_cli(*args, *extra)
        assert done.returncode == 1, done.stderr
        assert "no ok item of job 'test-job' matched" in done.stderr
    assert json.loads(done.stdout)["accuracy"] is None


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_small_job_against_an_unreachable_endpoint_exits_6_naming_the_host(
    tmp_path: Path,
) -> None:
    """Two items, two attempts each: far fewer failures than max_refusals_in_a_row (30),
    yet the same ending as a big job: aborted, exit 6, the host and port named."""
    tone_calls(tmp_path / "media", 2)
    port = _closed_port()
    manifest = write_manifest(
        tmp_path,
        pulse={"endpoint": f"ws://127.0.0.1:{port}/api/v1/pulse/get_text"},
        run={"max_attempts": 2},
    )
    result = batch.run_job(manifest)
    assert (result.status, result.exit_code) == ("aborted", ExitCode.SERVICE_REFUSING)
    assert result.report["abort_kind"] == "service_unreachable"
    assert f"cannot reach the service at 127.0.0.1:{port}" in result.report["abort_reason"]
    done = run_cli("run", str(manifest), env={"SMALLEST_API_KEY": "k-123456"})
    assert done.returncode == ExitCode.SERVICE_REFUSING
    assert f"job stopped: cannot reach the service at 127.0.0.1:{port}" in done.stderr


def test_retry_lines_name_the_file_once() -> None:
    error = ServerReported("overloaded", "busy")
    line = retry_line("/calls/a.wav, channel 1", 2, error, 1.25)
    assert line == (
        "/calls/a.wav, channel 1: attempt 2 failed (service error busy: overloaded); "
        "retrying in 1.2 s"
    )
    named = ConnectionLost("/calls/a.wav: cannot reach the service")
    assert retry_line("/calls/a.wav", 1, named, 0.5).startswith("attempt 1 failed (/calls/a.wav:")


def test_a_retry_is_logged_with_its_file_and_reported_by_kind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tone_calls(tmp_path / "media", 1)
    manifest = write_manifest(
        tmp_path,
        pulse={"endpoint": f"ws://127.0.0.1:{_closed_port()}/api/v1/pulse/get_text"},
        run={"max_attempts": 2},
    )
    with caplog.at_level(logging.INFO, logger="batch"):
        result = batch.run_job(manifest)
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 1 and "call-0000.wav" in retries[0], retries
    # The report says what was retried, by kind, in JSON and in Markdown.
    assert result.report["retries_by_kind"] == {"connection_lost": 1}
    markdown = Path(str(result.report_path).removesuffix(".json") + ".md").read_text()
    assert "1 retries (connection_lost 1)" in markdown


def test_report_prints_each_section_once(tmp_path: Path) -> None:
    tone_calls(tmp_path / "media", 1)
    (tmp_path / "media" / "bad.wav").write_text("not audio")
    manifest = write_manifest(tmp_path)
    batch.run_job(manifest)
    batch.run_job(manifest)
    shown = run_cli("report", str(tmp_path / "out"))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.lower()
    for heading in ("# pulse-batch report", "## failures", "| items | count |"):
        assert text.count(heading) == 1, heading
    assert text.count("job so far") == 1 and "## the job so far" in text


def test_an_unchanged_file_that_failed_to_decode_is_not_streamed_again(tmp_path: Path) -> None:
    good, cut = tone_calls(tmp_path / "media", 2)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # a truncated copy: the header says more
    (tmp_path / "media" / "notes.wav").write_text("not audio")
    manifest = write_manifest(tmp_path)
    first = batch.run_job(manifest)
    kinds = {
        Path(r["source"]).name: r["error_kind"]
        for r in batch.read_table(tmp_path / "out", "transcripts").to_pylist()
    }
    assert kinds == {good.name: None, cut.name: "decode_error", "notes.wav": "not_media"}
    assert (first.ok, first.failed) == (1, 2)

    again = batch.run_job(manifest)  # nothing changed: nothing streamed, still failing
    assert (again.failed, again.skipped_failed, again.exit_code) == (0, 2, ExitCode.ITEMS_FAILED)
    assert batch.run_job(manifest, dry_run=True).report["items"]["to_stream"] == 0

    os.utime(cut)  # the file changed (here: touched): it is tried again, the other is not
    changed = batch.run_job(manifest)
    assert (changed.failed, changed.skipped_failed) == (1, 1)
    asked = batch.run_job(manifest, retry_failed_input=True)
    assert (asked.failed, asked.skipped_failed) == (2, 0)
    cli = run_cli("run", str(manifest), "--retry-failed-input")
    assert cli.returncode == 1 and "failed=2 skipped=1 skipped_failed=0" in cli.stdout


def test_settled_failures_is_pure() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    row = {"item_id": "a", "source": "/m/a.wav", "status": "failed", "finished_at": at}
    rows = [
        {**row, "error_kind": "decode_error"},
        {**row, "item_id": "b", "error_kind": "connection_lost"},  # may pass: retried
        {**row, "item_id": "c", "error_kind": "not_media", "source": "s3://b/c.wav"},  # unknown
    ]
    before, after = at.timestamp() - 1, at.timestamp() + 1
    assert settled_failures(rows, lambda s: None if "://" in s else before) == {"a"}
    assert settled_failures(rows, lambda s: after) == set()
    assert settled_failures(rows, lambda s: None) == set()
    assert local_changed_at("s3://b/c.wav") is None


def test_a_file_listed_twice_with_other_metadata_warns_naming_both_rows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tone_calls(tmp_path / "media", 1)
    (tmp_path / "calls.csv").write_text(
        "path,team\nmedia/call-0000.wav,sales\nmedia/call-0000.wav,support\n"
    )
    manifest = write_manifest(
        tmp_path, inputs=[{"list": "calls.csv", "metadata_columns": ["team"]}]
    )
    with caplog.at_level(logging.INFO, logger="batch"):
        result = batch.run_job(manifest)
    assert result.ok == 1  # one item, streamed once
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    calls = tmp_path / "calls.csv"
    assert f"{calls}: line 2 ({{'team': 'sales'}})" in warning
    assert f"{calls}: line 3 ({{'team': 'support'}})" in warning
    assert "the first row's" in warning
    rows = batch.read_table(tmp_path / "out", "transcripts").to_pylist(maps_as_pydicts="strict")
    assert [r["metadata"] for r in rows] == [{"team": "sales"}]


def test_an_audio_cache_that_cannot_be_written_or_read_is_an_output_error(
    tmp_path: Path,
) -> None:
    """Disk full (a real ENOSPC: /dev/full) while caching a long item, or a cache file
    gone, is what it is: an output error naming the cache (exit 5), not a lost connection."""
    [call] = tone_calls(tmp_path / "media", 1)
    wire = WireFormat("linear16", 16000)
    with pytest.raises(OutputError, match="cannot write the audio cache /dev/full: No space"):
        cache_and_cut(DecodedAudio(str(call), wire), Path("/dev/full"), target_s=0.5,
                      window_s=0.2, pieces=2)  # fmt: skip
    gone = CachedSlice(tmp_path / "nothing.pcm", TimeMap.whole(0, 16000, 16000), wire)
    with pytest.raises(OutputError, match=r"cannot read the audio cache .*nothing\.pcm"):
        list(gone)
    assert exit_code_for(OutputError("x", "write", "full")) == ExitCode.OUTPUT


def test_delta_on_an_s3_endpoint_without_credentials_never_asks_the_metadata_address(
    tmp_path: Path, s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No credentials set, a store named by its endpoint (moto here, MinIO or R2 in life):
    deltalake sends unsigned requests instead of asking 169.254.169.254 for an instance
    role, and the refusal says no credentials were found."""
    url = s3_bucket.url("lake")
    tone_calls(tmp_path / "media", 1)
    made = batch.run_job(write_manifest(tmp_path, output={"path": url, "format": "delta"}))
    assert made.ok == 1
    signed = delta_options(Location.of(url), {})
    assert "aws_skip_signature" not in signed  # credentials set: signed as usual
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws/credentials either
    assert delta_options(Location.of(url), {})["aws_skip_signature"] == "true"
    with pytest.raises(OutputError) as raised:  # as report, status, export, a dry run read
        batch.read_table(url, "transcripts")
    message, cause = str(raised.value), str(raised.value.__cause__)
    assert "no S3 credentials were found" in message, message
    assert "169.254" not in cause and "lacked the necessary privileges" in cause, cause


def test_status_export_and_score_take_the_only_job_without_job(tmp_path: Path) -> None:
    tone_calls(tmp_path / "media", 1)
    manifest = write_manifest(tmp_path)
    batch.run_job(manifest)
    out = str(tmp_path / "out")
    status = run_cli("status", out, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["complete"] is True
    exported = run_cli("export", out, "--format", "txt")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "out" / "_exports" / "test-job" / "txt").is_dir()
    refs = tmp_path / "refs.csv"
    refs.write_text("path,reference\nnowhere.wav,hello\n")
    scored = run_cli("score", out, "--references", str(refs))
    assert scored.returncode == 1 and "job 'test-job'" in scored.stderr  # it chose the job
    # Two jobs: which one is meant cannot be guessed.
    batch.run_job(write_manifest(tmp_path, job="second-job"))
    both = run_cli("status", out)
    assert both.returncode == 2
    assert "holds 2 jobs: second-job, test-job; name one with --job" in both.stderr
    empty = run_cli("export", str(tmp_path / "nothing-here"))
    assert empty.returncode == 2 and "holds no job" in empty.stderr
