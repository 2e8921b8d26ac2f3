"""The output boundary: tables (local Parquet or Delta Lake), locks, commits and reports.

Callers use `JobOutput` to run a job into an output, and `read_table`, `read_history` and
`latest_report` to look at one without taking its lock (export, score, report, --dry-run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from batch.errors import ManifestError
from batch.output import layout, parquet, reports
from batch.output.history import History, Scan
from batch.output.job_output import JobOutput, RunWriter
from batch.output.layout import FORMATS, Location, translated
from batch.output.schema import (
    COLUMNS,
    PARTITION_CHOICES,
    SCHEMA_VERSION,
    TABLES,
    logical_schema,
)
from batch.shard import parse_flag

__all__ = [
    "COLUMNS",
    "FORMATS",
    "PARTITION_CHOICES",
    "SCHEMA_VERSION",
    "TABLES",
    "History",
    "JobOutput",
    "RunWriter",
    "compact",
    "detect_format",
    "latest_report",
    "logical_schema",
    "read_history",
    "read_table",
    "run_alive",
    "run_reports",
]


def detect_format(location: str | Path) -> str | None:
    """``parquet`` or ``delta`` for an existing output, None when nothing is there yet."""
    where = Location.of(location)
    if where.local is None:
        return "delta"  # the only format object storage takes
    with translated("read", where.url):
        found = layout.read_marker(where.local)
        if found is not None:
            return layout.marker_format(found)
        if (where.local / "transcripts" / "_delta_log").exists():
            return "delta"
        return "parquet" if (where.local / "transcripts").exists() else None


def read_table(
    location: str | Path,
    table: str,
    job: str | None = None,
    columns: list[str] | None = None,
    storage_options: dict[str, str] | None = None,
) -> pa.Table:
    """A table of an output (one job's rows, some columns, if asked) as a pyarrow Table,
    whatever its format; empty (with the table's columns) when nothing was written.

    Raises `OutputError` when the output cannot be read."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; the tables are {list(TABLES)}")
    where = Location.of(location)
    fmt = detect_format(location)
    with translated("read", where.child(table)):
        if fmt == "delta":
            from batch.output import delta

            return delta.read(where, table, job, columns, storage_options or {})
        if fmt is None or where.local is None:
            empty = logical_schema(table).empty_table()
            return empty.select(columns) if columns else empty
        return parquet.read(where.local, table, job, columns)


def read_history(
    location: str | Path, job: str, storage_options: dict[str, str] | None = None
) -> History:
    """What a job's output holds, read without its lock (for --dry-run, status and export):
    each item's latest result, and the items held more than once (``duplicates``) or left
    with some of their tables only by a killed run (``unfinished``, Delta: not counted as
    done). In a local Parquet output, commits that killed runs left half-applied are
    finished first. Raises `OutputError`."""
    where = Location.of(location)
    fmt = detect_format(location)
    if fmt == "delta":
        from batch.output import delta

        with translated("read", where.child("transcripts")):
            return delta.scan_unlocked(where, job, storage_options or {}).history()
    if fmt is None or where.local is None:
        return Scan().history()
    with translated("finish the commit a killed run left in", where.url):
        parquet.settle(where.local, job)
    with translated("read", where.child("transcripts")):
        return parquet.scan(where.local, job).history()


def latest_report(location: str | Path, job: str | None = None) -> dict[str, Any]:
    """The newest run report in an output (of one job, if given). Raises FileNotFoundError."""
    where = Location.of(location)
    with translated("read the reports of", where.url):
        found = reports.latest(where, job)
    if found is None:
        folder = where.child("_reports")
        raise FileNotFoundError(f"no report under {folder}" + (f" for job {job!r}" if job else ""))
    return found


def run_reports(location: str | Path, job: str) -> list[dict[str, Any]]:
    """Every run's report of ``job``, oldest name first (a run still going, or killed, has
    the starting one it wrote, with status ``running``)."""
    where = Location.of(location)
    with translated("read the reports of", where.url):
        return reports.every_run(where, job)


def run_alive(location: str | Path, job: str, run_id: str, shard: str | None = None) -> bool:
    """Whether run ``run_id`` of ``job`` (shard ``"I/N"``, if it was one) is still going:
    its process holds its run lock (a folder), or its shard's or the job's lease (S3).
    On other object stores, where runs hold no lock, it cannot be told: True."""
    where = Location.of(location)
    if where.local is not None:
        return parquet.run_alive(where.local, job, run_id)
    if not where.url.startswith(("s3://", "s3a://")):
        return True
    from batch.output import lease

    url = where.url.replace("s3a://", "s3://", 1)
    return lease.lease_live(url, job, parse_flag(shard) if shard else None)


def compact(location: str | Path, storage_options: dict[str, str] | None = None) -> list[str]:
    """Compact a Delta output's tables (optimize, then vacuum files no version needs any
    more); returns a line per table saying what was done. Parquet outputs need nothing."""
    found = detect_format(location)
    if found is None:  # a typo must not look like a compacted output
        raise ManifestError(location, "no pulse-batch output here; give the job's output.path")
    if found != "delta":
        return ["nothing to do: only Delta outputs are compacted"]
    from batch.output import delta

    where = Location.of(location)
    with translated("compact", where.url):
        return delta.compact(where, storage_options or {})
