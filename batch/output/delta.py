"""Delta Lake tables (``output.format: delta``), in a local folder or on object storage.

Each table is a Delta table under the output (``<output>/transcripts``, ...). A batch is one
Delta transaction per table: an overwrite whose predicate selects the batch's items
(``job = J AND item_id IN (...)``), so the earlier rows of those items go and the new ones
come in one atomic commit. The tables hanging off transcripts are committed first and
transcripts last: transcripts is what says an item is done, and an item whose words or
utterances were committed by a run that then died before its transcripts commit is redone
(`scan` sees their run differ) and replaced whole. Writers of other jobs, or other shards,
commit concurrently under Delta's optimistic concurrency (conditional writes on S3); a
conflicting commit is retried.

Reads go through pyarrow datasets over the files the table's log lists (not deltalake's own
pyarrow filesystem, which can abort the interpreter at exit).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from batch.errors import ManifestError, OutputError
from batch.model import ItemRows, ItemStatus
from batch.output import parquet, store_errors
from batch.output.history import SCAN_COLUMNS, Scan
from batch.output.layout import Location
from batch.output.schema import MAIN_TABLE, TABLES, logical_schema, to_arrow
from batch.retry import Backoff, OnRetry, RetryPolicy

try:
    from deltalake import DeltaTable, write_deltalake
    from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

    _HAVE_DELTALAKE = True
except ImportError:  # pragma: no cover - the [delta] extra is not installed
    _HAVE_DELTALAKE = False

logger = logging.getLogger(__name__)

_COMMIT_ATTEMPTS: Final = 8


def _raced(error: BaseException) -> bool:
    """Another writer committed first, or created the table at the same moment: redo ours."""
    return isinstance(error, CommitFailedError)


_COMMITS: Final = RetryPolicy(_COMMIT_ATTEMPTS, Backoff(0.05, 2.0), retry_on=_raced)


def _concurrent(uri: str) -> OnRetry:
    def log(error: BaseException, attempt: int, delay_s: float) -> None:
        logger.info("%s: concurrent commit (%s); retrying", uri, error)

    return log


_CHILD_TABLES: Final = tuple(t for t in TABLES if t != MAIN_TABLE)
_REPAIR_CHUNK: Final = 500  # items per delete predicate


def _require() -> None:
    if not _HAVE_DELTALAKE:
        raise ManifestError(
            "output.format",
            "delta needs the deltalake package: pip install 'pulse-batch[delta]'",
        )


@contextlib.contextmanager
def _store_errors(operation: str, uri: str) -> Iterator[None]:
    """deltalake's own errors (Rust error chains in colour, over several lines) as one
    clean `OutputError` that says what to set. An OS error with an errno (disk full,
    read-only) is left to `layout.translated`, which names it."""
    try:
        yield
    except (OutputError, CommitFailedError):  # ours, or a race the caller retries
        raise
    except (DeltaError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise OutputError(uri, operation, store_errors.reason(exc, uri)) from exc


def delta_options(location: Location, given: dict[str, str]) -> dict[str, str]:
    """Storage options for deltalake: the manifest's, plus what the standard environment
    implies for S3 (an http:// endpoint, conditional writes for safe concurrent commits).
    Credentials are never put here: deltalake reads them from the environment itself."""
    options = dict(given)
    if location.url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options.setdefault("AWS_ENDPOINT_URL", endpoint)
            if endpoint.startswith("http://"):
                options.setdefault("AWS_ALLOW_HTTP", "true")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options.setdefault("AWS_REGION", region)
        options.setdefault("conditional_put", "etag")
        if endpoint and not store_errors.aws_credentials_named(os.environ, Path.home()):
            # A store named by its endpoint (MinIO, R2, Ceph, moto) never takes an EC2
            # instance's role: with no credentials set, requests go unsigned rather than
            # reach for the metadata address (169.254.169.254), slow to fail off EC2.
            options.setdefault("aws_skip_signature", "true")
    return options


def _arrow_filesystem(location: Location, options: dict[str, str]) -> pafs.FileSystem:
    """A pyarrow filesystem reading the tables' files."""
    if location.local is not None:
        return pafs.LocalFileSystem()
    if location.url.startswith(("s3://", "s3a://")):
        endpoint = options.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        if options.get("AWS_REGION"):
            kwargs["region"] = options["AWS_REGION"]
        return pafs.S3FileSystem(**kwargs)
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from batch.output.reports import _remote_fs

    return PyFileSystem(FSSpecHandler(_remote_fs(location)))


@dataclass
class DeltaBackend:
    location: Location
    partition_by: list[str]
    options: dict[str, str]
    # Each table's stored type of `date`: date32 in tables created since it became a date,
    # text in older ones (kept: Delta does not change a column's type in place).
    date_types: dict[str, pa.DataType] = field(default_factory=dict)

    @classmethod
    def create(
        cls, location: Location, partition_by: list[str], storage_options: dict[str, str]
    ) -> DeltaBackend:
        """Open the output's tables, creating the missing ones (once, before any writer:
        concurrent creators of one table would conflict); refuses another partitioning."""
        _require()
        backend = cls(location, partition_by, delta_options(location, storage_options))
        for table in TABLES:
            backend._ensure(table)
        return backend

    def _uri(self, table: str) -> str:
        return self.location.child(table)

    def _open(self, table: str) -> Any:
        return DeltaTable(self._uri(table), storage_options=self.options)

    def _ensure(self, table: str) -> None:
        with _store_errors("open", self._uri(table)):
            self._ensure_table(table)

    def _ensure_table(self, table: str) -> None:
        def opened() -> Any:
            try:
                return self._open(table)
            except TableNotFoundError:
                DeltaTable.create(
                    self._uri(table),
                    created_schema(table),
                    mode="ignore",
                    partition_by=self.partition_by or None,
                    storage_options=self.options,
                )
                return self._open(table)

        try:
            found = _COMMITS.call(opened)
        except CommitFailedError as exc:
            raise OutputError(self._uri(table), "create", "the table could not be created") from exc
        columns = list(found.metadata().partition_columns)
        if columns != self.partition_by:
            raise ManifestError(
                self._uri(table),
                f"Delta table is partitioned by {columns}; this manifest asks "
                f"{self.partition_by}. Use a new output.path.",
            )
        self.date_types[table] = pa.schema(found.schema().to_arrow()).field("date").type

    def recover(self, job: str) -> None:
        if self.location.local is not None:  # a killed run's scratch files
            parquet.recover(self.location.local, job)

    def run_guard(
        self, job: str, run_id: str, label: str
    ) -> contextlib.AbstractContextManager[None]:
        if self.location.local is not None:
            return parquet.run_lock(self.location.local, job, run_id, label)
        return contextlib.nullcontext()

    def read(self, table: str, job: str | None, columns: list[str] | None) -> pa.Table:
        return read(self.location, table, job, columns, self.options, prepared=True)

    def scan(self, job: str) -> Scan:
        """Each item's latest result, leaving out items whose words or utterances were
        committed by a run whose transcripts commit never happened (they are redone)."""
        out = Scan()
        main = self.read(MAIN_TABLE, job, [*SCAN_COLUMNS, "word_count"])
        for values in zip(*(main[c].to_pylist() for c in SCAN_COLUMNS), strict=True):
            out.row(*values)
        word_counts = dict(
            zip(
                zip(main["item_id"].to_pylist(), main["run_id"].to_pylist(), strict=True),
                main["word_count"].to_pylist(),
                strict=True,
            )
        )
        unfinished: set[str] = set()
        for table in _CHILD_TABLES:
            child = self.read(table, job, ["item_id", "run_id"])
            pairs = Counter(
                zip(child["item_id"].to_pylist(), child["run_id"].to_pylist(), strict=True)
            )
            for item, run_id in pairs:
                known = out.latest.get(item)
                if known is not None and known.run_id != run_id:
                    unfinished.add(item)
            if table == "words":  # a dead run's commit may also have removed words, adding none
                for item, known in out.latest.items():
                    expected = word_counts.get((item, known.run_id)) or 0
                    if known.status == ItemStatus.OK and pairs[(item, known.run_id)] < expected:
                        unfinished.add(item)
        for item in unfinished:
            logger.info("%s: rows of an unfinished commit; redoing", item)
            out.latest.pop(item, None)
        out.unfinished = unfinished
        return out

    def repair(self, job: str) -> int:
        """Delete every row of items that transcripts holds more than once (runs that
        overlapped wrote them) but of each one's latest result; transcripts first, so no
        extra row is ever left without its words. Returns how many items were repaired."""
        found = Scan()  # the transcripts rows alone: the other tables hold the extra runs too
        main = self.read(MAIN_TABLE, job, SCAN_COLUMNS)
        for values in zip(*(main[c].to_pylist() for c in SCAN_COLUMNS), strict=True):
            found.row(*values)
        keep = sorted((item, found.latest[item].run_id) for item in found.duplicates())
        for start in range(0, len(keep), _REPAIR_CHUNK):
            clauses = " OR ".join(
                f"(item_id = {_quoted(item)} AND run_id <> {_quoted(run_id)})"
                for item, run_id in keep[start : start + _REPAIR_CHUNK]
            )
            predicate = f"job = {_quoted(job)} AND ({clauses})"
            for table in (MAIN_TABLE, *_CHILD_TABLES):
                self._delete(table, predicate)
        return len(keep)

    def forget(self, job: str, items: set[str]) -> None:
        """Delete every row of ``items``: a transaction per table, transcripts last."""
        from batch.output import erasure

        erasure.delta_rows(lambda table, where: self._delete(table, where, "forget"), job, items)

    def _delete(self, table: str, predicate: str, operation: str = "repair") -> None:
        uri = self._uri(table)

        def delete() -> None:
            with _store_errors(operation, uri):
                self._open(table).delete(predicate)

        try:
            _COMMITS.call(delete, on_retry=_concurrent(uri))
        except CommitFailedError as exc:
            raise OutputError(uri, operation, "too many concurrent commits; try again") from exc

    def committer(self, job: str, run_id: str, index: Scan) -> DeltaCommitter:
        return DeltaCommitter(self, job, run_id, index)

    def compact(self) -> list[str]:
        lines = []
        for table in TABLES:
            with _store_errors("compact", self._uri(table)):
                found = self._open(table)
                metrics = found.optimize.compact()
                removed = found.vacuum(dry_run=False)
            lines.append(
                f"{table}: {metrics.get('numFilesRemoved', 0)} files compacted into "
                f"{metrics.get('numFilesAdded', 0)}; {len(removed)} unreferenced files deleted"
            )
        return lines


def _quoted(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass
class DeltaCommitter:
    backend: DeltaBackend
    job: str
    run_id: str
    index: Scan

    def commit(self, rows: list[ItemRows]) -> None:
        """One transaction per table replacing the batch's items' rows; transcripts last."""
        if not rows:
            return
        items = sorted({r.item_id for r in rows})
        predicate = f"job = {_quoted(self.job)} AND item_id IN ({', '.join(map(_quoted, items))})"
        for table in (*_CHILD_TABLES, MAIN_TABLE):
            data = to_arrow(table, [r for item in rows for r in item.by_table()[table]])
            self._replace(table, self._fitted(table, data), predicate)
        for row in rows:
            self.index.committed(row, self.run_id)

    def _fitted(self, table: str, data: pa.Table) -> pa.Table:
        """``data`` with `date` in the type the table stores it in."""
        stored = self.backend.date_types.get(table, pa.string())
        index = data.schema.get_field_index("date")
        return data.set_column(index, pa.field("date", stored), data["date"].cast(stored))

    def _replace(self, table: str, data: pa.Table, predicate: str) -> None:
        uri = self.backend._uri(table)

        def write() -> None:
            with _store_errors("commit a batch to", uri):
                write_deltalake(
                    uri,
                    data,
                    mode="overwrite",
                    predicate=predicate,
                    partition_by=self.backend.partition_by or None,
                    schema_mode="merge",
                    storage_options=self.backend.options,
                )

        try:
            _COMMITS.call(write, on_retry=_concurrent(uri))
        except CommitFailedError as exc:
            message = "too many concurrent commits; try again"
            raise OutputError(uri, "commit a batch to", message) from exc


def read(
    location: Location,
    table: str,
    job: str | None,
    columns: list[str] | None,
    options: dict[str, str],
    *,
    prepared: bool = False,
) -> pa.Table:
    """A Delta table's current version (one job's rows, some columns) as pyarrow."""
    _require()
    if not prepared:
        options = delta_options(location, options)
    schema = logical_schema(table)
    uri = location.child(table)
    with _store_errors("read", uri):
        try:
            found = DeltaTable(uri, storage_options=options)
        except TableNotFoundError:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        partitions = list(found.metadata().partition_columns)
        files = found.file_uris()
    filesystem = _arrow_filesystem(location, options)
    if location.local is None:
        files = [f.split("://", 1)[1] for f in files]
        base = uri.split("://", 1)[1]
    else:
        base = uri
    read_schema = _read_schema(schema, found)
    partitioning = ds.partitioning(
        pa.schema([read_schema.field(p) for p in partitions]), flavor="hive"
    )
    # Files written before a column was added lack it: the table schema reads them as null.
    dataset = ds.dataset(
        files,
        schema=read_schema,
        format="parquet",
        filesystem=filesystem,
        partitioning=partitioning if partitions else None,
        partition_base_dir=base,
    )
    expression = (ds.field("job") == job) if job is not None else None
    data = dataset.to_table(columns=columns, filter=expression)
    return data.cast(pa.schema([schema.field(n) for n in data.column_names]))


def created_schema(table: str) -> pa.Schema:
    """A new Delta table's columns: `date` as a date, so that Polars, Spark and DuckDB read
    it as one (partition values of text type read as text). Rows are still built with the
    text date; `DeltaCommitter` casts, and `read` gives text back."""
    schema = logical_schema(table)
    return schema.set(schema.get_field_index("date"), pa.field("date", pa.date32()))


def _read_schema(schema: pa.Schema, found: Any) -> pa.Schema:
    """The columns to read: ours, in the types Delta stored (timestamps in microseconds)."""
    stored = pa.schema(found.schema().to_arrow())
    fields = [stored.field(f.name) if f.name in stored.names else f for f in schema]
    return pa.schema(fields)


def scan_unlocked(location: Location, job: str, storage_options: dict[str, str]) -> Scan:
    """`DeltaBackend.scan` for readers: creates nothing (a missing table reads empty)."""
    _require()
    return DeltaBackend(location, [], delta_options(location, storage_options)).scan(job)


def compact(location: Location, storage_options: dict[str, str]) -> list[str]:
    backend = DeltaBackend(location, [], delta_options(location, storage_options))
    _require()
    return backend.compact()


def partition_columns(location: Location, storage_options: dict[str, str]) -> list[str]:
    """The partition columns of an output's transcripts table ([] when it has none)."""
    _require()
    uri = location.child(MAIN_TABLE)
    with _store_errors("read", uri):
        try:
            found = DeltaTable(uri, storage_options=delta_options(location, storage_options))
        except TableNotFoundError:
            return []
        return list(found.metadata().partition_columns)
