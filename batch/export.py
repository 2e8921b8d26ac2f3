"""Per-item documents from a job's tables: SRT, WebVTT, JSON or plain text files.

Export reads an output through `batch.output.OutputReader` (local Parquet or Delta);
choosing items (`parse_where`, `select`), naming files (`file_names`) and building documents
(`document`) are pure; only `export_job` writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Final
from urllib.parse import urlparse

import pyarrow as pa

from batch import cues as cuelib
from batch.errors import ExportError
from batch.output import COLUMNS, JobTables, OutputReader

FORMATS: Final = ("srt", "vtt", "json", "txt")
_ID_SUFFIX_CHARS = 8
# File systems allow 255 bytes a name; leave room for the id suffix, the extension and the
# temporary name a document is written under first.
_MAX_NAME_BYTES = 200
# Columns every words/utterances row repeats from its transcript: left out of JSON documents.
_BOOKKEEPING = frozenset({"job", "date", "language", "run_id", "item_id", "channel"})
# Columns pyarrow returns as a list of (key, value) pairs.
_MAP_COLUMNS: Final = frozenset(
    name for table in COLUMNS.values() for name, kind, _ in table if pa.types.is_map(kind)
)


# --- choosing items -----------------------------------------------------------------

_CONDITION = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(!=|=)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Condition:
    column: str  # a transcripts column, or metadata.KEY
    value: str
    negated: bool = False

    def matches(self, row: Mapping[str, Any]) -> bool:
        if self.column.startswith("metadata."):
            found = (row.get("metadata") or {}).get(self.column.removeprefix("metadata."))
        else:
            found = row.get(self.column)
        text = "" if found is None else str(found)
        return (text == self.value) != self.negated


def parse_where(text: str, columns: Sequence[str]) -> list[Condition]:
    """``col=value[,col!=value...]``: every condition must hold. A column is a transcripts
    column or ``metadata.KEY``; values are compared as text (a null is the empty text)."""
    conditions = []
    for part in text.split(","):
        match = _CONDITION.match(part)
        if match is None:
            raise ExportError("--where", f"{part.strip()!r} is not column=value or column!=value")
        column, operator, value = match.groups()
        if column not in columns and not column.startswith("metadata."):
            raise ExportError(
                "--where",
                f"unknown column {column!r}; use one of {', '.join(columns)} or metadata.KEY",
            )
        conditions.append(Condition(column, value.strip("'\""), operator == "!="))
    return conditions


def select(
    items: Sequence[dict[str, Any]],
    conditions: Sequence[Condition] = (),
    item: str | None = None,
) -> list[dict[str, Any]]:
    """Items matching every condition, or the one item whose id starts with ``item``."""
    if item is not None:
        found = [r for r in items if str(r["item_id"]).startswith(item)]
        if len(found) != 1:
            what = "no ok item" if not found else f"{len(found)} items"
            raise ExportError("--item", f"{what} of the job has an id starting {item!r}")
        return found
    return [r for r in items if all(c.matches(r) for c in conditions)]


# --- naming -------------------------------------------------------------------------


def _stem(source: str) -> str:
    path = urlparse(source).path if "://" in source else source
    return PurePosixPath(path.replace("\\", "/")).stem or "item"


def file_names(items: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """item_id → file name without extension: the source's stem, plus ``.<channel_name>``
    or ``.ch<N>`` for one channel of a file; names that would collide (case-insensitively)
    all get ``-<first 8 characters of the item id>``, and so do names cut short to fit a
    file system's limit."""
    base: dict[str, str] = {}
    cut: set[str] = set()
    for row in items:
        name = _stem(str(row["source"]))
        if row.get("channel_name"):
            name += f".{row['channel_name']}"
        elif row.get("channel") is not None:
            name += f".ch{row['channel']}"
        name = re.sub(r"[/\\\x00]", "_", name)
        encoded = name.encode("utf-8", "replace")
        if len(encoded) > _MAX_NAME_BYTES:
            name = encoded[:_MAX_NAME_BYTES].decode("utf-8", "ignore")  # whole characters
            cut.add(row["item_id"])
        base[row["item_id"]] = name
    counts: dict[str, int] = {}
    for name in base.values():
        counts[name.casefold()] = counts.get(name.casefold(), 0) + 1
    return {
        item_id: name
        if counts[name.casefold()] == 1 and item_id not in cut
        else f"{name}-{str(item_id)[:_ID_SUFFIX_CHARS]}"
        for item_id, name in base.items()
    }


# --- documents ----------------------------------------------------------------------


def _plain(column: str, value: Any) -> Any:
    """A value as JSON has it. Only a map column's (key, value) pairs become an object: an
    empty list column stays ``[]``."""
    if isinstance(value, datetime):
        return value.isoformat()
    if column in _MAP_COLUMNS and isinstance(value, list):
        return dict(value)  # a map column as pyarrow returns it
    return value


def _detail(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _plain(k, v) for k, v in r.items() if k not in _BOOKKEEPING} for r in rows]


def document(
    fmt: str,
    item: Mapping[str, Any],
    tables: JobTables,
    *,
    from_utterances: bool = False,
    limits: cuelib.CueLimits | None = None,
) -> str:
    """The text of one item's file in ``fmt`` (srt, vtt, json or txt)."""
    item_id = str(item["item_id"])
    if fmt == "txt":
        return cuelib.clean_text(str(item.get("transcript") or "")) + "\n"  # no NUL, no CR
    if fmt == "json":
        body = {
            "item": {k: _plain(k, v) for k, v in item.items()},
            "segments": _detail(tables.segments.get(item_id, [])),
            "words": _detail(tables.words.get(item_id, [])),
            "utterances": _detail(tables.utterances.get(item_id, [])),
        }
        return json.dumps(body, indent=2, ensure_ascii=False) + "\n"
    limits = limits or cuelib.CueLimits()
    if from_utterances:
        cues = cuelib.cues_from_utterances(
            cuelib.timed(tables.utterances.get(item_id, []), "text"), limits
        )
    else:
        cues = cuelib.cues_from_words(cuelib.timed(tables.words.get(item_id, [])), limits)
    return cuelib.to_srt(cues) if fmt == "srt" else cuelib.to_vtt(cues)


@dataclass(frozen=True)
class Exported:
    folder: Path
    files: list[Path]
    without_timings: list[str]  # sources of items with no words (or utterances) to cue
    # (source, why) of items whose document could not be built; the others were written.
    failed: list[tuple[str, str]] = field(default_factory=list)


def export_job(
    location: str | Path,
    job: str,
    fmt: str,
    to_dir: Path,
    *,
    where: str | None = None,
    item: str | None = None,
    from_utterances: bool = False,
) -> Exported:
    """Write one ``fmt`` file per selected ok item of ``job`` into ``to_dir``.

    An item whose document cannot be built is left out and named in ``failed``; the other
    files are still written. Raises `ExportError` for bad usage and `OSError` when the
    folder cannot be written."""
    if fmt not in FORMATS:
        raise ExportError("--format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    tables = OutputReader(location).job_tables(job)
    columns = [name for name, _, _ in COLUMNS["transcripts"]]
    conditions = parse_where(where, columns) if where else []
    chosen = select(tables.items, conditions, item)
    names = file_names(tables.items)  # over all items: a name never depends on the filter
    to_dir.mkdir(parents=True, exist_ok=True)
    files, untimed, failed = [], [], []
    source_table = tables.utterances if from_utterances else tables.words
    for row in chosen:
        if fmt in ("srt", "vtt") and not source_table.get(row["item_id"]):
            untimed.append(str(row["source"]))
        path = to_dir / f"{names[row['item_id']]}.{fmt}"
        try:
            text = document(fmt, row, tables, from_utterances=from_utterances)
        except Exception as exc:  # one item's odd rows must not stop the others' files
            failed.append((str(row["source"]), f"{type(exc).__name__}: {_bounded(exc)}"))
            continue
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        files.append(path)
    return Exported(to_dir, files, untimed, failed)


def _bounded(exc: Exception, limit: int = 300) -> str:
    text = cuelib.clean_text(str(exc))
    return text if len(text) <= limit else text[:limit] + "..."
