"""The output of a job behind one object: `JobOutput` opens it, `RunWriter` commits to it.

::

    with JobOutput.open(location, job, partition_by, "parquet") as output:  # layout, lock,
        history = output.history()                                           # recovery
        async with output.run(run_id, commit_every_items=200) as writer:
            stored = await writer.add(rows)        # commits off the event loop when due
        output.write_report(report)                # flushed on leaving the block

Two backends sit behind it: local Parquet with a redo-log commit (`batch.output.parquet`)
and Delta Lake, local or on object storage (`batch.output.delta`). Each commit replaces the
earlier rows of the items it holds, so ``transcripts`` keeps one row per item: its latest
result. Every OS, Arrow or Delta error is raised as `OutputError`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import anyio
import pyarrow as pa

from batch.errors import ManifestError
from batch.model import ItemRows
from batch.output import erasure, layout, lease, lease_stores, locks, parquet, reports, tombstones
from batch.output.history import History, Scan
from batch.output.layout import Location, translated
from batch.output.schema import SCHEMA_VERSION, as_failed, misfit
from batch.shard import Shard

logger = logging.getLogger(__name__)


class _Committer(Protocol):
    def commit(self, rows: list[ItemRows]) -> None: ...


class Backend(Protocol):
    """What a table format provides to `JobOutput` (all calls blocking)."""

    def recover(self, job: str) -> None: ...

    def scan(self, job: str) -> Scan: ...

    def repair(self, job: str) -> int: ...

    def committer(self, job: str, run_id: str, index: Scan) -> _Committer: ...

    def run_guard(
        self, job: str, run_id: str, label: str
    ) -> contextlib.AbstractContextManager[None]: ...

    def read(self, table: str, job: str | None, columns: list[str] | None) -> pa.Table: ...

    def forget(self, job: str, items: set[str]) -> None: ...


@dataclass
class ParquetBackend:
    root: Path
    partition_by: list[str]

    def recover(self, job: str) -> None:
        parquet.recover(self.root, job)

    def scan(self, job: str) -> Scan:
        return parquet.scan(self.root, job)

    def repair(self, job: str) -> int:
        return parquet.repair(self.root, job)

    def committer(self, job: str, run_id: str, index: Scan) -> _Committer:
        return parquet.Committer(self.root, job, run_id, self.partition_by, index)

    def run_guard(
        self, job: str, run_id: str, label: str
    ) -> contextlib.AbstractContextManager[None]:
        return parquet.run_lock(self.root, job, run_id, label)

    def read(self, table: str, job: str | None, columns: list[str] | None) -> pa.Table:
        return parquet.read(self.root, table, job, columns)

    def forget(self, job: str, items: set[str]) -> None:
        erasure.parquet_rows(self.root, job, items, self.partition_by)


def _backend(
    location: Location, partition_by: list[str], fmt: str, storage_options: dict[str, str]
) -> Backend:
    if fmt == "delta":
        from batch.output import delta  # deltalake is an optional extra

        return delta.DeltaBackend.create(location, partition_by, storage_options)
    assert location.local is not None
    return ParquetBackend(location.local, partition_by)


class JobOutput:
    """One job's view of an output: the only code that knows its layout, locks and commits.

    Use as a context manager (or call `close`): it holds the job's lock while open.
    """

    def __init__(
        self,
        location: Location,
        job: str,
        backend: Backend,
        stack: contextlib.ExitStack,
        check: Callable[[], None] = lambda: None,
        label: str = "whole job",
    ) -> None:
        self.location = location
        self.job = job
        self._backend = backend
        self._stack = stack
        self._index: Scan | None = None
        self._check = check  # raises OutputError once the job's lock is no longer ours
        self._label = label

    @classmethod
    def open(
        cls,
        location: str | Path,
        job: str,
        partition_by: Sequence[str],
        format: str = "parquet",
        storage_options: dict[str, str] | None = None,
        *,
        shard: Shard | None = None,
    ) -> JobOutput:
        """Check the layout (creating it on first use), take the job's lock (or, for a
        shard, the job's lock shared and the shard's own), finish or undo what killed runs
        left behind, and upgrade a version-1 output in place.

        Raises `ManifestError` (layout or format mismatch), `LockedError`, `OutputError`.
        """
        where = Location.of(location)
        parts = list(partition_by)
        stack = contextlib.ExitStack()
        try:
            with translated("open the output", where.url):
                if format == "parquet" and where.local is None:
                    raise ManifestError(
                        "output.path",
                        f"{where.url}: output.format parquet needs a local folder (object "
                        "stores have no atomic rename to commit with); use output.format: "
                        "delta for object storage",
                    )
                if where.local is not None:
                    check = _prepare_local(where.local, parts, format, job, shard, stack)
                else:
                    check = stack.enter_context(_remote_lock(where, job, shard))
                backend = _backend(where, parts, format, storage_options or {})
                backend.recover(job)
        except BaseException:
            stack.close()
            raise
        return cls(where, job, backend, stack, check, locks.run_label(shard))

    def check_lock(self) -> None:
        """Raise `OutputError` if the job's lock is no longer this process's (its files,
        or the output folder, were deleted or replaced; its lease was taken over)."""
        with translated("check the lock of", self.location.url):
            self._check()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def history(self) -> History:
        """One scan of the job's rows: ok ids, failed ids (latest result of each), summary.
        Items held more than once (runs that overlapped) are repaired first: each keeps
        its latest result, with that run's words, segments and utterances."""
        with translated("read", self.location.url):
            self._index = self._backend.scan(self.job)
        if self._index.duplicates():  # runs that overlapped (before shard counts were locked)
            with translated("repair", self.location.url):
                repaired = self._backend.repair(self.job)
                self._index = self._backend.scan(self.job)
            logger.warning(
                "%s: %d item(s) of job %r had more than one row; kept the latest result of "
                "each and removed the others",
                self.location.url,
                repaired,
                self.job,
            )
        return self._index.history()

    def job_so_far(self) -> dict[str, Any]:
        """The summary after this process's commits (no new scan)."""
        if self._index is None:
            return self.history().summary
        return self._index.history().summary

    @contextlib.asynccontextmanager
    async def run(
        self, run_id: str, *, commit_every_items: int = 200, commit_every_s: float = 60.0
    ) -> AsyncIterator[RunWriter]:
        """A writer for one run; everything added is committed when the block ends (also
        when it ends by an error or a cancellation: finished items are never dropped)."""
        if self._index is None:
            self.history()
        assert self._index is not None
        committer = self._backend.committer(self.job, run_id, self._index)
        writer = RunWriter(
            committer, self.location.url, commit_every_items, commit_every_s, self._check
        )
        with translated("lock the run in", self.location.url):
            guard = self._backend.run_guard(self.job, run_id, self._label)
            guard.__enter__()
        try:
            yield writer
        finally:
            try:
                with anyio.CancelScope(shield=True):
                    await writer.flush()
            finally:
                guard.__exit__(None, None, None)

    @contextlib.contextmanager
    def scratch(self, run_id: str) -> Iterator[Path]:
        """A local folder for the run's temporary files (long recordings' decoded audio),
        removed afterwards; in a local output, what a killed run leaves there goes with the
        next recovery."""
        if self.location.local is None:
            with tempfile.TemporaryDirectory(prefix="pulse-batch-") as temporary:
                yield Path(temporary)
            return
        folder = self.location.local / "_staging" / self.job / f"cache-{run_id}"
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def write_report(self, report: dict[str, Any], *, latest: bool = True) -> str:
        """Write the run's report (JSON and Markdown, and with ``latest`` also ``latest.*``);
        returns where the JSON went. Raises `OutputError` when the job's lock is no longer
        ours (another run may be writing there now)."""
        self.check_lock()
        return reports.write(self.location, self.job, report, latest=latest)

    def latest_report_path(self) -> str | None:
        """Where the job's latest report is, if it has one."""
        return reports.latest_path(self.location, self.job)

    def forgotten(self) -> set[str]:
        """The ids of the job's forgotten items (their tombstones)."""
        return set(tombstones.read(self.location, self.job))

    def bury(self, stones: list[tombstones.Tombstone]) -> None:
        """Write tombstones: no run of the job transcribes their items again."""
        self.check_lock()
        tombstones.write(self.location, self.job, stones)

    def forget(self, items: set[str]) -> None:
        """Remove every row of ``items`` from every table (`batch.output.erasure`); write
        their tombstones first (`bury`), so a kill mid-way never lets a run redo them."""
        self.check_lock()
        with translated("forget items in", self.location.url):
            self._backend.forget(self.job, items)

    def unforget(self, items: set[str]) -> None:
        """Remove the tombstones of ``items``: a run may transcribe them again."""
        tombstones.remove(self.location, self.job, items)

    def read_table(self, table: str, columns: list[str] | None = None) -> pa.Table:
        with translated("read", self.location.child(table)):
            return self._backend.read(table, self.job, columns)


def _remote_lock(
    where: Location, job: str, shard: Shard | None
) -> contextlib.AbstractContextManager[Callable[[], None]]:
    """The job (or shard) lock of an output on object storage, as the check to make before
    each commit: a lease on S3, GCS and Azure Blob; other stores have no conditional writes
    we use, so nothing stops an overlapping run there."""
    store = lease_stores.store_for(where.url)
    if store is not None:
        return lease.job_lease(where.url, job, shard, store)
    logger.warning(
        "%s: no job lock on this store; do not start the same job (or shard) twice at once",
        where.url,
    )
    return contextlib.nullcontext(lambda: None)


def _prepare_local(
    root: Path,
    partition_by: list[str],
    fmt: str,
    job: str,
    shard: Shard | None,
    stack: contextlib.ExitStack,
) -> Callable[[], None]:
    """Marker, job (or shard) lock, and the in-place upgrade of a version-1 output.
    Returns the lock's check."""
    found = layout.check_layout(root, partition_by, fmt)
    held = stack.enter_context(locks.job_lock(root, job, shard))
    if int(found.get("schema_version", 1)) < SCHEMA_VERSION:
        with layout.layout_lock(root):
            found = layout.read_marker(root) or found
            if int(found.get("schema_version", 1)) < SCHEMA_VERSION:
                dropped = parquet.upgrade_v1(root, partition_by)
                layout.set_marker_version(root, found)
                logger.info(
                    "upgraded %s to schema version %d (%d superseded rows removed)",
                    root,
                    SCHEMA_VERSION,
                    dropped,
                )
    return held.check


@dataclass
class RunWriter:
    """Buffers a run's finished items and commits them in batches, off the event loop."""

    committer: _Committer
    where: str
    commit_every_items: int
    commit_every_s: float
    check_lock: Callable[[], None] = lambda: None  # raises OutputError once the lock is lost
    uncommitted: int = 0  # finished items whose commit failed
    _buffer: list[ItemRows] = field(default_factory=list)
    _last_commit: float = field(default_factory=time.monotonic)
    _lock: anyio.Lock = field(default_factory=anyio.Lock)

    async def add(self, rows: ItemRows) -> ItemRows:
        """Queue one finished item; returns its rows as they will be stored: an item whose
        rows do not fit the schema becomes a failed row (``protocol``) here, so it can never
        fail the batch it is in. Commits (in a worker thread) when a batch is due."""
        problem = misfit(rows.by_table())
        if problem is not None:
            logger.warning("%s: %s", rows.transcript.get("source"), problem)
            rows = ItemRows(as_failed(rows.transcript, problem))
        self._buffer.append(rows)
        if self._due:
            await self._commit(only_if_due=True)
        return rows

    @property
    def _due(self) -> bool:
        if not self._buffer:
            return False
        waited = time.monotonic() - self._last_commit
        return len(self._buffer) >= self.commit_every_items or waited >= self.commit_every_s

    async def flush(self) -> None:
        """Commit whatever is buffered."""
        await self._commit(only_if_due=False)

    async def _commit(self, *, only_if_due: bool) -> None:
        # Shielded: rows taken from the buffer are always written, even during a stop.
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if only_if_due and not self._due:
                    return  # another worker just committed these rows
                batch, self._buffer = self._buffer, []
                self._last_commit = time.monotonic()
                if batch:
                    try:
                        await anyio.to_thread.run_sync(self._commit_blocking, batch)
                    except BaseException:
                        self.uncommitted += len(batch)  # redone by the next run
                        raise

    def _commit_blocking(self, batch: list[ItemRows]) -> None:
        with translated("commit a batch to", self.where):
            self.check_lock()  # a run whose lock was lost commits nothing more
            self.committer.commit(batch)
