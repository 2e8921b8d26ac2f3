"""The output's read side: `OutputReader` looks at an output without taking its lock.

For export, score, status, report, ``--dry-run`` and the CLI; `JobOutput` (the writer) is
the only other code that knows the output's layout. Every method raises `OutputError` when
the output cannot be read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from batch.errors import ExportError, ManifestError, OutputError
from batch.model import ItemStatus
from batch.output import layout, parquet, reports
from batch.output.history import History, Scan
from batch.output.layout import Location, translated
from batch.output.schema import TABLES, logical_schema
from batch.report import job_runs
from batch.shard import parse_flag

_NO_OUTPUT = "no pulse-batch output here; give the job's output.path"


@dataclass
class JobTables:
    """A job's items whose latest result is ok, with their rows from each table."""

    items: list[dict[str, Any]]
    words: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    utterances: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    segments: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def latest_ok(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each item's latest transcript row (by ``finished_at``), if that result is ok; sorted
    by source and channel. Pure."""
    latest: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        seen = latest.get(row["item_id"])
        if seen is None or row["finished_at"] >= seen["finished_at"]:
            latest[row["item_id"]] = row
    ok = [dict(r) for r in latest.values() if r["status"] == ItemStatus.OK]
    return sorted(ok, key=lambda r: (str(r["source"]), r.get("channel") or -1, r["item_id"]))


class OutputReader:
    """An output (a local folder or a URL), read whatever its format, without its lock."""

    def __init__(self, location: str | Path, storage_options: dict[str, str] | None = None) -> None:
        self.location = location
        self.where = Location.of(location)
        self.storage_options = storage_options or {}

    def format(self) -> str | None:
        """``parquet`` or ``delta`` for an existing output, None when nothing is there yet."""
        where = self.where
        if where.local is None:
            return "delta"  # the only format object storage takes
        with translated("read", where.url):
            found = layout.read_marker(where.local)
            if found is not None:
                return layout.marker_format(found)
            if (where.local / "transcripts" / "_delta_log").exists():
                return "delta"
            return "parquet" if (where.local / "transcripts").exists() else None

    def table(
        self, table: str, job: str | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        """A table (one job's rows, some columns, if asked) as a pyarrow Table; empty (with
        the table's columns) when nothing was written."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}; the tables are {list(TABLES)}")
        where = self.where
        fmt = self.format()
        with translated("read", where.child(table)):
            if fmt == "delta":
                from batch.output import delta  # deltalake is an optional extra

                return delta.read(where, table, job, columns, self.storage_options)
            if fmt is None or where.local is None:
                empty = logical_schema(table).empty_table()
                return empty.select(columns) if columns else empty
            return parquet.read(where.local, table, job, columns)

    def rows(self, table: str, job: str) -> list[dict[str, Any]]:
        """One job's rows of a table as dicts (map columns, such as metadata, as dicts)."""
        return list(self.table(table, job).to_pylist(maps_as_pydicts="strict"))

    def history(self, job: str) -> History:
        """What a job's output holds: each item's latest result, and the items held more
        than once (``duplicates``) or left with some of their tables only by a killed run
        (``unfinished``, Delta: not counted as done). In a local Parquet output, commits
        that killed runs left half-applied are finished first."""
        where = self.where
        fmt = self.format()
        if fmt == "delta":
            from batch.output import delta

            with translated("read", where.child("transcripts")):
                return delta.scan_unlocked(where, job, self.storage_options).history()
        if fmt is None or where.local is None:
            return Scan().history()
        with translated("finish the commit a killed run left in", where.url):
            parquet.settle(where.local, job)
        with translated("read", where.child("transcripts")):
            return parquet.scan(where.local, job).history()

    def forgotten(self, job: str) -> set[str]:
        """The ids of the job's forgotten items (`pulse-batch forget`'s tombstones)."""
        from batch.output import tombstones

        return set(tombstones.read(self.where, job))

    def job_names(self) -> list[str]:
        """The jobs that have rows (or, in a local output, reports) in the output, sorted."""
        if self.format() is None:
            return []
        names = set(self.table("transcripts", columns=["job"])["job"].to_pylist())
        if self.where.local is not None:
            with translated("read the reports of", self.where.url):
                names |= set(reports.job_folders(self.where))
        return sorted(str(n) for n in names if n)

    def job_tables(self, job: str, *, with_details: bool = True) -> JobTables:
        """One job's ok items (and, with details, their words, utterances and segments).

        Raises `ExportError` naming the jobs present when the output has none of ``job``,
        and `OutputError` when it holds items a killed run left half-committed (a local
        Parquet output's are finished first): they would read as empty documents."""
        if self.format() is None:
            raise ExportError(self.location, _NO_OUTPUT)
        forgotten = self.forgotten(job)  # a forget that was stopped may have left rows
        unfinished = sorted(self.history(job).unfinished - forgotten)
        if unfinished:
            raise OutputError(
                self.location,
                "export",
                f"{len(unfinished)} item(s) of job {job!r} were left half-committed by a "
                f"killed run (e.g. {unfinished[0]}); run the job again to redo them, then export",
            )
        transcripts = self.rows("transcripts", job)
        if not transcripts:
            known = self.job_names()
            hint = f"jobs here: {', '.join(known)}" if known else "it holds no job's rows yet"
            raise ExportError(self.location, f"no rows for job {job!r}; {hint}")
        items = [r for r in latest_ok(transcripts) if r["item_id"] not in forgotten]
        tables = JobTables(items)
        if not with_details:
            return tables
        wanted = {(r["item_id"], r["run_id"]) for r in items}
        for table, target in (
            ("words", tables.words),
            ("utterances", tables.utterances),
            ("segments", tables.segments),
        ):
            for row in self.rows(table, job):
                if (row["item_id"], row["run_id"]) in wanted:
                    target.setdefault(row["item_id"], []).append(row)
            for found in target.values():
                found.sort(key=lambda r: r.get("idx") or 0)
        return tables

    def latest_report(self, job: str | None = None) -> dict[str, Any]:
        """The newest run report (of one job, if given). Raises FileNotFoundError."""
        with translated("read the reports of", self.where.url):
            found = reports.latest(self.where, job)
        if found is None:
            folder = self.where.child("_reports")
            where = f" for job {job!r}" if job else ""
            raise FileNotFoundError(f"no report under {folder}{where}")
        return found

    def full_report(self, job: str | None = None) -> dict[str, Any]:
        """The newest run report (of one job, if given) with the job so far: its items by
        their latest result (``job_so_far``) and every run and shard (``runs``). Raises
        FileNotFoundError when there is none."""
        data = self.latest_report(job)
        name = str(data["job"])
        forgotten = len(self.forgotten(name))
        data["job_so_far"] = self.history(name).summary | (
            {"forgotten": forgotten} if forgotten else {}
        )
        data["runs"] = job_runs(
            self.run_reports(name),
            lambda run: self.run_alive(name, str(run["run_id"]), run.get("shard")),
        )
        return data

    def run_reports(self, job: str) -> list[dict[str, Any]]:
        """Every run's report of ``job``, oldest name first (a run still going, or killed,
        has the starting one it wrote, with status ``running``)."""
        with translated("read the reports of", self.where.url):
            return reports.every_run(self.where, job)

    def run_alive(self, job: str, run_id: str, shard: str | None = None) -> bool:
        """Whether run ``run_id`` of ``job`` (shard ``"I/N"``, if it was one) is still
        going: its process holds its run lock (a folder), or its shard's or the job's lease
        (S3, GCS, Azure Blob). On other object stores, where runs hold no lock, it cannot be
        told: True."""
        where = self.where
        if where.local is not None:
            return parquet.run_alive(where.local, job, run_id)
        from batch.output import lease, lease_stores

        store = lease_stores.store_for(where.url)
        if store is None:
            return True
        return lease.lease_live(where.url, job, parse_flag(shard) if shard else None, store)

    def compact(self) -> list[str]:
        """Compact a Delta output's tables (optimize, then vacuum files no version needs);
        a line per table saying what was done. Parquet outputs need nothing."""
        found = self.format()
        if found is None:  # a typo must not look like a compacted output
            raise ManifestError(self.location, _NO_OUTPUT)
        if found != "delta":
            return ["nothing to do: only Delta outputs are compacted"]
        from batch.output import delta

        with translated("compact", self.where.url):
            return delta.compact(self.where, self.storage_options)
