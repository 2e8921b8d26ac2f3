"""Item rows written straight to an output, below the runner: for the output's own tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio

from batch.model import ItemRows
from batch.output import JobOutput

T0 = datetime(2026, 11, 24, 12, tzinfo=UTC)


def rows(
    item: str, words: int = 2, run_id: str = "r1", status: str = "ok", at: int = 0, job: str = "j"
) -> ItemRows:
    common = {
        "job": job,
        "date": "2026-11-24",
        "language": "en",
        "run_id": run_id,
        "item_id": item,
        "channel": None,
    }
    transcript: dict[str, Any] = {
        **common,
        "source": f"/{item}.wav",
        "status": status,
        "transcript": "a b" if status == "ok" else None,
        "error_kind": None if status == "ok" else "timeout",
        "started_at": T0 + timedelta(seconds=at),
        "finished_at": T0 + timedelta(seconds=at + 1),
        "attempts": 1,
        "duration_s": 1.0,
    }
    word_rows = [
        {**common, "segment": 0, "idx": i, "word": "w", "start_s": i, "end_s": i + 0.5}
        for i in range(words if status == "ok" else 0)
    ]
    return ItemRows(transcript, word_rows)


def open_output(out: Path, job: str = "j", fmt: str = "parquet") -> JobOutput:
    return JobOutput.open(out, job, ["job", "date"], fmt)


def write(out: Path, batches: list[list[ItemRows]], run_id: str = "r1", **kw: Any) -> None:
    """Commit each list as one batch in one run."""

    async def main() -> None:
        with open_output(out, **kw) as output:
            async with output.run(run_id, commit_every_items=10**6) as writer:
                for batch in batches:
                    for row in batch:
                        await writer.add(row)
                    await writer.flush()

    anyio.run(main)
