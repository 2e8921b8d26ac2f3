"""Local hive-partitioned Parquet tables, committed atomically and exactly once.

Files: ``<table>/<partition folders>/part-<run_id>-<batch>.parquet``; the tables of one batch
share a relative path, so an item's words sit at the same relative path as its transcript.

Commit protocol (a redo log): a batch's files (new rows, and rewrites of earlier files
without the rows it supersedes) are written and fsynced in ``_staging/<job>/<run>-<batch>/``,
then ``PLAN.json`` (every rename and delete the commit makes) is written atomically: that is
the commit point. The renames follow. `recover` rolls a planned batch forward and deletes an
unplanned one, so a kill at any moment leaves each item with exactly one row (its latest
result), its words and utterances beside it. Readers never see a half-written file: every
file appears by an atomic rename.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from batch.model import ItemRows
from batch.output import empty_tables, layout
from batch.output.history import SCAN_COLUMNS, Scan
from batch.output.schema import MAIN_TABLE, TABLES, file_schema, logical_schema, to_arrow
from batch.retry import Backoff, RetryPolicy

logger = logging.getLogger(__name__)
T = TypeVar("T")

_ROW_GROUP_ROWS: Final = 128 * 1024
_READS: Final = RetryPolicy(
    5, Backoff(0.05, 0.4), retry_on=lambda error: isinstance(error, FileNotFoundError)
)
_UPGRADE: Final = ".upgrade"  # staging folder of a version upgrade (no job has a dot)


def _reading(action: Callable[[], T]) -> T:
    """Another job sharing the output may replace a file between listing and reading:
    list again and retry."""
    return _READS.call(action)


def _dataset(root: Path, table: str) -> ds.Dataset | None:
    folder = root / table
    if not folder.exists() or not any(folder.rglob("*.parquet")):
        return None
    # The logical schema makes files written before a column was added read as null there.
    return ds.dataset(folder, format="parquet", partitioning="hive", schema=logical_schema(table))


def read(root: Path, table: str, job: str | None, columns: list[str] | None) -> pa.Table:
    """A table (optionally one job's rows, some columns) as pyarrow; empty if none written."""

    def attempt() -> pa.Table:
        dataset = _dataset(root, table)
        if dataset is None:
            empty = logical_schema(table).empty_table()
            return empty.select(columns) if columns else empty
        expression = (ds.field("job") == job) if job is not None else None
        return dataset.to_table(columns=columns, filter=expression)

    return _reading(attempt)


def scan(root: Path, job: str) -> Scan:
    """Each item's latest result and the files holding its rows, in one pass."""
    wanted = [*SCAN_COLUMNS, "__filename"]
    data = read_with_files(root, MAIN_TABLE, job, wanted)
    out = Scan()
    base = root / MAIN_TABLE
    for item, status, finished, duration, run_id, path in zip(
        *(data[c].to_pylist() for c in wanted), strict=True
    ):
        out.files.setdefault(item, set()).add(Path(path).relative_to(base).as_posix())
        out.row(item, status, finished, duration, run_id)
    return out


def read_with_files(root: Path, table: str, job: str | None, columns: list[str]) -> pa.Table:
    def attempt() -> pa.Table:
        dataset = _dataset(root, table)
        if dataset is None:
            return pa.table({c: pa.array([], pa.string()) for c in columns})
        expression = (ds.field("job") == job) if job is not None else None
        return dataset.to_table(columns=columns, filter=expression)

    return _reading(attempt)


# --- recovery ------------------------------------------------------------------------


def _run_lock_path(root: Path, job: str, run_id: str) -> Path:
    return root / "_staging" / job / f"{run_id}.lock"


@contextlib.contextmanager
def run_lock(root: Path, job: str, run_id: str, label: str = "whole job") -> Iterator[None]:
    """Held by a run while it stages batches, so that `recover` (run by another process
    writing another shard of the job) never touches a live run's work. Its note ends with
    ``; <label>`` (what the run runs: `batch.output.locks.run_label`)."""
    path = _run_lock_path(root, job, run_id)
    # Waits: another run's `live_run_notes` may be testing this lock for a moment.
    with layout.exclusive(path, f"{layout.holder_note()}; {label}", wait=True):
        yield
    path.unlink(missing_ok=True)


def live_run_notes(root: Path, job: str) -> list[str]:
    """The notes of the job's runs that are going (their process holds their run lock)."""
    staging = root / "_staging" / job
    notes = []
    for path in sorted(staging.glob("*.lock")) if staging.is_dir() else []:
        if layout.is_locked(path):
            with contextlib.suppress(OSError):
                notes.append(path.read_text().strip())
    return notes


def apply_plan(root: Path, batch_dir: Path) -> None:
    """Carry out a committed batch's renames and deletes. Idempotent: safe to redo."""
    touched: set[Path] = set()
    for op in plan_steps(batch_dir):
        touched |= apply_step(root, batch_dir, op)
    for folder in touched:
        layout.fsync_dir(folder)
    shutil.rmtree(batch_dir)


def plan_steps(batch_dir: Path) -> list[dict[str, str]]:
    """A committed batch's steps, in the order they are carried out (`_apply_order`)."""
    plan = json.loads((batch_dir / "PLAN.json").read_text())
    return sorted(plan["ops"], key=_apply_order)


def apply_step(root: Path, batch_dir: Path, op: dict[str, str]) -> set[Path]:
    """One rename or delete of a plan (done already: nothing); returns the folder touched."""
    target = root / op["dst"]
    if op["op"] == "move":
        staged = batch_dir / op["src"]
        if staged.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
            return {target.parent}
    elif target.exists():
        target.unlink()
        return {target.parent}
    return set()


def _apply_order(op: dict[str, str]) -> int:
    """The order a plan's steps are carried out in (stable within each), so that a reader
    (or a kill) between two steps never sees an ok row without its words, segments and
    utterances: the new rows of the other tables first (no transcripts row points at them
    yet), then transcripts (superseded rows out, then new ones in: never two rows of an
    item), then the superseded rows of the other tables (no transcripts row points at them
    any more)."""
    main = op["dst"].startswith(f"{MAIN_TABLE}/")
    new = op["op"] == "move" and not op["src"].startswith("rewrite")
    if main:
        return 2 if new else 1
    return 0 if new else 3


def run_alive(root: Path, job: str, run_id: str) -> bool:
    """Whether run ``run_id`` of ``job`` is still going (its process holds its run lock)."""
    path = _run_lock_path(root, job, run_id)
    return path.exists() and layout.is_locked(path)


def recover(root: Path, job: str) -> int:
    """Finish or undo batches that runs which are gone left behind (a live run's batches
    are left alone). Returns how many batches were rolled forward. Under the job's commit
    lock, so a shard's recovery never overlaps another shard's commit."""
    with layout.commit_lock(root, job):
        return _recover(root, job)


def settle(root: Path, job: str) -> None:
    """For readers (status, export): finish the commits that killed runs of ``job`` left
    half-applied, so no item is read with some of its tables only. Does nothing (and
    writes nothing) when there are none. Raises `OSError` when they cannot be finished."""
    staging = root / "_staging" / job
    if staging.is_dir() and any(staging.glob("*/PLAN.json")):
        recover(root, job)


def _recover(root: Path, job: str) -> int:
    staging = root / "_staging" / job
    rolled = 0
    entries = sorted(staging.iterdir()) if staging.exists() else []
    for lock in [e for e in entries if e.suffix == ".lock"]:
        if not layout.is_locked(lock):
            lock.unlink(missing_ok=True)
    for batch_dir in [e for e in entries if e.is_dir()]:
        name = batch_dir.name  # <run_id>-<batch>, or cache-<run_id>
        run_id = (
            name.removeprefix("cache-") if name.startswith("cache-") else name.rsplit("-", 1)[0]
        )
        if _run_lock_path(root, job, run_id).exists():
            continue  # its run is alive (a dead run's lock was removed above)
        if (batch_dir / "PLAN.json").exists():
            apply_plan(root, batch_dir)
            rolled += 1
            logger.info("recovered committed batch %s", batch_dir.name)
        else:
            shutil.rmtree(batch_dir)
            logger.info("discarded uncommitted batch %s", batch_dir.name)
    return rolled


# --- writing -------------------------------------------------------------------------


def _write_file(path: Path, data: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pq.write_table(data, handle, compression="zstd", row_group_size=_ROW_GROUP_ROWS)
        handle.flush()
        os.fsync(handle.fileno())


def _partition_values(relative: str) -> dict[str, str]:
    """Partition columns of a file from its folder names (``job=a/date=b/part.parquet``)."""
    parts = [p.split("=", 1) for p in relative.split("/")[:-1] if "=" in p]
    return {k: v for k, v in parts}


def _read_file(root: Path, table: str, relative: str) -> pa.Table:
    """One file with its partition columns, in the current logical schema."""
    schema = logical_schema(table)
    data = pq.ParquetFile(root / table / relative).read()
    columns = []
    values = _partition_values(relative)
    for column in schema:
        if column.name in data.column_names:
            columns.append(data[column.name].cast(column.type))
        elif column.name in values:
            columns.append(pa.array([values[column.name]] * data.num_rows, column.type))
        else:
            columns.append(pa.nulls(data.num_rows, column.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _stored(data: pa.Table, table: str, partition_by: Sequence[str]) -> pa.Table:
    """The columns a file holds (partition columns live in its folder names)."""
    schema = file_schema(table, partition_by)
    return data.select(schema.names).cast(schema)


class Committer:
    """Commits a run's batches into one job's tables; keeps the scan's item-to-files index
    so that superseding an item rewrites only the files that hold it."""

    def __init__(
        self, root: Path, job: str, run_id: str, partition_by: Sequence[str], index: Scan
    ) -> None:
        self.root = root
        self.job = job
        self.run_id = run_id
        self.partition_by = list(partition_by)
        self.index = index
        self._batches = 0
        # Which of the job's items each file holds. Other processes only ever remove rows
        # from a file, so this is a superset of the truth: a file all of whose items a
        # batch replaces can be deleted unread.
        self._members: dict[str, set[str]] = {}
        for item, relatives in index.files.items():
            for relative in relatives:
                self._members.setdefault(relative, set()).add(item)

    def commit(self, rows: list[ItemRows]) -> None:
        """Write ``rows`` as one atomic batch that also removes every earlier row (in every
        table) of the items it holds. Calls must not overlap."""
        if not rows:
            return
        self._batches += 1
        name = f"{self.run_id}-{self._batches:05d}"
        batch_dir = self.root / "_staging" / self.job / name
        items = {r.item_id for r in rows}
        with layout.commit_lock(self.root, self.job):
            try:
                batch_dir.mkdir(parents=True)
                new_files, ops = self._stage_tables(rows, batch_dir, f"part-{name}.parquet")
                ops += self._stage_supersede(items, batch_dir)
                ops += empty_tables.steps(self.root, ops, self.partition_by, batch_dir)
                layout.fsync_dir(batch_dir)
                layout.write_atomic(batch_dir / "PLAN.json", json.dumps({"ops": ops}).encode())
            except BaseException:
                # Not committed: free the space it took (a full disk is the usual cause).
                shutil.rmtree(batch_dir, ignore_errors=True)
                raise
            apply_plan(self.root, batch_dir)  # committed: a failure here is redone by recover
        for relative in {f for item in items for f in self.index.files.get(item, ())}:
            self._members.get(relative, set()).difference_update(items)
        for item, relatives in new_files.items():
            for relative in relatives:
                self._members.setdefault(relative, set()).add(item)
        for row in rows:
            self.index.files[row.item_id] = set(new_files.get(row.item_id, ()))
            self.index.committed(row, self.run_id)

    def _stage_tables(
        self, rows: list[ItemRows], batch_dir: Path, file_name: str
    ) -> tuple[dict[str, set[str]], list[dict[str, str]]]:
        ops: list[dict[str, str]] = []
        files: dict[str, set[str]] = {}
        for table in TABLES:
            table_rows = [r for item in rows for r in item.by_table()[table]]
            for folder, group in _by_partition(table_rows, self.partition_by).items():
                relative = f"{folder}/{file_name}" if folder else file_name
                data = _stored(to_arrow(table, group), table, self.partition_by)
                staged = f"{len(ops):05d}.parquet"  # flat: staging is quick to clear
                _write_file(batch_dir / staged, data)
                ops.append({"op": "move", "src": staged, "dst": f"{table}/{relative}"})
                for row in group:
                    files.setdefault(str(row["item_id"]), set()).add(relative)
        return files, ops

    def _stage_supersede(self, items: set[str], batch_dir: Path) -> list[dict[str, str]]:
        relatives = sorted({f for item in items for f in self.index.files.get(item, ())})
        ops: list[dict[str, str]] = []
        for relative in relatives:
            whole = self._members.get(relative, set()) <= items
            for table in TABLES:
                if not (self.root / table / relative).exists():
                    continue
                if whole:  # every row of the file is replaced: no need to read it
                    ops.append({"op": "delete", "dst": f"{table}/{relative}"})
                    continue
                ops.extend(self._rewrite_without(table, relative, items, batch_dir, len(ops)))
        return ops

    def _rewrite_without(
        self, table: str, relative: str, items: set[str], batch_dir: Path, number: int
    ) -> list[dict[str, str]]:
        data = _read_file(self.root, table, relative)
        drop = pc.and_(
            pc.is_in(data["item_id"], value_set=pa.array(sorted(items), pa.string())),
            pc.equal(data["job"], self.job),
        )
        kept = data.filter(pc.invert(pc.fill_null(drop, False)))
        return _rewrite_step(data, kept, table, relative, number, batch_dir, self.partition_by)


def repair(root: Path, job: str) -> int:
    """Remove every row (in every table) of items that transcripts holds more than once
    (runs that overlapped wrote them) but of each one's latest result, as one redo-log
    batch under the commit lock. Returns how many items were repaired."""
    with layout.commit_lock(root, job):
        found = scan(root, job)
        keep = {item: found.latest[item].run_id for item in found.duplicates()}
        if not keep:
            return 0
        batch_dir = root / "_staging" / job / f"repair-{time.time_ns()}"
        batch_dir.mkdir(parents=True)
        ops: list[dict[str, str]] = []
        for relative in sorted({f for item in keep for f in found.files.get(item, ())}):
            for table in TABLES:
                if (root / table / relative).exists():
                    ops.extend(_drop_stale(root, table, relative, job, keep, batch_dir, ops))
        layout.fsync_dir(batch_dir)
        layout.write_atomic(batch_dir / "PLAN.json", json.dumps({"ops": ops}).encode())
        apply_plan(root, batch_dir)
        return len(keep)


def _drop_stale(
    root: Path,
    table: str,
    relative: str,
    job: str,
    keep: dict[str, str],
    batch_dir: Path,
    ops: list[dict[str, str]],
) -> list[dict[str, str]]:
    """The step rewriting one file without the rows of ``keep``'s items that are not of
    the run kept (item id -> run id)."""
    data = _read_file(root, table, relative)
    columns = (data[c].to_pylist() for c in ("job", "item_id", "run_id"))
    mask = [not (j == job and keep.get(i, r) != r) for j, i, r in zip(*columns, strict=True)]
    kept = data.filter(pa.array(mask, pa.bool_()))
    partition_by = list(_partition_values(relative))  # in the order of its folders
    return _rewrite_step(data, kept, table, relative, len(ops), batch_dir, partition_by)


def _rewrite_step(
    data: pa.Table,
    kept: pa.Table,
    table: str,
    relative: str,
    number: int,
    batch_dir: Path,
    partition_by: list[str],
) -> list[dict[str, str]]:
    """The redo-log step that leaves only ``kept`` of a file's rows ``data``: none when
    nothing was dropped, a delete when nothing is kept, else a move of the staged file."""
    target = f"{table}/{relative}"
    if kept.num_rows == data.num_rows:
        return []
    if kept.num_rows == 0:
        return [{"op": "delete", "dst": target}]
    staged = f"rewrite-{number:05d}.parquet"
    _write_file(batch_dir / staged, _stored(kept, table, partition_by))
    return [{"op": "move", "src": staged, "dst": target}]


def _by_partition(
    rows: list[dict[str, Any]], partition_by: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        folder = "/".join(f"{col}={row[col]}" for col in partition_by)
        groups.setdefault(folder, []).append(row)
    return groups


# --- schema version 1 to 2 -----------------------------------------------------------


def upgrade_v1(root: Path, partition_by: Sequence[str]) -> int:
    """Rewrite a version-1 output in place: every job keeps one transcripts row per item
    (its latest result) with that run's words and utterances, and every file gets the
    current columns. One redo-log batch, so a kill mid-way is finished by `recover_upgrade`.
    Returns how many rows were dropped."""
    recover_upgrade(root)
    keep: set[tuple[str, str, str]] = set()
    latest: dict[tuple[str, str], tuple[Any, str]] = {}
    wanted = ["job", "item_id", "run_id", "finished_at"]
    main = read(root, MAIN_TABLE, None, wanted)
    for job, item, run_id, finished in zip(*(main[c].to_pylist() for c in wanted), strict=True):
        known = latest.get((job, item))
        if known is None or (finished, run_id) >= known:
            latest[(job, item)] = (finished, run_id)
    keep = {(job, item, run_id) for (job, item), (_, run_id) in latest.items()}
    batch_dir = root / "_staging" / _UPGRADE / "upgrade-v1"
    batch_dir.mkdir(parents=True)
    ops: list[dict[str, str]] = []
    dropped = 0
    for table in TABLES:
        folder = root / table
        for path in sorted(folder.rglob("*.parquet")) if folder.exists() else []:
            relative = path.relative_to(folder).as_posix()
            data = _read_file(root, table, relative)
            keys = zip(*(data[c].to_pylist() for c in ("job", "item_id", "run_id")), strict=True)
            mask = pa.array([key in keep for key in keys], pa.bool_())
            kept = data.filter(mask)
            dropped += data.num_rows - kept.num_rows
            target = f"{table}/{relative}"
            if kept.num_rows == 0:
                ops.append({"op": "delete", "dst": target})
                continue
            _write_file(batch_dir / "rewrite" / target, _stored(kept, table, partition_by))
            ops.append({"op": "move", "src": f"rewrite/{target}", "dst": target})
    layout.fsync_dir(batch_dir)
    layout.write_atomic(batch_dir / "PLAN.json", json.dumps({"ops": ops}).encode())
    apply_plan(root, batch_dir)
    return dropped


def recover_upgrade(root: Path) -> None:
    """Finish (or undo) an upgrade a killed process left behind."""
    staging = root / "_staging" / _UPGRADE
    for batch_dir in sorted(staging.iterdir()) if staging.exists() else []:
        if (batch_dir / "PLAN.json").exists():
            apply_plan(root, batch_dir)
        else:
            shutil.rmtree(batch_dir)
