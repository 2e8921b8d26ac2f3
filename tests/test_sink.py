"""The commit protocol: a batch is in the tables entirely or not at all, after any crash."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batch import sink as sinks
from batch.errors import LockedError, ManifestError


def _rows(item: str, words: int = 2) -> sinks.ItemRows:
    common = {
        "job": "j",
        "date": "2026-11-24",
        "language": "en",
        "run_id": "r1",
        "item_id": item,
        "channel": None,
    }
    transcript = {
        **common,
        "source": f"/{item}.wav",
        "status": "ok",
        "transcript": "a b",
        "started_at": datetime.now(UTC),
        "finished_at": datetime.now(UTC),
        "attempts": 1,
    }
    word_rows = [
        {**common, "segment": 0, "idx": i, "word": "w", "start_s": i, "end_s": i + 0.5}
        for i in range(words)
    ]
    return sinks.ItemRows(transcript, word_rows)


def _sink(out: Path, run_id: str = "r1", **kwargs: object) -> sinks.Sink:
    return sinks.Sink(out, job="j", run_id=run_id, partition_by=["job", "date"], **kwargs)  # type: ignore[arg-type]


def test_commit_writes_partitioned_files_with_schema_version(tmp_path: Path) -> None:
    sink = _sink(tmp_path)
    sink.add(_rows("a"))
    sink.add(_rows("b"))
    sink.commit()
    files = list((tmp_path / "transcripts").rglob("*.parquet"))
    assert [f.parent.relative_to(tmp_path / "transcripts").as_posix() for f in files] == [
        "job=j/date=2026-11-24"
    ]
    metadata = pq.read_schema(files[0]).metadata
    assert metadata[b"pulse_batch.schema_version"] == str(sinks.SCHEMA_VERSION).encode()
    assert "job" not in pq.read_schema(files[0]).names  # partition columns live in folders
    assert sinks.ok_item_ids(tmp_path, "j") == {"a", "b"}
    assert sinks.read_table(tmp_path, "words", "j").num_rows == 4


def _crash_before_rename(out: Path, with_plan: bool) -> None:
    """Leave a batch staged as a process killed at that moment would."""
    sink = _sink(out, run_id="r2")
    sink.add(_rows("c"))
    staged: dict[str, object] = {}
    original = sinks._apply_plan
    sinks._apply_plan = lambda out_dir, batch_dir: staged.setdefault("dir", batch_dir)  # type: ignore[assignment,misc]
    try:
        sink.commit()
    finally:
        sinks._apply_plan = original
    batch_dir = Path(str(staged["dir"]))
    if not with_plan:
        (batch_dir / "PLAN.json").unlink()


@pytest.mark.parametrize("with_plan", [True, False])
def test_recover_rolls_committed_batches_forward_and_others_back(
    tmp_path: Path, with_plan: bool
) -> None:
    _crash_before_rename(tmp_path, with_plan)
    assert sinks.ok_item_ids(tmp_path, "j") == set()  # nothing visible yet
    rolled = sinks.recover(tmp_path, "j")
    assert rolled == (1 if with_plan else 0)
    assert sinks.ok_item_ids(tmp_path, "j") == ({"c"} if with_plan else set())
    assert sinks.read_table(tmp_path, "words", "j").num_rows == (2 if with_plan else 0)
    assert not any(p.is_file() for p in (tmp_path / "_staging").rglob("*"))
    sinks.recover(tmp_path, "j")  # idempotent
    assert sinks.read_table(tmp_path, "words", "j").num_rows == (2 if with_plan else 0)


def test_supersede_replaces_old_ok_rows_and_their_words(tmp_path: Path) -> None:
    first = _sink(tmp_path)
    first.add(_rows("a"))
    first.add(_rows("b"))
    first.commit()
    again = _sink(tmp_path, run_id="r9", supersede={"a", "b"})
    row = _rows("a", words=3)
    row.transcript["run_id"] = "r9"
    again.add(row)
    again.commit()
    table = sinks.read_table(tmp_path, "transcripts", "j")
    assert sorted(zip(table["item_id"].to_pylist(), table["run_id"].to_pylist(), strict=True)) == [
        ("a", "r9"),
        ("b", "r1"),
    ]
    assert sinks.read_table(tmp_path, "words", "j").num_rows == 3 + 2


def test_layout_and_lock_guards(tmp_path: Path) -> None:
    sinks.check_layout(tmp_path, ["job", "date"])
    with pytest.raises(ManifestError, match="partition_by"):
        sinks.check_layout(tmp_path, ["job"])
    assert json.loads((tmp_path / "_pulse_batch.json").read_text())["schema_version"] == 2
    with (
        sinks.job_lock(tmp_path, "j"),
        pytest.raises(LockedError, match="already running"),
        sinks.job_lock(tmp_path, "j"),
    ):
        pass
    with sinks.job_lock(tmp_path, "j"):  # released: free again
        pass


def test_recover_leaves_a_live_runs_batches_alone(tmp_path: Path) -> None:
    """Shards of one job may share an output: recovery must not undo another live run."""
    live = _sink(tmp_path, run_id="20260101T000000Z-aaaaaa")
    live.add(_rows("x"))
    staged = tmp_path / "_staging" / "j" / "20260101T000000Z-aaaaaa-00001"
    staged.mkdir(parents=True)
    (staged / "half-written.parquet").write_bytes(b"PAR1")
    with sinks.run_lock(tmp_path, "j", "20260101T000000Z-aaaaaa"):
        sinks.recover(tmp_path, "j")
        assert staged.exists()  # its owner is alive
    sinks.recover(tmp_path, "j")
    assert not staged.exists()  # its owner is gone: uncommitted, discarded
