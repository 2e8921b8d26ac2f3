"""A full disk or a read-only output ends the run with exit 5, loses nothing committed,
and the next run recovers. Uses a small tmpfs (mounting needs root; skipped otherwise)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch.output import OutputReader, store_errors
from tests.conftest import run_cli, write_manifest
from tests.media import tone_calls


def _mount(target: Path, *options: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")


@contextlib.contextmanager
def small_disk(out: Path) -> Iterator[Path]:
    """``out`` on a 512 KiB tmpfs, with its ``_reports`` on a second, roomy one (so the
    report of a run that filled the tables' disk can still be written)."""
    mounted = []
    try:
        _mount(out, "size=512k")
        mounted.append(out)
        _mount(out / "_reports", "size=4m")
        mounted.append(out / "_reports")
        yield out
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def _fill(folder: Path) -> Path:
    """Fill the disk under ``folder`` until the OS says no space is left."""
    filler = folder / "filler.bin"
    with filler.open("wb", buffering=0) as handle:
        for _ in range(10_000):  # bounded: 10,000 x 4 KiB far exceeds the disk
            try:
                handle.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == 28  # ENOSPC
                return filler
    raise AssertionError("the disk never filled up")


def _latest_report(out: Path) -> dict[str, str]:
    report: dict[str, str] = json.loads((out / "_reports" / "test-job" / "latest.json").read_text())
    return report


def test_full_disk_then_read_only_end_with_exit_5_and_the_next_run_recovers(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    with small_disk(out):
        tone_calls(tmp_path / "media", 3)
        manifest = write_manifest(tmp_path, output={"path": "out", "commit_every_items": 1})
        assert run_cli("run", str(manifest)).returncode == 0
        for path in tone_calls(tmp_path / "more", 10):  # new work for the next runs
            path.rename(tmp_path / "media" / f"more-{path.name}")
        filler = _fill(out)

        full = run_cli("run", str(manifest))  # full from the start: the run cannot begin
        assert full.returncode == 5, full.stderr
        assert "No space left on device" in full.stderr and str(out) in full.stderr
        assert "Traceback" not in full.stderr
        assert _latest_report(out)["status"] == "failed_output"

        # Room for a few commits only: the disk fills up in the middle of the run.
        os.truncate(filler, filler.stat().st_size - 40 * 1024)
        metrics = tmp_path / "metrics.prom"  # elsewhere: this disk is full
        midway = run_cli("run", str(manifest), "--metrics-file", str(metrics))
        assert midway.returncode == 5, midway.stderr
        assert "pulse_batch_exit_code 5.0" in metrics.read_text()  # what an alert reads
        assert "No space left on device" in midway.stderr and "Traceback" not in midway.stderr
        report = _latest_report(out)
        assert report["status"] == "failed_output"
        assert "No space left on device" in report["abort_reason"]
        assert "were not committed and will be redone" in report["abort_reason"]
        committed = OutputReader(out).table("transcripts", "test-job", ["item_id"])["item_id"]
        assert 3 <= len(committed) < 13  # nothing committed before was lost
        assert len(set(committed.to_pylist())) == len(committed)

        subprocess.run(["mount", "-o", "remount,ro", str(out)], check=True)
        read_only = run_cli("run", str(manifest))
        assert read_only.returncode == 5, read_only.stderr
        assert "Read-only file system" in read_only.stderr and str(out) in read_only.stderr
        subprocess.run(["mount", "-o", "remount,rw", str(out)], check=True)

        filler.unlink()
        rerun = run_cli("run", str(manifest))
        assert rerun.returncode == 0, rerun.stderr
        assert f"skipped={len(committed)}" in rerun.stdout
        items = (
            OutputReader(out).table("transcripts", "test-job", ["item_id"])["item_id"].to_pylist()
        )
        assert len(items) == len(set(items)) == 13
        assert not [p for p in (out / "_staging").rglob("*") if p.is_file()]


# What deltalake 1.x said when no credentials were set and the metadata service denied.
_RUST_CHAIN = (
    "Kernel error -> Generic S3 error\n          \x1b[31m↳\x1b[0m Error performing PUT "
    "http://169.254.169.254/latest/api/token in 1.35ms - Server returned non-2xx status code\n"
    "           \x1b[31m↳\x1b[0m 403 Forbidden\n"
)


def test_store_errors_become_one_clause_saying_what_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    said = store_errors.reason(OSError(_RUST_CHAIN), "s3://b/lake/transcripts")
    assert said.startswith("no S3 credentials were found; set AWS_ACCESS_KEY_ID")
    gcs = store_errors.reason("NoCredentialsError", "gs://b/lake")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in gcs
    azure = store_errors.reason("AuthorizationFailure", "az://c/lake")
    assert "access denied" in azure and "AZURE_STORAGE_ACCOUNT_KEY" in azure
    # Anything else: the chain on one line, without colour codes or a secret it echoed.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-never-shown")
    odd = store_errors.reason(
        OSError("first\n \x1b[31m↳\x1b[0m s3cr3t-value-never-shown"), "s3://b/x"
    )
    assert odd == "OSError: first; [redacted]"
    assert len(store_errors.one_line("x" * 1000)) == 300
