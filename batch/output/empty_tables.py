"""Tables that read even with no rows: a Parquet file with the table's columns and no rows.

A glob over a table with no file fails in every reader (DuckDB's
``read_parquet('out/words/**/*.parquet', hive_partitioning=true)``: "No files found"; Polars'
``scan_parquet`` and pyarrow datasets alike), and a job whose items all failed writes no words,
segments or utterances. So a commit that would leave a table without any file also moves an
empty file into it, in the batch's own partition folder (every table has the partition
columns, so the folder of the batch's transcripts fits them all) and under the batch's file
name: an ordinary file of the redo log, read as zero rows by every reader (and by `scan`),
removed like any other when the items of its folder are superseded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batch.output.schema import MAIN_TABLE, TABLES, file_schema

_PREFIX = "empty-"  # staged name: not "rewrite-", so the plan applies it with the new rows


def steps(
    root: Path,
    ops: list[dict[str, str]],
    partition_by: Sequence[str],
    batch_dir: Path,
    at: str | None = None,
) -> list[dict[str, str]]:
    """Stage (in ``batch_dir``) an empty file for each table a batch's ``ops`` would leave
    with no file at all; returns the plan steps that move them in. The moves come before
    the deletes of a plan (`parquet._apply_order`), so the table is never without a file.
    Nothing when the batch writes no transcripts rows, unless ``at`` says where the empty
    files go (a forget removes rows only). Call under the job's commit lock."""
    relative = _main_relative(ops) or at
    if relative is None:
        return []
    added = []
    for table in TABLES:
        if _keeps_a_file(root, table, ops):
            continue
        staged = f"{_PREFIX}{table}.parquet"
        _write_empty(batch_dir / staged, file_schema(table, partition_by))
        added.append({"op": "move", "src": staged, "dst": f"{table}/{relative}"})
    return added


def _main_relative(ops: list[dict[str, str]]) -> str | None:
    """Where the batch's new transcripts file goes, relative to the table's folder."""
    for op in ops:
        main = op["dst"].startswith(f"{MAIN_TABLE}/")
        if main and op["op"] == "move" and not op["src"].startswith("rewrite"):
            return op["dst"].split("/", 1)[1]
    return None


def _keeps_a_file(root: Path, table: str, ops: list[dict[str, str]]) -> bool:
    """Whether ``table`` holds a file once ``ops`` are carried out. Stops at the first one
    found that the batch does not delete (usually the first file listed)."""
    prefix = f"{table}/"
    if any(op["op"] == "move" and op["dst"].startswith(prefix) for op in ops):
        return True
    deleted = {op["dst"] for op in ops if op["op"] == "delete"}
    folder = root / table
    if not folder.is_dir():
        return False
    return any(
        f"{prefix}{path.relative_to(folder).as_posix()}" not in deleted
        for path in folder.rglob("*.parquet")
    )


def _write_empty(path: Path, schema: pa.Schema) -> None:
    with path.open("wb") as handle:
        pq.write_table(schema.empty_table(), handle, compression="zstd")
        handle.flush()
        os.fsync(handle.fileno())
