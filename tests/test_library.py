"""The library call: `batch.run_job` from Python, its result, its errors, `batch.read_table`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import batch
from batch.errors import ExitCode, ManifestError, PulseBatchError, RunFailed
from batch.forget import forget
from batch.manifest import load_manifest
from tests.conftest import write_manifest
from tests.media import tone_calls
from tests.runcli import TIME_UNIT_S

ROOT = Path(__file__).resolve().parent.parent


def _job(tmp_path: Path, calls: int = 2, missing: bool = True) -> Path:
    tone_calls(tmp_path / "media", calls)
    inputs: list[dict[str, str]] = [{"glob": "media/*"}]
    if missing:
        inputs.append({"path": "gone/call-17.wav"})
    return write_manifest(tmp_path, inputs=inputs)


def test_run_job_from_a_plain_python_process(tmp_path: Path) -> None:
    """What an orchestrator's task does: import batch, call run_job, look at the result.
    Importing batch alone loads neither the runner nor pyarrow."""
    manifest = _job(tmp_path)
    script = textwrap.dedent(
        f"""
        import json, sys
        import batch
        light = not {{"batch.job", "pyarrow", "av"}} & set(sys.modules)
        result = batch.run_job({str(manifest)!r})
        words = batch.read_table({str(tmp_path / "out")!r}, "words", job="test-job")
        print(json.dumps({{
            "light": light, "status": result.status, "ok": result.ok,
            "failed": result.failed, "skipped": result.skipped,
            "exit_code": result.exit_code, "report_path": result.report_path,
            "words": words.num_rows,
        }}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60 * TIME_UNIT_S,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["light"] is True
    assert (got["status"], got["ok"], got["failed"], got["skipped"]) == ("completed", 2, 1, 0)
    assert got["exit_code"] == ExitCode.ITEMS_FAILED
    assert got["words"] == 6  # three tones a call
    report = json.loads(Path(got["report_path"]).read_text())
    assert report["items"]["ok"] == 2 and report["status"] == "completed"


def test_a_rerun_skips_what_is_done_and_check_raises_for_failures(tmp_path: Path) -> None:
    manifest = _job(tmp_path)
    first = batch.run_job(manifest, max_failures=1)
    assert (first.ok, first.failed, first.exit_code) == (2, 1, ExitCode.OK)
    assert first.check() is first and first.succeeded
    again = batch.run_job(load_manifest(manifest))  # a loaded manifest works too
    assert (again.ok, again.failed, again.skipped) == (0, 1, 2)  # the missing file is retried
    with pytest.raises(RunFailed) as raised:
        again.check()
    assert raised.value.result is again
    assert "exit 1" in str(raised.value) and str(again.report_path) in str(raised.value)
    assert isinstance(raised.value, PulseBatchError)


def test_nothing_to_do_and_dry_run(tmp_path: Path) -> None:
    manifest = _job(tmp_path, calls=1, missing=False)
    planned = batch.run_job(manifest, dry_run=True)
    assert (planned.status, planned.report_path, planned.exit_code) == ("dry_run", None, 0)
    assert planned.report["items"]["to_stream"] == 1
    assert not (tmp_path / "out" / "transcripts").exists()  # a dry run writes no table
    batch.run_job(manifest)
    done = batch.run_job(manifest)
    assert done.nothing_to_do and (done.skipped, done.exit_code) == (1, 0)
    forced = batch.run_job(manifest, force=True)
    assert (forced.ok, forced.skipped) == (1, 0)
    rows = batch.read_table(tmp_path / "out", "transcripts", columns=["run_id", "status"])
    assert rows.column_names == ["run_id", "status"]
    assert rows.to_pylist() == [{"run_id": forced.run_id, "status": "ok"}]  # the redo replaced


@pytest.mark.anyio
async def test_the_async_twin_inside_an_event_loop(tmp_path: Path) -> None:
    manifest = _job(tmp_path, calls=1, missing=False)
    with pytest.raises(ManifestError, match="await batch"):
        batch.run_job(manifest)
    result = await batch.run_job_async(manifest, shard="0/1")
    assert (result.status, result.ok, result.exit_code) == ("completed", 1, 0)


def test_bad_options_and_tables_are_errors_of_the_tree(tmp_path: Path) -> None:
    manifest = _job(tmp_path, calls=1, missing=False)
    with pytest.raises(ManifestError, match="not both"):
        batch.run_job(manifest, max_failures=1, max_failure_ratio=0.5)
    with pytest.raises(ManifestError, match="I/N"):
        batch.run_job(manifest, shard="first")
    with pytest.raises(ManifestError, match="no such manifest"):
        batch.run_job(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError, match="unknown table 'word'"):
        batch.read_table(tmp_path / "out", "word")
    empty = batch.read_table(tmp_path / "out", "words", job="test-job")
    assert empty.num_rows == 0 and "item_id" in empty.column_names


def test_a_forgotten_item_is_counted_not_run(tmp_path: Path) -> None:
    manifest = _job(tmp_path, calls=2, missing=False)
    first = batch.run_job(manifest)
    ids = batch.read_table(tmp_path / "out", "transcripts", columns=["item_id"])["item_id"]
    gone = str(ids[0])
    forget(str(tmp_path / "out"), "test-job", items=[gone], reason="ticket 1")
    again = batch.run_job(manifest)
    assert (first.ok, again.ok, again.forgotten, again.skipped) == (2, 0, 1, 1)
