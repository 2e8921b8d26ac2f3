"""What an output holds for a job: each item's latest result. Pure."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from batch.model import ItemRows, ItemStatus


@dataclass
class Latest:
    """An item's latest result as its transcripts row says."""

    status: str
    finished_at: Any
    duration_s: float
    run_id: str


@dataclass(frozen=True)
class History:
    """Items whose latest result is ok or failed, and the job-so-far summary; items with
    more than one transcripts row (``duplicates``: runs that overlapped), and items left
    out because a killed run committed some of their tables only (``unfinished``)."""

    ok: frozenset[str]
    failed: frozenset[str]
    summary: dict[str, Any]
    duplicates: frozenset[str] = frozenset()
    unfinished: frozenset[str] = frozenset()


@dataclass
class Scan:
    """One pass over a job's transcripts: each item's latest result, and (local Parquet)
    the files, as relative paths shared by every table, that hold its rows."""

    latest: dict[str, Latest] = field(default_factory=dict)
    files: dict[str, set[str]] = field(default_factory=dict)
    rows: Counter[str] = field(default_factory=Counter)  # transcripts rows read, per item
    unfinished: set[str] = field(default_factory=set)

    def row(
        self, item: str, status: str, finished_at: Any, duration_s: float | None, run_id: str
    ) -> None:
        """Take a row read from the table into account (counted: see `duplicates`)."""
        self.rows[item] += 1
        self.note(item, status, finished_at, duration_s, run_id)

    def duplicates(self) -> frozenset[str]:
        """Items the table holds more than one row of (it should hold one: the latest)."""
        return frozenset(item for item, count in self.rows.items() if count > 1)

    def committed(self, rows: ItemRows, run_id: str) -> None:
        """``rows`` of run ``run_id`` were committed in place of the item's earlier rows
        (which went with the commit): they are now its one row and latest result."""
        transcript = rows.transcript
        self.latest.pop(rows.item_id, None)
        self.rows[rows.item_id] = 1
        self.unfinished.discard(rows.item_id)
        self.note(
            rows.item_id,
            str(transcript["status"]),
            transcript.get("finished_at"),
            transcript.get("duration_s"),
            run_id,
        )

    def note(
        self, item: str, status: str, finished_at: Any, duration_s: float | None, run_id: str
    ) -> None:
        """Take a row into account; the latest (by finish time, then run id) wins, so an
        output written before one row per item was kept still reads right."""
        known = self.latest.get(item)
        if known is None or (finished_at, run_id) >= (known.finished_at, known.run_id):
            self.latest[item] = Latest(status, finished_at, duration_s or 0.0, run_id)

    def history(self) -> History:
        latest = self.latest
        ok = [v for v in latest.values() if v.status == ItemStatus.OK]
        return History(
            ok=frozenset(i for i, v in latest.items() if v.status == ItemStatus.OK),
            failed=frozenset(i for i, v in latest.items() if v.status != ItemStatus.OK),
            summary={
                "runs_with_rows": len({v.run_id for v in latest.values()}),
                "items": len(latest),
                "ok": len(ok),
                "failed": len(latest) - len(ok),
                "audio_s": round(sum(v.duration_s for v in ok), 3),
            },
            duplicates=self.duplicates(),
            unfinished=frozenset(self.unfinished),
        )


SCAN_COLUMNS = ["item_id", "status", "finished_at", "duration_s", "run_id"]
