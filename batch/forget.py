"""Forget items of a job: their rows in every table, their exported files, and a tombstone
so that later runs do not transcribe them again (`pulse-batch forget`; erasure requests).

`choose` (which items) is pure. `forget` works under the job's lock (never beside a run) in
the order that makes a kill at any moment safe to repeat: tombstones first (from then on no
run redoes the items), then the exported files, then the rows (`JobOutput.forget`: one
atomic commit in local Parquet; a DELETE per table in Delta, transcripts last). Every run of
`forget` also finishes what an earlier, killed one left: it removes the remaining rows of
every tombstoned item.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from batch.errors import ExportError
from batch.export import FORMATS, Condition, file_names, parse_where
from batch.output import COLUMNS, TABLES, JobOutput, OutputReader, latest_ok, layout, tombstones
from batch.output.layout import Location, translated


@dataclass(frozen=True)
class Gone:
    """An item forgotten (or, in a dry run, to be)."""

    item_id: str
    source: str  # for the operator's eyes only: never stored
    status: str  # its latest result; "" when only rows of other tables were left


@dataclass(frozen=True)
class ForgetResult:
    job: str
    items: list[Gone]  # chosen now, and tombstoned before but with rows still left
    rows: dict[str, int]  # table -> rows of those items removed (dry run: to remove)
    exports: list[Path]  # exported files removed (dry run: to remove)
    dry_run: bool
    forgotten: int  # the job's forgotten items, after this
    tombstones: str = ""  # where they are kept


def choose(
    row_ids: Iterable[str],
    tombstoned: Iterable[str],
    prefixes: Sequence[str] = (),
    conditions: Sequence[Condition] = (),
    rows: Sequence[Mapping[str, Any]] = (),
) -> set[str]:
    """The item ids ``prefixes`` name (each a whole id or a prefix of exactly one id, of
    the job's rows or its tombstones) or, without prefixes, those of ``rows`` (transcripts)
    matching every condition. Pure; raises `ExportError` for an id naming no item or more
    than one."""
    if not prefixes:
        return {str(r["item_id"]) for r in rows if all(c.matches(r) for c in conditions)}
    known = set(row_ids) | set(tombstoned)
    chosen: set[str] = set()
    for prefix in prefixes:
        found = {i for i in known if i.startswith(prefix)}
        if len(found) != 1:
            what = "no item" if not found else f"{len(found)} items"
            raise ExportError("--item", f"{what} of the job has an id starting {prefix!r}")
        chosen |= found
    return chosen


def forget(
    location: str | Path,
    job: str,
    *,
    items: Sequence[str] = (),
    where: str | None = None,
    reason: str = "",
    exports: Path | None = None,
    dry_run: bool = False,
    storage_options: dict[str, str] | None = None,
) -> ForgetResult:
    """Forget the items ``items`` names (ids or unique prefixes) or ``where`` selects (as
    in export: ``col=value[,col!=value]`` over transcripts columns and ``metadata.KEY``).

    ``exports`` is the folder holding the job's exports by format (default: the output's
    ``_exports/<job>``, or ``_exports/<job>`` here for an output at a URL). ``reason`` is
    stored in each tombstone: write why (a ticket number), never personal data.

    Raises `ExportError` (no such output or job, bad selection), `LockedError` (a run of
    the job is going), `OutputError`."""
    options = storage_options or {}
    reader = OutputReader(location, options)
    fmt = reader.format()
    if fmt is None:
        raise ExportError(location, "no pulse-batch output here; give the job's output.path")
    if bool(items) == bool(where):
        raise ExportError("--item", "give --item ID (one or more) or --where col=value")
    columns = [name for name, _, _ in COLUMNS["transcripts"]]
    conditions = parse_where(where, columns) if where else []
    here = Location.of(location)
    folder = exports or (here.local or Path(".")) / "_exports" / job
    if dry_run:
        return _plan(reader, here, job, items, conditions, folder)
    parts = _partitioning(here, options)
    with JobOutput.open(location, job, parts, fmt, options) as output:
        plan = _plan(reader, here, job, items, conditions, folder)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        known = output.forgotten()
        output.bury(
            [
                tombstones.Tombstone(g.item_id, now, reason)
                for g in plan.items
                if g.item_id not in known
            ]
        )
        with translated("remove an export in", folder):
            for path in plan.exports:
                path.unlink(missing_ok=True)
        output.forget({g.item_id for g in plan.items})
        total = len(output.forgotten())
    return ForgetResult(job, plan.items, plan.rows, plan.exports, False, total, plan.tombstones)


def _plan(
    reader: OutputReader,
    here: Location,
    job: str,
    prefixes: Sequence[str],
    conditions: Sequence[Condition],
    folder: Path,
) -> ForgetResult:
    """What forgetting would remove: the chosen items, and the tombstoned ones still
    holding rows (a forget that was killed)."""
    stones = tombstones.read(here, job)
    transcripts = reader.rows("transcripts", job)
    if not transcripts and not stones and job not in reader.job_names():
        known = reader.job_names()
        hint = f"jobs here: {', '.join(known)}" if known else "it holds no job's rows yet"
        raise ExportError(reader.location, f"no rows for job {job!r}; {hint}")
    ids = {str(r["item_id"]) for r in transcripts}
    chosen = choose(ids, stones, prefixes, conditions, transcripts)
    held = {table: reader.table(table, job, ["item_id"])["item_id"].to_pylist() for table in TABLES}
    present = {i for found in held.values() for i in found}
    # Items forgotten before with no row left are done; those with rows left (a forget
    # that was killed) are finished now, whatever this one chose.
    targets = (chosen - set(stones)) | (present & (chosen | set(stones)))
    rows = {table: sum(1 for i in found if i in targets) for table, found in held.items()}
    latest = {str(r["item_id"]): r for r in transcripts}
    gone = [
        Gone(
            i,
            str(latest[i]["source"]) if i in latest else "",
            str(latest.get(i, {}).get("status") or ""),
        )
        for i in sorted(targets)
    ]
    return ForgetResult(
        job,
        gone,
        rows,
        _export_files(folder, latest_ok(transcripts), targets),
        True,
        len(set(stones) | chosen),
        here.child(tombstones.FOLDER, job),
    )


def _export_files(folder: Path, ok_rows: list[dict[str, Any]], targets: set[str]) -> list[Path]:
    """The exported files of ``targets`` in ``folder`` (one subfolder per format), named
    as `batch.export.file_names` names them among all the job's items, or with the id
    suffix a name gets on a collision (a name without it might be another item's)."""
    names = file_names(ok_rows)
    found = []
    for row in ok_rows:
        item_id = str(row["item_id"])
        if item_id not in targets:
            continue
        alone = file_names([row])[item_id]
        stems = {names[item_id], f"{alone}-{item_id[:8]}"}
        for fmt in FORMATS:
            found += [p for s in sorted(stems) if (p := folder / fmt / f"{s}.{fmt}").is_file()]
    return found


def _partitioning(location: Location, storage_options: dict[str, str]) -> list[str]:
    """The partition columns an existing output was written with (the layout marker of a
    local output; the transcripts table's metadata on object storage)."""
    if location.local is not None:
        found = layout.read_marker(location.local) or {}
        return [str(c) for c in found.get("partition_by", [])]
    from batch.output import delta  # deltalake is an optional extra

    return delta.partition_columns(location, storage_options)
