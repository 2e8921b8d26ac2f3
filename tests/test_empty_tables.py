"""Every table reads, even with no rows: a job whose items all failed is read back by DuckDB,
Polars and pyarrow globs (Parquet) and by Delta readers, with `date` a date in Delta."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import anyio
import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
from deltalake import DeltaTable, write_deltalake

from batch.output import TABLES, JobOutput, OutputReader, parquet
from batch.output.delta import delta_options
from batch.output.layout import Location
from batch.output.schema import logical_schema
from tests import tables as read_back
from tests.conftest import S3Bucket
from tests.rows import rows, write

CHILDREN = [t for t in TABLES if t != "transcripts"]


def _counts_by_glob(out: Path, *tables: str) -> dict[str, tuple[int, int, int]]:
    """Rows of each table (default: all) as DuckDB, Polars and pyarrow read its glob."""
    counts = {}
    for table in tables or TABLES:
        glob = f"{out}/{table}/**/*.parquet"
        files = read_back.parquet(out, table)
        in_duckdb = duckdb.sql(f"SELECT count(*) FROM {files}").fetchall()[0][0]
        in_polars = pl.scan_parquet(glob, hive_partitioning=True).collect().height
        in_arrow = ds.dataset(out / table, format="parquet", partitioning="hive").count_rows()
        counts[table] = (in_duckdb, in_polars, in_arrow)
    return counts


def test_a_job_whose_items_all_failed_reads_as_empty_tables(tmp_path: Path) -> None:
    write(tmp_path, [[rows("a", status="failed"), rows("b", status="failed")]])
    counts = _counts_by_glob(tmp_path)
    assert counts == {"transcripts": (2, 2, 2), **{t: (0, 0, 0) for t in CHILDREN}}
    # The columns are the table's, partition columns from the folders as usual.
    words = duckdb.sql(f"SELECT * FROM {read_back.parquet(tmp_path, 'words')}")
    assert {"job", "date", "item_id", "word", "start_s"} <= set(words.columns)
    history = OutputReader(tmp_path).history("j")
    assert (history.ok, history.failed) == (set(), {"a", "b"})
    assert OutputReader(tmp_path).table("words", "j").num_rows == 0


def test_empty_files_give_way_to_rows_and_come_back_when_none_are_left(tmp_path: Path) -> None:
    """Superseding (a rerun, --force) replaces the empty files like any other; a table
    never ends with no file, and never collects one empty file per batch."""
    write(tmp_path, [[rows("a", status="failed")], [rows("b", status="failed")]])
    assert _counts_by_glob(tmp_path)["words"] == (0, 0, 0)
    assert len(list((tmp_path / "words").rglob("*.parquet"))) == 1  # not one per batch
    write(tmp_path, [[rows("a", 3, "r2", at=10), rows("b", 2, "r2", at=10)]], run_id="r2")
    assert _counts_by_glob(tmp_path)["words"] == (5, 5, 5)
    assert sorted({r[:2] for r in _words(tmp_path)}) == [("a", "r2"), ("b", "r2")]
    write(
        tmp_path,
        [[rows("a", run_id="r3", status="failed", at=20)], [rows("b", 0, "r3", at=20)]],
        run_id="r3",
    )
    assert _counts_by_glob(tmp_path) == {
        "transcripts": (2, 2, 2),
        **{t: (0, 0, 0) for t in CHILDREN},
    }
    history = OutputReader(tmp_path).history("j")
    assert (history.ok, history.failed) == ({"b"}, {"a"})
    for table in CHILDREN:  # transcripts: one file per batch, as always
        assert len(list((tmp_path / table).rglob("*.parquet"))) == 1, table


def _words(out: Path) -> list[tuple[str, str, int]]:
    data = OutputReader(out).table("words", "j")
    return list(zip(*(data[c].to_pylist() for c in ("item_id", "run_id", "idx")), strict=True))


def test_delta_tables_read_empty_with_a_date_typed_date(tmp_path: Path) -> None:
    write(tmp_path, [[rows("a", status="failed")]], fmt="delta")
    for table in TABLES:
        frame = pl.read_delta(str(tmp_path / table))
        assert frame.height == (1 if table == "transcripts" else 0), table
        assert frame.schema["date"] == pl.Date, table
    write(tmp_path, [[rows("a", 2, "r2", at=10)]], run_id="r2", fmt="delta")
    words = pl.read_delta(str(tmp_path / "words"))
    assert words["date"].to_list() == [dt.date(2026, 11, 24)] * 2
    arrow = DeltaTable(str(tmp_path / "words")).to_pyarrow_dataset().to_table()
    assert arrow.schema.field("date").type == pa.date32() and arrow.num_rows == 2
    # The library's own readers still see the text they always did.
    assert OutputReader(tmp_path).table("words", "j")["date"].to_pylist() == ["2026-11-24"] * 2
    assert OutputReader(tmp_path).history("j").ok == {"a"}


def test_a_delta_table_with_a_text_date_keeps_taking_rows(tmp_path: Path) -> None:
    """Tables created before `date` was a date keep their text column."""
    for table in TABLES:
        write_deltalake(
            str(tmp_path / table),
            logical_schema(table).empty_table(),
            partition_by=["job", "date"],
        )
    write(tmp_path, [[rows("a", 2)]], fmt="delta")
    assert pl.read_delta(str(tmp_path / "words"))["date"].to_list() == ["2026-11-24"] * 2
    assert OutputReader(tmp_path).history("j").ok == {"a"}


def test_delta_on_s3_stores_date_as_a_date(s3_bucket: S3Bucket) -> None:
    url = s3_bucket.url("lake")

    async def main() -> None:
        with JobOutput.open(url, "j", ["job", "date"], "delta") as output:
            async with output.run("r1", commit_every_items=10) as writer:
                await writer.add(rows("a", 2))

    anyio.run(main)
    assert OutputReader(url).table("words", "j")["date"].to_pylist() == ["2026-11-24"] * 2
    for table in TABLES:
        found = DeltaTable(f"{url}/{table}", storage_options=delta_options(Location.of(url), {}))
        assert pa.schema(found.schema().to_arrow()).field("date").type == pa.date32(), table
    assert OutputReader(url).history("j").ok == {"a"}


def test_every_table_reads_at_every_step_of_a_commit(tmp_path: Path, monkeypatch: Any) -> None:
    """A kill between any two renames of a commit (or a reader looking then) never finds
    words, segments or utterances with no file: the empty file goes in before the last
    rows go out. (transcripts swaps its superseded file for the new one: never both.)"""
    write(tmp_path, [[rows("a", 2)]])
    staged: dict[str, Path] = {}
    monkeypatch.setattr(parquet, "apply_plan", lambda root, d: staged.setdefault("dir", d))
    write(tmp_path, [[rows("a", run_id="r2", status="failed", at=5)]], run_id="r2")
    monkeypatch.undo()
    steps = parquet.plan_steps(staged["dir"])
    for step in steps:
        parquet.apply_step(tmp_path, staged["dir"], step)
        assert all(len(_counts_by_glob(tmp_path, table)) == 1 for table in CHILDREN)
    assert _counts_by_glob(tmp_path)["words"] == (0, 0, 0)
    JobOutput.open(tmp_path, "j", ["job", "date"]).close()  # recovery: the plan is done
    assert OutputReader(tmp_path).history("j").failed == {"a"}
