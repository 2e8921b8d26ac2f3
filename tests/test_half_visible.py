"""Nothing half-visible: an item's ok row is visible only with its words (a Parquet plan
puts transcripts in after the other tables), and `status` and `export` finish a killed
run's pending plan (Parquet) or refuse what a killed run left half-committed (Delta)."""

from __future__ import annotations

import errno
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from batch.errors import ExitCode, OutputError
from batch.job import RunOptions, exit_code, run_job
from batch.manifest import load_manifest
from batch.output import OutputReader, delta, parquet
from tests.conftest import run_cli, write_manifest
from tests.media import Burst, tone_track, write_audio


def _tones(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        track = tone_track([Burst(0.1, 0.3, 300 + 50 * k)], 0.6, 16000)
        write_audio(folder / f"call-{k:02d}.wav", [track], 16000)


def _half_visible(out: Path) -> list[str]:
    """Items shown more than once, or ok without every one of their words."""
    main = OutputReader(out).table(
        "transcripts", "test-job", ["item_id", "status", "run_id", "word_count"]
    )
    words = OutputReader(out).table("words", "test-job", ["item_id", "run_id"])
    have = Counter(zip(words["item_id"].to_pylist(), words["run_id"].to_pylist(), strict=True))
    shown = Counter(main["item_id"].to_pylist())
    wrong = [item for item, count in shown.items() if count > 1]
    for item, status, run_id, count in zip(*main.to_pydict().values(), strict=True):
        if status == "ok" and have[(item, run_id)] != count:
            wrong.append(item)
    return wrong


def _no_space(*_: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.anyio
async def test_a_plan_left_pending_shows_no_ok_row_without_its_words_and_readers_finish_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tones(tmp_path / "media", 3)
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path, output={"path": str(out), "commit_every_items": 3, "partition_by": ["job"]}
    )
    assert exit_code((await run_job(load_manifest(manifest))).report) == 0
    with monkeypatch.context() as patched:  # the disk fills just after the commit point
        patched.setattr(parquet, "apply_plan", _no_space)
        forced = await run_job(load_manifest(manifest), RunOptions(force=True))
    assert exit_code(forced.report) == ExitCode.OUTPUT
    (pending,) = (out / "_staging" / "test-job").glob("*/PLAN.json")

    walked = tmp_path / "walked"  # every state a kill between two steps could leave
    shutil.copytree(out, walked)
    batch_dir = walked / pending.parent.relative_to(out)
    steps = parquet.plan_steps(batch_dir)
    for step in steps:
        assert _half_visible(walked) == [], step
        parquet.apply_step(walked, batch_dir, step)
    assert _half_visible(walked) == []
    assert set(
        OutputReader(walked).table("words", "test-job", ["run_id"])["run_id"].to_pylist()
    ) == {forced.report["run_id"]}

    exported = tmp_path / "exported"
    shutil.copytree(out, exported)
    docs = run_cli(
        "export",
        str(exported),
        "--job",
        "test-job",
        "--format",
        "json",
        "--to",
        str(tmp_path / "docs"),
    )
    assert docs.returncode == 0, docs.output
    for document in (tmp_path / "docs").glob("*.json"):
        assert json.loads(document.read_text())["words"], document.name
    assert not list((exported / "_staging" / "test-job").glob("*/PLAN.json"))

    told = run_cli("status", str(out), "--job", "test-job")
    assert told.returncode == 0, told.output  # the plan was finished: all three ok
    assert not pending.exists() and _half_visible(out) == []


@pytest.mark.anyio
async def test_a_killed_delta_force_run_is_refused_by_export_and_not_done_in_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tones(tmp_path / "media", 2)
    out = tmp_path / "out"
    manifest = write_manifest(
        tmp_path, output={"path": str(out), "format": "delta", "partition_by": ["job"]}
    )
    assert exit_code((await run_job(load_manifest(manifest))).report) == 0
    replace = delta.DeltaCommitter._replace

    def killed_before_transcripts(self: delta.DeltaCommitter, table: str, *args: object) -> None:
        if table == "transcripts":
            raise OutputError(table, "commit a batch to", "killed")
        replace(self, table, *args)  # type: ignore[arg-type]

    with monkeypatch.context() as patched:
        patched.setattr(delta.DeltaCommitter, "_replace", killed_before_transcripts)
        forced = await run_job(load_manifest(manifest), RunOptions(force=True))
    assert exit_code(forced.report) == ExitCode.OUTPUT

    docs = run_cli("export", str(out), "--job", "test-job", "--to", str(tmp_path / "d"))
    assert docs.returncode == ExitCode.OUTPUT, docs.output
    assert "half-committed by a killed run" in docs.output and "run the job again" in docs.output
    told = run_cli("status", str(out), "--job", "test-job")
    assert told.returncode == 1 and "2 item(s) have some of their tables only" in told.output

    assert exit_code((await run_job(load_manifest(manifest))).report) == 0  # redoes them
    docs = run_cli("export", str(out), "--job", "test-job", "--to", str(tmp_path / "d"))
    assert docs.returncode == 0, docs.output
    assert run_cli("status", str(out), "--job", "test-job").returncode == 0
