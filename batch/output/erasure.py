"""Removing items' rows from every table (`pulse-batch forget`), per table format.

Local Parquet: one redo-log batch (`batch.output.parquet`) rewrites every file holding a
row of the items without those rows (or deletes it), under the job's commit lock: the
rows go from all four tables at once, and a kill at any moment is finished by the next
`recover`. A table left without a file gets an empty one (`batch.output.empty_tables`),
so a glob over it still reads (0 rows).

Delta: one DELETE transaction per table (per 500 items), the tables hanging off
transcripts first and transcripts last, as a run commits: until transcripts goes, the
item still shows. The files holding the old rows stay in the table's folder (earlier
versions need them) until ``pulse-batch compact`` vacuums files older than its retention.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from batch.output import empty_tables, layout, parquet
from batch.output.schema import MAIN_TABLE, TABLES

CHUNK_ITEMS = 500  # item ids per Delta predicate


def parquet_rows(root: Path, job: str, items: Collection[str], partition_by: list[str]) -> None:
    """Remove every row of ``items`` of ``job`` from every table, as one atomic batch."""
    if not items:
        return
    wanted = pa.array(sorted(items), pa.string())
    with layout.commit_lock(root, job):
        batch_dir = root / "_staging" / job / f"forget-{time.time_ns()}"
        batch_dir.mkdir(parents=True)
        try:
            ops: list[dict[str, str]] = []
            for table in TABLES:
                for relative in _files_holding(root, table, job, set(items)):
                    data = parquet._read_file(root, table, relative)
                    drop = pc.and_(
                        pc.is_in(data["item_id"], value_set=wanted), pc.equal(data["job"], job)
                    )
                    kept = data.filter(pc.invert(pc.fill_null(drop, False)))
                    partitions = list(parquet._partition_values(relative))
                    ops += parquet._rewrite_step(
                        data, kept, table, relative, len(ops), batch_dir, partitions
                    )
            if not ops:
                shutil.rmtree(batch_dir)
                return
            ops += empty_tables.steps(root, ops, partition_by, batch_dir, at=_empty_at(ops))
            layout.fsync_dir(batch_dir)
            layout.write_atomic(batch_dir / "PLAN.json", json.dumps({"ops": ops}).encode())
        except BaseException:
            shutil.rmtree(batch_dir, ignore_errors=True)  # not committed
            raise
        parquet.apply_plan(root, batch_dir)  # committed: a failure here is redone by recover


def _files_holding(root: Path, table: str, job: str, items: set[str]) -> list[str]:
    """The files of ``table`` (relative to its folder) holding a row of ``items``."""
    found = parquet.read_with_files(root, table, job, ["item_id", "__filename"])
    base = root / table
    return sorted(
        {
            Path(path).relative_to(base).as_posix()
            for item, path in zip(*(found[c].to_pylist() for c in found.column_names), strict=True)
            if item in items
        }
    )


def _empty_at(ops: list[dict[str, str]]) -> str:
    """Where a table left with no file gets its empty one: the folder of a transcripts
    file the batch touches (its partition folders fit every table), under a new name."""
    touched = [op["dst"].split("/", 1)[1] for op in ops if op["dst"].startswith(f"{MAIN_TABLE}/")]
    relative = touched[0] if touched else ops[0]["dst"].split("/", 1)[1]
    folder = relative.rsplit("/", 1)[0] if "/" in relative else ""
    name = f"part-forget-{time.time_ns()}.parquet"
    return f"{folder}/{name}" if folder else name


def delta_rows(delete: Callable[[str, str], Any], job: str, items: Collection[str]) -> None:
    """Remove every row of ``items`` of ``job``: ``delete(table, predicate)`` is one DELETE
    transaction; the other tables first, transcripts last."""
    ordered = sorted(items)
    for start in range(0, len(ordered), CHUNK_ITEMS):
        chosen = ", ".join(_quoted(i) for i in ordered[start : start + CHUNK_ITEMS])
        predicate = f"job = {_quoted(job)} AND item_id IN ({chosen})"
        for table in (*(t for t in TABLES if t != MAIN_TABLE), MAIN_TABLE):
            delete(table, predicate)


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
