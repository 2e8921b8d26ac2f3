"""A job's output read back, for every test: one reader.

A local Parquet output is read as a user reads it, with DuckDB over its hive-partitioned
files: an independent reader that sees every file, a duplicate row included. An output in
Delta or at a URL is read with the library's own reader (`batch.output.OutputReader`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from batch.output import OutputReader

TABLES = ("transcripts", "segments", "words", "utterances")


def parquet(out: Path | str, table: str) -> str:
    """DuckDB's name for ``table`` of the local Parquet output ``out``: all its files, the
    partition folders as columns."""
    return f"read_parquet('{out}/{table}/**/*.parquet', hive_partitioning=true)"


def sql(out: Path | str, query: str) -> list[tuple[Any, ...]]:
    """``query`` over the local Parquet output ``out``, in which ``{transcripts}``,
    ``{segments}``, ``{words}`` and ``{utterances}`` name its tables."""
    return duckdb.sql(query.format(**{t: parquet(out, t) for t in TABLES})).fetchall()


def by_source(out: Path | str, columns: str, *, name_only: bool = False) -> dict[str, Any]:
    """Transcripts rows of a local Parquet output by source (or its file name, with
    ``name_only``): the tuple of ``columns`` (comma-separated) of each."""
    found = sql(out, f"select source, {columns} from {{transcripts}}")
    return {(Path(str(r[0])).name if name_only else str(r[0])): r[1:] for r in found}


@dataclass(frozen=True)
class Counts:
    """What exactly-once is checked on: rows and items, ok ones, and words."""

    rows: int
    items: int  # distinct item_id
    ok: int  # ok rows
    ok_items: int  # distinct item_id of ok rows
    words: int
    distinct_words: int  # distinct (item_id, idx)


def counts(location: Path | str, job: str = "test-job") -> Counts:
    """`Counts` of ``job`` in the output at ``location``: a local Parquet folder (DuckDB), or
    Delta, or a URL (the library's reader)."""
    where = str(location)
    if "://" not in where and not (Path(where) / "transcripts" / "_delta_log").exists():
        ((rows, items, ok, ok_items),) = sql(
            where,
            "select count(*), count(distinct item_id), count(*) filter (status = 'ok'),"
            f" count(distinct item_id) filter (status = 'ok') from {{transcripts}}"
            f" where job = '{job}'",
        )
        ((words, distinct_words),) = sql(
            where,
            f"select count(*), count(distinct (item_id, idx)) from {{words}} where job = '{job}'",
        )
        return Counts(rows, items, ok, ok_items, words, distinct_words)
    t = OutputReader(where).table("transcripts", job, ["item_id", "status"])
    w = OutputReader(where).table("words", job, ["item_id", "idx"])
    item_ids, statuses = t["item_id"].to_pylist(), t["status"].to_pylist()
    ok_ids = [i for i, s in zip(item_ids, statuses, strict=True) if s == "ok"]
    word_keys = list(zip(w["item_id"].to_pylist(), w["idx"].to_pylist(), strict=True))
    return Counts(
        len(item_ids),
        len(set(item_ids)),
        len(ok_ids),
        len(set(ok_ids)),
        len(word_keys),
        len(set(word_keys)),
    )
