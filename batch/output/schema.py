"""The tables' columns, declared once; and the check that one item's rows fit them.

Adding a column: append a line to its table below (additively; readers of older files see
null). Adding a table: a new key in `COLUMNS` and a field of `ItemRows` (see `batch.model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import pyarrow as pa

from batch.model import ItemStatus

# Version 2: exactly one row per item in transcripts (its latest result).
SCHEMA_VERSION: Final = 2
PARTITION_CHOICES: Final = ("job", "date", "language")
UTC_MS: Final = pa.timestamp("ms", tz="UTC")

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
        ("status", pa.string(), "ok or failed: the item's latest result (one row per item)"),
        ("error_kind", pa.string(), "why it failed (see README), null when ok"),
        ("error", pa.string(), "the failure message, naming the file; null when ok"),
        ("attempts", pa.int32(), "session attempts for the item in this run (refusals too)"),
        ("pieces", pa.int32(), "sessions the recording was split into (1: streamed whole)"),
        ("duration_s", pa.float64(), "exact audio seconds of the recording (samples / rate)"),
        (
            "streamed_s",
            pa.float64(),
            "audio seconds streamed to the service for the item's result (less than"
            " duration_s with run.skip_silence; 0 for a recording with no speech)",
        ),
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
        ("started_at", UTC_MS, "when the item's first attempt started"),
        ("finished_at", UTC_MS, "when the item finished or gave up"),
        ("options", pa.string(), "the Pulse options sent, as JSON"),
        ("metadata", pa.map_(pa.string(), pa.string()), "extra columns of a list input"),
        ("reference", pa.string(), "true transcript from the list input (v2)"),
        ("wer", pa.float64(), "word error rate against reference, normalised (v2)"),
        ("cer", pa.float64(), "character error rate against reference, normalised (v2)"),
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
        ("speaker", pa.string(), "speaker label (integers as text); null when diarize is off"),
        ("speaker_confidence", pa.float64(), "0-1 when diarize is on"),
        ("piece", pa.int32(), "piece of a split long recording it came from; null if whole"),
        (
            "time_adjusted",
            pa.bool_(),
            "true when a time fell in a pause run.skip_silence shortened and was moved to"
            " the nearest edge of the audio kept",
        ),
    ],
    "utterances": [
        *_COMMON,
        ("idx", pa.int32(), "position of the utterance in the item, from 0"),
        ("text", pa.string(), "the sentence"),
        ("start_s", pa.float64(), "start, seconds from the start of the file"),
        ("end_s", pa.float64(), "end, seconds from the start of the file"),
        ("speaker", pa.string(), "speaker label (integers as text); null when diarize is off"),
        ("piece", pa.int32(), "piece of a split long recording it came from; null if whole"),
    ],
}
TABLES: Final = tuple(COLUMNS)
# The table whose rows say what is done; the others hang off it by (job, item_id, run_id).
MAIN_TABLE: Final = "transcripts"
# Columns of a transcripts row that say which item it is and when, kept when a row that
# does not fit the schema is turned into a failed row.
_IDENTITY = ("channel_name", "source", "attempts", "pieces", "started_at", "finished_at")


def logical_schema(table: str) -> pa.Schema:
    """All columns as readers see them (partition columns included)."""
    return pa.schema([pa.field(name, kind) for name, kind, _ in COLUMNS[table]])


def file_schema(table: str, partition_by: Sequence[str]) -> pa.Schema:
    """Columns stored inside Parquet files: partition columns live in the folder names."""
    fields = [pa.field(n, k) for n, k, _ in COLUMNS[table] if n not in partition_by]
    metadata = {"pulse_batch.schema_version": str(SCHEMA_VERSION), "pulse_batch.table": table}
    return pa.schema(fields, metadata=metadata)


def to_arrow(table: str, rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as an Arrow table of the logical schema. Raises pyarrow's errors on a misfit."""
    return pa.Table.from_pylist(rows, schema=logical_schema(table))


def misfit(rows_by_table: dict[str, list[dict[str, Any]]]) -> str | None:
    """Why one item's rows do not fit the schema (a column of the wrong type, an unknown
    column), or None when they fit. Checked per item, so one odd value never fails a batch."""
    for table, rows in rows_by_table.items():
        known = {name for name, _, _ in COLUMNS[table]}
        for row in rows:
            unknown = set(row) - known
            if unknown:
                return f"{table}: unknown column(s) {sorted(unknown)}"
        try:
            to_arrow(table, rows)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            return f"{table}: {type(exc).__name__}: {exc}"
    return None


def as_failed(transcript: dict[str, Any], reason: str) -> dict[str, Any]:
    """A failed transcripts row (error_kind ``protocol``) for an item whose rows did not fit:
    its identity columns kept where they themselves fit, everything it received dropped."""
    keep = {name for name, _, _ in _COMMON} | set(_IDENTITY)
    row: dict[str, Any] = {k: v for k, v in transcript.items() if k in keep}
    row.update(
        status=ItemStatus.FAILED,
        error_kind="protocol",
        error=f"{transcript.get('source')}: the service's answer does not fit the table "
        f"schema ({reason}); the item is kept as failed and will be retried",
        word_count=0,
    )
    if misfit({MAIN_TABLE: [row]}) is not None:  # an identity column is the odd one
        row = {k: row[k] for k in (*[n for n, _, _ in _COMMON], "status", "error_kind", "error")}
        row["job"], row["item_id"] = str(transcript.get("job")), str(transcript.get("item_id"))
        row.update(run_id=str(row.get("run_id")), date=str(row.get("date")))
        row["language"] = row["language"] if isinstance(row["language"], str) else None
        row["channel"] = row["channel"] if isinstance(row["channel"], int) else None
    return row
