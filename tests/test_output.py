"""The output boundary: one row per item, atomic commits after any crash, layout guards."""

from __future__ import annotations

import json
import multiprocessing
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.errors import LockedError, ManifestError
from batch.model import ItemRows
from batch.output import SCHEMA_VERSION, JobOutput, OutputReader, layout, parquet
from batch.output.history import Scan
from batch.output.schema import to_arrow
from tests.rows import T0, open_output, rows, write


def table(out: Path, name: str = "transcripts") -> list[tuple[Any, ...]]:
    data = OutputReader(out).table(name, "j")
    key = ["item_id", "run_id", "status"] if name == "transcripts" else ["item_id", "run_id", "idx"]
    return sorted(zip(*(data[c].to_pylist() for c in key), strict=True))


def test_commit_writes_partitioned_files_with_schema_version(tmp_path: Path) -> None:
    write(tmp_path, [[rows("a"), rows("b")]])
    files = list((tmp_path / "transcripts").rglob("*.parquet"))
    assert [f.parent.relative_to(tmp_path / "transcripts").as_posix() for f in files] == [
        "job=j/date=2026-11-24"
    ]
    metadata = pq.read_schema(files[0]).metadata
    assert metadata[b"pulse_batch.schema_version"] == str(SCHEMA_VERSION).encode() == b"2"
    assert "job" not in pq.read_schema(files[0]).names  # partition columns live in folders
    assert OutputReader(tmp_path).history("j").ok == {"a", "b"}
    assert OutputReader(tmp_path).table("words", "j").num_rows == 4


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_every_result_replaces_the_items_earlier_rows_in_the_same_commit(
    tmp_path: Path, fmt: str
) -> None:
    write(tmp_path, [[rows("a"), rows("b")], [rows("c", status="failed")]], "r1", fmt=fmt)
    # A failure after ok, an ok after a failure, a new ok after ok: one row each, the latest.
    write(
        tmp_path,
        [[rows("a", run_id="r2", status="failed", at=10)], [rows("c", 3, "r2", at=10)]],
        run_id="r2",
        fmt=fmt,
    )
    write(tmp_path, [[rows("b", 1, "r3", at=20), rows("a", 1, "r3", at=20)]], "r3", fmt=fmt)
    assert table(tmp_path) == [("a", "r3", "ok"), ("b", "r3", "ok"), ("c", "r2", "ok")]
    assert table(tmp_path, "words") == [
        ("a", "r3", 0), ("b", "r3", 0), ("c", "r2", 0), ("c", "r2", 1), ("c", "r2", 2),
    ]  # fmt: skip
    history = OutputReader(tmp_path).history("j")
    assert (history.ok, history.failed) == ({"a", "b", "c"}, set())
    assert history.summary == {
        "runs_with_rows": 2, "items": 3, "ok": 3, "failed": 0, "audio_s": 3.0,
    }  # fmt: skip


def test_a_row_that_does_not_fit_fails_its_item_alone(tmp_path: Path) -> None:
    odd = rows("odd")
    odd.transcript["detected_language"] = 5  # a number where the schema wants text
    odd.words[0]["start_s"] = "soon"
    odder = rows("odder")
    odder.transcript["channel"] = "left"  # even a column that says which item it is

    async def main() -> list[ItemRows]:
        with open_output(tmp_path) as output:
            async with output.run("r1", commit_every_items=4) as writer:
                return [await writer.add(r) for r in (rows("a"), odd, odder, rows("b"))]

    stored = anyio.run(main)
    assert [r.transcript["status"] for r in stored] == ["ok", "failed", "failed", "ok"]
    assert table(tmp_path) == [
        ("a", "r1", "ok"), ("b", "r1", "ok"), ("odd", "r1", "failed"), ("odder", "r1", "failed"),
    ]  # fmt: skip
    failed = OutputReader(tmp_path).table("transcripts", "j").to_pylist()
    bad = next(r for r in failed if r["item_id"] == "odd")
    assert bad["error_kind"] == "protocol" and "/odd.wav" in bad["error"]
    assert "detected_language" in bad["error"] or "int" in bad["error"]
    assert {r["item_id"] for r in OutputReader(tmp_path).table("words", "j").to_pylist()} == {
        "a",
        "b",
    }


def _crash_before_rename(out: Path, with_plan: bool) -> None:
    """Leave a batch staged as a process killed at that moment would."""
    staged: dict[str, Path] = {}
    original = parquet.apply_plan
    parquet.apply_plan = lambda root, batch_dir: staged.setdefault("dir", batch_dir)  # type: ignore[assignment,misc]
    try:
        write(out, [[rows("c", run_id="r2"), rows("a", 3, run_id="r2", at=5)]], run_id="r2")
    finally:
        parquet.apply_plan = original
    if not with_plan:
        (staged["dir"] / "PLAN.json").unlink()


@pytest.mark.parametrize("with_plan", [True, False])
def test_recover_rolls_committed_batches_forward_and_others_back(
    tmp_path: Path, with_plan: bool
) -> None:
    write(tmp_path, [[rows("a")]])
    _crash_before_rename(tmp_path, with_plan)
    assert table(tmp_path) == [("a", "r1", "ok")]  # nothing of the batch visible yet
    open_output(tmp_path).close()  # opening recovers
    if with_plan:
        assert table(tmp_path) == [("a", "r2", "ok"), ("c", "r2", "ok")]
        assert len(table(tmp_path, "words")) == 3 + 2
    else:
        assert table(tmp_path) == [("a", "r1", "ok")]
        assert len(table(tmp_path, "words")) == 2
    assert not any(p.is_file() for p in (tmp_path / "_staging").rglob("*"))


def test_layout_and_lock_guards(tmp_path: Path) -> None:
    open_output(tmp_path).close()
    with pytest.raises(ManifestError, match="partition_by"):
        JobOutput.open(tmp_path, "j", ["job"], "parquet")
    with pytest.raises(ManifestError, match="written as parquet"):
        JobOutput.open(tmp_path, "j", ["job", "date"], "delta")
    marker = json.loads((tmp_path / "_pulse_batch.json").read_text())
    assert marker == {"schema_version": 2, "format": "parquet", "partition_by": ["job", "date"]}
    with open_output(tmp_path), pytest.raises(LockedError, match="already running"):
        open_output(tmp_path)
    open_output(tmp_path).close()  # released: free again
    with pytest.raises(ManifestError, match=r"use output.format: delta"):
        JobOutput.open("s3://bucket/out", "j", ["job"], "parquet")


def _race(out: str, partition: str, start: Any, results: Any) -> None:
    start.wait()
    try:
        layout.check_layout(Path(out), [partition], "parquet")
        results.put((partition, "ok"))
    except ManifestError:
        results.put((partition, "refused"))


def test_two_jobs_racing_on_a_new_output_never_both_write_the_marker(tmp_path: Path) -> None:
    for attempt in range(10):
        out = tmp_path / f"out{attempt}"
        ctx = multiprocessing.get_context("fork")
        start, results = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_race, args=(str(out), p, start, results))
            for p in ("job", "date", "job", "date")
        ]
        for proc in procs:
            proc.start()
        start.set()
        for proc in procs:
            proc.join(10)
        outcome = sorted(results.get(timeout=5) for _ in procs)
        winner = json.loads((out / "_pulse_batch.json").read_text())["partition_by"][0]
        assert outcome == sorted(
            (p, "ok" if p == winner else "refused") for p in ("job", "date", "job", "date")
        )
        assert not list(out.glob(".*.tmp"))


def test_recover_leaves_a_live_runs_batches_alone(tmp_path: Path) -> None:
    """Shards of one job may share an output: recovery must not undo another live run."""
    staged = tmp_path / "_staging" / "j" / "20260101T000000Z-aaaaaa-00001"
    staged.mkdir(parents=True)
    (staged / "half-written.parquet").write_bytes(b"PAR1")
    with parquet.run_lock(tmp_path, "j", "20260101T000000Z-aaaaaa"):
        parquet.recover(tmp_path, "j")
        assert staged.exists()  # its owner is alive
    parquet.recover(tmp_path, "j")
    assert not staged.exists()  # its owner is gone: uncommitted, discarded


def _write_v1(out: Path) -> None:
    """An output as version 1 wrote it: several rows per item, no newer columns."""
    out.mkdir()
    marker = {"schema_version": 1, "partition_by": ["job", "date"]}
    (out / "_pulse_batch.json").write_text(json.dumps(marker))
    runs = [("r1", [("a", "ok"), ("b", "failed")]), ("r2", [("a", "ok"), ("b", "ok")])]
    for at, (run_id, items) in enumerate(runs):
        folder = "job=j/date=2026-11-24"
        transcripts = [
            {"language": "en", "run_id": run_id, "item_id": item, "status": status,
             "finished_at": T0 + timedelta(seconds=at), "duration_s": 1.0, "attempts": 1}
            for item, status in items
        ]  # fmt: skip
        words = [
            {"language": "en", "run_id": run_id, "item_id": item, "idx": 0, "word": "w"}
            for item, status in items
            if status == "ok"
        ]
        for name, data in (("transcripts", transcripts), ("words", words)):
            path = out / name / folder / f"part-{run_id}-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(data), path)


def test_a_version_1_output_is_upgraded_in_place_on_first_open(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_v1(out)
    assert len(OutputReader(out).table("transcripts", "j")) == 4
    open_output(out).close()
    assert json.loads((out / "_pulse_batch.json").read_text())["schema_version"] == 2
    assert table(out) == [("a", "r2", "ok"), ("b", "r2", "ok")]
    assert table(out, "words") == [("a", "r2", 0), ("b", "r2", 0)]
    for path in (out / "transcripts").rglob("*.parquet"):  # every file has today's columns
        assert "error_kind" in pq.read_schema(path).names
    write(out, [[rows("a", 1, "r3", at=30)]], run_id="r3")
    assert table(out) == [("a", "r3", "ok"), ("b", "r2", "ok")]


def test_delta_redoes_an_item_whose_transcripts_commit_never_happened(tmp_path: Path) -> None:
    """A run killed between its words commit and its transcripts commit (Delta commits
    table by table): the item is not taken as done, and its redo replaces everything."""
    write(tmp_path, [[rows("a"), rows("b")]], fmt="delta")
    with open_output(tmp_path, fmt="delta") as output:
        output.history()
        committer = output._backend.committer("j", "r2", output._index or Scan())
        words = to_arrow("words", rows("a", 5, run_id="r2", at=10).words)
        committer._replace("words", words, "job = 'j' AND item_id IN ('a')")
    history = OutputReader(tmp_path).history("j")  # read without a lock, as status and export do
    assert history.ok == {"b"} and history.unfinished == {"a"}  # not shown as done
    with open_output(tmp_path, fmt="delta") as output:
        assert output.history().ok == {"b"}  # a run's own scan redoes the half-committed item
    write(tmp_path, [[rows("a", 1, "r3", at=20)]], run_id="r3", fmt="delta")
    assert table(tmp_path) == [("a", "r3", "ok"), ("b", "r1", "ok")]
    assert table(tmp_path, "words") == [("a", "r3", 0), ("b", "r1", 0), ("b", "r1", 1)]
