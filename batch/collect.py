"""Turn a session's final segments into rows: one transcript, its words, its utterances.

Pure functions: data in, data out; `item_rows` builds a finished item's rows for every
table. Only ``is_final`` segments ever reach here (partials are revised later and may show
unredacted text).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from batch.plan import Item
from batch.pulse.protocol import Transcription


@dataclass
class Collected:
    """Everything one item (or channel) contributes to the tables, minus bookkeeping columns."""

    transcript: str = ""
    language: str | None = None
    words: list[dict[str, Any]] = field(default_factory=list)
    utterances: list[dict[str, Any]] = field(default_factory=list)


def join_segments(texts: Sequence[str]) -> str:
    return " ".join(t.strip() for t in texts if t and t.strip())


def collect_finals(finals: Sequence[Transcription], *, offset_s: float = 0.0) -> Collected:
    """Rows from final segments, in order; ``offset_s`` shifts times into the file's base."""
    out = Collected(transcript=join_segments([f.transcript for f in finals]))
    out.language = next((f.language for f in reversed(finals) if f.language), None)
    for segment, final in enumerate(finals):
        for word in final.words:
            out.words.append(
                {
                    "segment": segment,
                    "idx": len(out.words),
                    "word": word.word,
                    "start_s": round(word.start_s + offset_s, 6),
                    "end_s": round(word.end_s + offset_s, 6),
                    "confidence": word.confidence,
                    "speaker": word.speaker,
                    "speaker_confidence": word.speaker_confidence,
                }
            )
        for utterance in final.utterances:
            out.utterances.append(
                {
                    "idx": len(out.utterances),
                    "text": utterance.text,
                    "start_s": round(utterance.start_s + offset_s, 6),
                    "end_s": round(utterance.end_s + offset_s, 6),
                    "speaker": utterance.speaker,
                }
            )
    return out


@dataclass
class ItemRows:
    """One finished item's rows for each table (partition and bookkeeping columns included)."""

    transcript: dict[str, Any]
    words: list[dict[str, Any]] = field(default_factory=list)
    utterances: list[dict[str, Any]] = field(default_factory=list)

    def by_table(self) -> dict[str, list[dict[str, Any]]]:
        """Rows keyed by table name (the names of `batch.output.schema.COLUMNS`)."""
        return {
            "transcripts": [self.transcript],
            "words": self.words,
            "utterances": self.utterances,
        }

    @property
    def item_id(self) -> str:
        return str(self.transcript["item_id"])

    @property
    def ok(self) -> bool:
        return bool(self.transcript.get("status") == "ok")


@dataclass(frozen=True)
class RunInfo:
    """What every row of a run shares."""

    job: str
    run_id: str
    date: str  # UTC date the run started, YYYY-MM-DD


@dataclass(frozen=True)
class Outcome:
    """How an item ended: ``collected`` when ok, ``error_kind``/``error`` when it failed."""

    started_at: datetime
    finished_at: datetime
    attempts: int
    pieces: int = 1
    collected: Collected | None = None
    duration_s: float = 0.0
    session_id: str | None = None
    error_kind: str | None = None
    error: str | None = None


def item_rows(item: Item, run: RunInfo, outcome: Outcome) -> ItemRows:
    """The rows one finished item contributes to every table. Pure."""
    common = {
        "job": run.job,
        "date": run.date,
        "language": item.options.language,
        "run_id": run.run_id,
        "item_id": item.item_id,
        "channel": item.channel,
    }
    transcript: dict[str, Any] = {
        **common,
        "channel_name": item.channel_name,
        "source": item.source,
        "attempts": outcome.attempts,
        "pieces": outcome.pieces,
        "started_at": outcome.started_at,
        "finished_at": outcome.finished_at,
        "options": json.dumps(asdict(item.options), sort_keys=True, default=list),
        "metadata": item.metadata or None,
    }
    rows = ItemRows(transcript)
    collected = outcome.collected
    if collected is None:
        transcript.update(
            status="failed",
            error_kind=outcome.error_kind or "internal",
            error=outcome.error or "unknown failure",
            word_count=0,
        )
        return rows
    rows.words = [{**common, **w} for w in collected.words]
    rows.utterances = [{**common, **u} for u in collected.utterances]
    transcript.update(
        status="ok",
        duration_s=outcome.duration_s,
        transcript=collected.transcript,
        detected_language=collected.language,
        session_id=outcome.session_id,
        word_count=len(rows.words),
    )
    return rows
