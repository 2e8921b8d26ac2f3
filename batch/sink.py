"""Partitioned Parquet tables, committed atomically and exactly once.

Layout under the output folder::

    transcripts/job=J/date=D/part-<run_id>-<batch>.parquet     (and words/, utterances/)
    _staging/<job>/<run_id>-<batch>/                           files being committed
    _staging/<job>/<run_id>.lock                               held while that run is alive
    _locks/<job>.lock                                          one run per job at a time
                                                               (shared by its shards)
    _locks/<job>.shard-<I>-of-<N>.lock                         one run per shard at a time
    _locks/<job>.commit.lock                                   one commit or recovery at once
    _pulse_batch.json                                          schema version, partitioning

Commit protocol (a redo log): a batch's files are written and fsynced in its staging folder,
then ``PLAN.json`` (every rename and delete the commit makes) is written atomically: that is
the commit point. The renames follow. `recover` rolls a planned batch forward and deletes an
unplanned one, so a kill at any moment leaves each finished item's rows in the tables exactly
once, or not at all (and the rerun redoes it). Readers never see a half-written file: every
file appears by an atomic rename. The three tables of one batch share a file name, so the
words of a transcripts file are found at the same relative path under ``words/``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from batch.errors import LockedError, ManifestError
from batch.shard import Shard

logger = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION: Final = 2
PARTITION_CHOICES: Final = ("job", "date", "language")
TABLES: Final = ("transcripts", "segments", "words", "utterances")
_ROW_GROUP_ROWS: Final = 128 * 1024
_UTC_MS = pa.timestamp("ms", tz="UTC")

# Columns every table has, so any of them can be a partition column.
_COMMON = [
    ("job", pa.string(), "job name from the manifest"),
    ("date", pa.string(), "UTC date the run started, YYYY-MM-DD"),
    ("language", pa.string(), "language option the item was transcribed with"),
    ("run_id", pa.string(), "the run that wrote the row"),
    ("item_id", pa.string(), "stable id: same source, channel and options, same id"),
    ("channel", pa.int32(), "channel index under channels: split or an index; null when mixed"),
]

COLUMNS: Final[dict[str, list[tuple[str, pa.DataType, str]]]] = {
    "transcripts": [
        *_COMMON,
        ("channel_name", pa.string(), "name from run.channel_names, if given"),
        ("source", pa.string(), "as listed: absolute path (symlinks not followed) or URL"),
        ("status", pa.string(), "ok or failed"),
        ("error_kind", pa.string(), "why it failed (see README), null when ok"),
        ("error", pa.string(), "the failure message, naming the file; null when ok"),
        ("attempts", pa.int32(), "session attempts for the item in this run (refusals too)"),
        ("pieces", pa.int32(), "sessions the recording was split into (1: streamed whole)"),
        ("duration_s", pa.float64(), "exact audio seconds sent (decoded samples / rate)"),
        ("transcript", pa.string(), "final segments joined by spaces"),
        ("detected_language", pa.string(), "language the service reported on the last final"),
        (
            "languages",
            pa.list_(pa.string()),
            "every language the service reported, first-seen order",
        ),
        (
            "redacted_entities",
            pa.list_(pa.string()),
            "every redaction placeholder, in order ([CREDITCARDNUMBER_1], ...)",
        ),
        (
            "full_transcript",
            pa.string(),
            "the service's own cumulative transcript (pieces joined); null when off",
        ),
        ("quality", pa.string(), "why the words look impossible (see README); null when fine"),
        ("session_id", pa.string(), "the service's id of the successful session"),
        ("word_count", pa.int32(), "rows this item has in words"),
        ("started_at", _UTC_MS, "when the item's first attempt started"),
        ("finished_at", _UTC_MS, "when the item finished or gave up"),
        ("options", pa.string(), "the Pulse options sent, as JSON"),
        ("metadata", pa.map_(pa.string(), pa.string()), "extra columns of a list input"),
    ],
    "segments": [
        *_COMMON,
        ("segment", pa.int32(), "index of the final segment in the item (as words.segment)"),
        ("text", pa.string(), "the segment's transcript"),
        (
            "detected_language",
            pa.string(),
            "language the service reported on this final (`language` is the option asked)",
        ),
        ("start_s", pa.float64(), "first word's start (else utterance's); null if untimed"),
        ("end_s", pa.float64(), "last word's end (else utterance's); null if untimed"),
        ("redacted_entities", pa.list_(pa.string()), "placeholders in this segment"),
        ("piece", pa.int32(), "piece of a split long recording it came from; null if whole"),
    ],
    "words": [
        *_COMMON,
        ("segment", pa.int32(), "index of the final segment the word came in"),
        ("idx", pa.int32(), "position of the word in the item, from 0"),
        ("word", pa.string(), "the word as recognised"),
        ("start_s", pa.float64(), "start, seconds from the start of the file"),
        ("end_s", pa.float64(), "end, seconds from the start of the file"),
        ("confidence", pa.float64(), "0-1, when the service gives it"),
        ("speaker", pa.string(), "speaker label when diarize is on"),
        ("speaker_confidence", pa.float64(), "0-1 when diarize is on"),
        ("piece", pa.int32(), "piece of a split long recording it came from; null if whole"),
    ],
    "utterances": [
        *_COMMON,
        ("idx", pa.int32(), "position of the utterance in the item, from 0"),
        ("text", pa.string(), "the sentence"),
        ("start_s", pa.float64(), "start, seconds from the start of the file"),
        ("end_s", pa.float64(), "end, seconds from the start of the file"),
        ("speaker", pa.string(), "speaker label when diarize is on"),
        ("piece", pa.int32(), "piece of a split long recording it came from; null if whole"),
    ],
}


def logical_schema(table: str) -> pa.Schema:
    """All columns as readers see them (partition columns included)."""
    return pa.schema([pa.field(name, kind) for name, kind, _ in COLUMNS[table]])


def file_schema(table: str, partition_by: Sequence[str]) -> pa.Schema:
    """Columns stored inside the files: partition columns live in the folder names."""
    fields = [pa.field(n, k) for n, k, _ in COLUMNS[table] if n not in partition_by]
    metadata = {"pulse_batch.schema_version": str(SCHEMA_VERSION), "pulse_batch.table": table}
    return pa.schema(fields, metadata=metadata)


@dataclass
class ItemRows:
    """One finished item's rows for each table (partition and bookkeeping columns included)."""

    transcript: dict[str, Any]
    words: list[dict[str, Any]] = field(default_factory=list)
    utterances: list[dict[str, Any]] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)


# --- output folder, lock, recovery -----------------------------------------------


def check_layout(out_dir: Path, partition_by: Sequence[str]) -> None:
    """Record the partitioning on first use; refuse a different one later (mixed layouts
    would make the dataset unreadable)."""
    marker = out_dir / "_pulse_batch.json"
    wanted = {"schema_version": SCHEMA_VERSION, "partition_by": list(partition_by)}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ManifestError(out_dir, "output.path exists and is not a folder") from None
    if marker.exists():
        try:
            found = json.loads(marker.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ManifestError(
                marker, "is not valid JSON; restore it or use a new output.path"
            ) from None
        if found.get("partition_by") != wanted["partition_by"]:
            raise ManifestError(
                out_dir,
                f"output was written with partition_by {found.get('partition_by')}; "
                f"this manifest asks {list(partition_by)}. Use a new output.path.",
            )
        return
    _write_atomic(marker, json.dumps(wanted, indent=2).encode())


@contextlib.contextmanager
def _exclusive(path: Path, holder_note: str, *, wait: bool = False) -> Iterator[None]:
    """An OS lock on ``path`` for the block; raises BlockingIOError if another process
    holds it (or, with ``wait``, waits for it). The kernel drops it when its process dies:
    a killed run leaves no live lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.seek(0)
        handle.truncate()
        handle.write(holder_note)
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _shared(path: Path) -> Iterator[None]:
    """A shared OS lock: any number of holders, but none while `_exclusive` holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder_note() -> str:
    return f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"


@contextlib.contextmanager
def job_lock(out_dir: Path, job: str, shard: Shard | None = None) -> Iterator[None]:
    """One run per job, or per shard of a job, in one output; an overlapping one is refused.

    A whole-job run holds the job's lock exclusively. A shard holds it shared (so shards
    of the job run side by side, but never beside a whole-job run) and its own shard lock
    exclusively (so shard I runs once at a time)."""
    path = out_dir / "_locks" / f"{job}.lock"
    if shard is None:
        try:
            with _exclusive(path, _holder_note()):
                yield
        except BlockingIOError:
            holder = path.read_text().strip() or "shards of the job"
            raise LockedError(
                f"job {job!r} is already running into {out_dir} ({holder}); "
                "wait for it to finish, or use another output.path"
            ) from None
        return
    shard_path = out_dir / "_locks" / f"{job}.shard-{shard.index}-of-{shard.count}.lock"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_shared(path))
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise LockedError(
                f"job {job!r} is running unsharded into {out_dir} ({holder}); a shard cannot "
                "run beside it: wait for it to finish"
            ) from None
        try:
            stack.enter_context(_exclusive(shard_path, _holder_note()))
        except BlockingIOError:
            holder = shard_path.read_text().strip() or "another process"
            raise LockedError(
                f"shard {shard.label} of job {job!r} is already running into {out_dir} "
                f"({holder}); wait for it to finish"
            ) from None
        yield


@contextlib.contextmanager
def commit_lock(out_dir: Path, job: str) -> Iterator[None]:
    """Waited for around every commit and recovery: shards of one job commit one at a
    time, so a commit that rewrites a file (--force) never races another's."""
    with _exclusive(out_dir / "_locks" / f"{job}.commit.lock", _holder_note(), wait=True):
        yield


def _run_lock_path(out_dir: Path, job: str, run_id: str) -> Path:
    return out_dir / "_staging" / job / f"{run_id}.lock"


@contextlib.contextmanager
def run_lock(out_dir: Path, job: str, run_id: str) -> Iterator[None]:
    """Held by a run while it stages batches, so that `recover` (run by another process
    writing another shard of the job) never touches a live run's work."""
    path = _run_lock_path(out_dir, job, run_id)
    with _exclusive(path, _holder_note()):
        yield
    path.unlink(missing_ok=True)


def run_alive(out_dir: Path, job: str, run_id: str) -> bool:
    """Whether run ``run_id`` of ``job`` is still going (its process holds its run lock)."""
    path = _run_lock_path(out_dir, job, run_id)
    return path.exists() and _run_alive(path)


def _run_alive(lock_path: Path) -> bool:
    try:
        with _exclusive(lock_path, "recovery check"):
            return False
    except BlockingIOError:
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _apply_plan(out_dir: Path, batch_dir: Path) -> None:
    """Carry out a committed batch's renames and deletes. Idempotent: safe to redo."""
    plan = json.loads((batch_dir / "PLAN.json").read_text())
    touched: set[Path] = set()
    for op in plan["ops"]:
        target = out_dir / op["dst"]
        if op["op"] == "move":
            staged = batch_dir / op["src"]
            if staged.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
                touched.add(target.parent)
        elif target.exists():
            target.unlink()
            touched.add(target.parent)
    for folder in touched:
        _fsync_dir(folder)
    shutil.rmtree(batch_dir)


def recover(out_dir: Path, job: str) -> int:
    """Finish or undo batches that runs which are gone left behind (a live run's batches
    are left alone). Returns how many batches were rolled forward."""
    with commit_lock(out_dir, job):
        return _recover(out_dir, job)


def _recover(out_dir: Path, job: str) -> int:
    staging = out_dir / "_staging" / job
    rolled = 0
    entries = sorted(staging.iterdir()) if staging.exists() else []
    for lock in [e for e in entries if e.suffix == ".lock"]:
        if not _run_alive(lock):
            lock.unlink(missing_ok=True)
    for batch_dir in [e for e in entries if e.is_dir()]:
        name = batch_dir.name  # <run_id>-<batch>, or cache-<run_id>
        run_id = (
            name.removeprefix("cache-") if name.startswith("cache-") else name.rsplit("-", 1)[0]
        )
        if _run_lock_path(out_dir, job, run_id).exists():
            continue  # its run is alive (a dead run's lock was removed above)
        if (batch_dir / "PLAN.json").exists():
            _apply_plan(out_dir, batch_dir)
            rolled += 1
            logger.info("recovered committed batch %s", batch_dir.name)
        else:
            shutil.rmtree(batch_dir)
            logger.info("discarded uncommitted batch %s", batch_dir.name)
    return rolled


# --- reading back ----------------------------------------------------------------


def _dataset(out_dir: Path, table: str) -> ds.Dataset | None:
    root = out_dir / table
    if not root.exists() or not any(root.rglob("*.parquet")):
        return None
    # Every file arrives by an atomic rename, so none needs validating (which would open
    # every job's files); a filter on a partition column then prunes without opening.
    return ds.dataset(root, format="parquet", partitioning="hive")


_READ_ATTEMPTS = 5


def _reading(action: Callable[[], T]) -> T:
    """Another job sharing the output may replace a file between listing and reading:
    list again and retry."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            return action()
        except FileNotFoundError:
            if attempt == _READ_ATTEMPTS - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def read_table(
    out_dir: Path, table: str, job: str | None = None, columns: list[str] | None = None
) -> pa.Table:
    """A table (optionally one job's rows, some columns) as pyarrow; empty if none written."""

    def read() -> pa.Table:
        dataset = _dataset(out_dir, table)
        if dataset is None:
            empty = logical_schema(table).empty_table()
            return empty.select(columns) if columns else empty
        expression = (ds.field("job") == job) if job is not None else None
        return dataset.to_table(columns=columns, filter=expression)

    return _reading(read)


def _latest(out_dir: Path, job: str) -> dict[str, tuple[Any, str, float]]:
    """Each item's latest result: (finished_at, status, duration_s)."""
    wanted = ["item_id", "status", "finished_at", "duration_s"]
    rows = read_table(out_dir, "transcripts", job, columns=wanted)
    latest: dict[str, tuple[Any, str, float]] = {}
    for item, status, finished, duration in zip(
        *(rows[c].to_pylist() for c in wanted), strict=True
    ):
        if item not in latest or finished >= latest[item][0]:
            latest[item] = (finished, status, duration or 0.0)
    return latest


def latest_status(out_dir: Path, job: str) -> dict[str, str]:
    """Each item of the job with rows: the status of its latest result."""
    return {item: status for item, (_, status, _) in _latest(out_dir, job).items()}


def ok_item_ids(out_dir: Path, job: str) -> set[str]:
    """Items of the job whose latest result is ``ok``."""
    return {item for item, (_, status, _) in _latest(out_dir, job).items() if status == "ok"}


def failed_item_ids(out_dir: Path, job: str) -> set[str]:
    """Items of the job whose latest result is ``failed``."""
    return {item for item, (_, status, _) in _latest(out_dir, job).items() if status != "ok"}


def job_summary(out_dir: Path, job: str) -> dict[str, Any]:
    """The job so far, by each item's latest result over every run with rows."""
    latest = _latest(out_dir, job)
    ok = [v for v in latest.values() if v[1] == "ok"]
    runs = read_table(out_dir, "transcripts", job, columns=["run_id"])["run_id"].to_pylist()
    return {
        "runs_with_rows": len(set(runs)),
        "items": len(latest),
        "ok": len(ok),
        "failed": len(latest) - len(ok),
        "audio_s": round(sum(v[2] for v in ok), 3),
    }


def _of_job(data: pa.Table, job: str) -> pa.ChunkedArray | pa.Array:
    """Rows of ``job`` in one file: all of them when ``job`` is a partition folder."""
    if "job" in data.column_names:
        return pc.equal(data["job"], job)
    return pa.array([True] * data.num_rows)


def _files_with_items(out_dir: Path, job: str, item_ids: set[str]) -> list[Path]:
    """Relative paths (shared by the three tables) of transcripts files holding these ok
    rows of this job (other jobs' rows are never touched, whatever the partitioning)."""
    wanted = pa.array(sorted(item_ids))

    def scan() -> list[Path]:
        dataset = _dataset(out_dir, "transcripts")
        found = []
        for fragment in dataset.get_fragments(filter=ds.field("job") == job) if dataset else ():
            path = Path(fragment.path)
            data = pq.ParquetFile(path).read(columns=_present(path, ["item_id", "status", "job"]))
            ok = pc.equal(data["status"], "ok")
            hit = pc.and_(pc.is_in(data["item_id"], value_set=wanted), ok)
            if pc.any(pc.and_(hit, _of_job(data, job))).as_py():
                found.append(path.relative_to(out_dir / "transcripts"))
        return found

    return _reading(scan)


def _present(path: Path, columns: list[str]) -> list[str]:
    names = set(pq.read_schema(path).names)
    return [c for c in columns if c in names]


# --- writing ---------------------------------------------------------------------


class Sink:
    """Buffers finished items and commits them in batches (few, large files)."""

    def __init__(
        self,
        out_dir: Path,
        *,
        job: str,
        run_id: str,
        partition_by: Sequence[str],
        commit_every_items: int = 200,
        commit_every_s: float = 60.0,
        supersede: set[str] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.job = job
        self.run_id = run_id
        self.partition_by = list(partition_by)
        self.commit_every_items = commit_every_items
        self.commit_every_s = commit_every_s
        # Items whose earlier ok rows a new ok result replaces (--force).
        self.supersede = set(supersede or ())
        self._buffer: list[ItemRows] = []
        self._batches = 0
        self._last_commit = time.monotonic()

    def add(self, rows: ItemRows) -> None:
        self._buffer.append(rows)

    @property
    def due(self) -> bool:
        if not self._buffer:
            return False
        waited = time.monotonic() - self._last_commit
        return len(self._buffer) >= self.commit_every_items or waited >= self.commit_every_s

    def commit(self) -> None:
        """Write everything buffered as one atomic batch. A no-op when empty."""
        self.write(self.take())

    def take(self) -> list[ItemRows]:
        """Empty the buffer; `write` the result (in a thread, if the caller likes)."""
        rows, self._buffer = self._buffer, []
        self._last_commit = time.monotonic()
        return rows

    def write(self, rows: list[ItemRows]) -> None:
        """Commit ``rows`` as one atomic batch. Calls must not overlap."""
        if not rows:
            return
        with commit_lock(self.out_dir, self.job):
            self._write(rows)

    def _write(self, rows: list[ItemRows]) -> None:
        self._batches += 1
        name = f"{self.run_id}-{self._batches:05d}"
        batch_dir = self.out_dir / "_staging" / self.job / name
        batch_dir.mkdir(parents=True)
        ops = self._stage_tables(rows, batch_dir, f"part-{name}.parquet")
        ops += self._stage_supersede(rows, batch_dir)
        _fsync_dir(batch_dir)
        _write_atomic(batch_dir / "PLAN.json", json.dumps({"ops": ops}).encode())
        _apply_plan(self.out_dir, batch_dir)

    def _stage_tables(
        self, rows: list[ItemRows], batch_dir: Path, file_name: str
    ) -> list[dict[str, str]]:
        per_table = {
            "transcripts": [r.transcript for r in rows],
            "segments": [g for r in rows for g in r.segments],
            "words": [w for r in rows for w in r.words],
            "utterances": [u for r in rows for u in r.utterances],
        }
        ops = []
        for table, table_rows in per_table.items():
            for folder, group in _by_partition(table_rows, self.partition_by).items():
                relative = Path(table) / folder / file_name
                self._write_parquet(batch_dir / relative, table, group)
                ops.append({"op": "move", "src": str(relative), "dst": str(relative)})
        return ops

    def _stage_supersede(self, rows: list[ItemRows], batch_dir: Path) -> list[dict[str, str]]:
        replaced = {
            r.transcript["item_id"] for r in rows if r.transcript["status"] == "ok"
        } & self.supersede
        if not replaced:
            return []
        ops = []
        for relative in _files_with_items(self.out_dir, self.job, replaced):
            for table in TABLES:
                ops.extend(self._rewrite_without(table, relative, replaced, batch_dir))
        self.supersede -= replaced
        return ops

    def _rewrite_without(
        self, table: str, relative: Path, item_ids: set[str], batch_dir: Path
    ) -> list[dict[str, str]]:
        existing = self.out_dir / table / relative
        if not existing.exists():
            return []
        data = pq.ParquetFile(existing).read()
        drop = pc.and_(
            pc.is_in(data["item_id"], value_set=pa.array(sorted(item_ids))),
            _of_job(data, self.job),
        )
        if table == "transcripts":
            drop = pc.and_(drop, pc.equal(data["status"], "ok"))
        kept = data.filter(pc.invert(drop))
        target = str(Path(table) / relative)
        if kept.num_rows == 0:
            return [{"op": "delete", "dst": target}]
        staged = Path("rewrite") / target
        _write_file(batch_dir / staged, kept)
        return [{"op": "move", "src": str(staged), "dst": target}]

    def _write_parquet(self, path: Path, table: str, rows: list[dict[str, Any]]) -> None:
        schema = file_schema(table, self.partition_by)
        stored = [{k: v for k, v in row.items() if k not in self.partition_by} for row in rows]
        _write_file(path, pa.Table.from_pylist(stored, schema=schema))


def _write_file(path: Path, data: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        pq.write_table(data, handle, compression="zstd", row_group_size=_ROW_GROUP_ROWS)
        handle.flush()
        os.fsync(handle.fileno())


def _by_partition(
    rows: list[dict[str, Any]], partition_by: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        folder = "/".join(f"{col}={row[col]}" for col in partition_by)
        groups.setdefault(folder, []).append(row)
    return groups
