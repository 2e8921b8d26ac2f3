"""Turn a session's final segments into rows: one transcript, its segments, words, utterances.

Pure functions: data in, data out; `item_rows` builds a finished item's rows for every
table. Only ``is_final`` segments ever reach here (partials are revised later and may show
unredacted text).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Final

from batch.model import Item, ItemRows, ItemStatus
from batch.pulse.protocol import Transcription
from batch.timemap import TimeMap

# Fast talkers reach about 4-5 words a second; a recogniser stuck in a loop makes 10-20.
MAX_WORDS_PER_S: Final = 6.0
MIN_DURATION_FOR_RATE_S: Final = 2.0
MAX_SAME_WORD_RUN: Final = 10
# Services round times to their frames; a word ending this far past the audio is no rounding.
TIME_MARGIN_S: Final = 1.0


@dataclass
class Collected:
    """Everything one item (or channel) contributes to the tables, minus bookkeeping columns."""

    transcript: str = ""
    language: str | None = None
    languages: list[str] = field(default_factory=list)
    redacted_entities: list[str] = field(default_factory=list)
    full_transcript: str | None = None
    segments: list[dict[str, Any]] = field(default_factory=list)
    words: list[dict[str, Any]] = field(default_factory=list)
    utterances: list[dict[str, Any]] = field(default_factory=list)


def join_segments(texts: Sequence[str]) -> str:
    return " ".join(t.strip() for t in texts if t and t.strip())


def first_seen(*groups: Iterable[str | None]) -> list[str]:
    """Every distinct value, in the order first met."""
    return list(dict.fromkeys(v for group in groups for v in group if v))


def _source_times(
    timemap: TimeMap | None, start_s: float, end_s: float
) -> tuple[float, float, bool]:
    """A reported span in the file's time base, and whether an edge fell in a skipped gap."""
    if timemap is None:
        return round(start_s, 6), round(end_s, 6), False
    start, start_moved = timemap.to_source(start_s)
    end, end_moved = timemap.to_source(end_s)
    return round(start, 6), round(max(start, end), 6), start_moved or end_moved


def _span(final: Transcription, timemap: TimeMap | None) -> tuple[float | None, float | None]:
    """A segment's time: from its words, else its utterances, else unknown."""
    timed = final.words or final.utterances
    if not timed:
        return None, None
    start, end, _ = _source_times(
        timemap, min(t.start_s for t in timed), max(t.end_s for t in timed)
    )
    return start, end


def collect_finals(
    finals: Sequence[Transcription],
    *,
    timemap: TimeMap | None = None,
    languages: Sequence[str] = (),
    full_transcript: str | None = None,
) -> Collected:
    """Rows from final segments, in order; ``timemap`` (None: the stream is the file) puts
    the times into the file's time base.

    ``languages`` and ``full_transcript`` are what the session saw on every final (the
    terminal one included, which may carry no text): see `batch.session.SessionResult`.
    """
    out = Collected(transcript=join_segments([f.transcript for f in finals]))
    out.language = next((f.language for f in reversed(finals) if f.language), None)
    out.languages = first_seen(*((f.language, *f.languages) for f in finals), languages)
    out.full_transcript = full_transcript
    for segment, final in enumerate(finals):
        start_s, end_s = _span(final, timemap)
        out.redacted_entities += final.redacted_entities
        out.segments.append(
            {
                "segment": segment,
                "text": final.transcript,
                "detected_language": final.language,
                "start_s": start_s,
                "end_s": end_s,
                "redacted_entities": list(final.redacted_entities),
            }
        )
        for word in final.words:
            start, end, adjusted = _source_times(timemap, word.start_s, word.end_s)
            out.words.append(
                {
                    "segment": segment,
                    "idx": len(out.words),
                    "word": word.word,
                    "start_s": start,
                    "end_s": end,
                    "confidence": word.confidence,
                    "speaker": word.speaker,
                    "speaker_confidence": word.speaker_confidence,
                    "time_adjusted": adjusted,
                }
            )
        for utterance in final.utterances:
            start, end, _ = _source_times(timemap, utterance.start_s, utterance.end_s)
            out.utterances.append(
                {
                    "idx": len(out.utterances),
                    "text": utterance.text,
                    "start_s": start,
                    "end_s": end,
                    "speaker": utterance.speaker,
                }
            )
    return out


def quality(words: Sequence[str], duration_s: float) -> str | None:
    """A warning when the words cannot be what was said, else None.

    Two rules, both signs of a recogniser stuck in a loop: more than `MAX_WORDS_PER_S`
    words a second over an item of at least `MIN_DURATION_FOR_RATE_S`, or one word
    repeated more than `MAX_SAME_WORD_RUN` times in a row.
    """
    if duration_s >= MIN_DURATION_FOR_RATE_S and len(words) / duration_s > MAX_WORDS_PER_S:
        rate = len(words) / duration_s
        return (
            f"implausible_word_rate: {len(words)} words in {duration_s:.1f} s "
            f"({rate:.1f}/s; speech rarely exceeds {MAX_WORDS_PER_S:g}/s)"
        )
    run, longest, longest_word = 0, 0, ""
    for index, word in enumerate(words):
        same = index > 0 and word.strip(",.!?").lower() == words[index - 1].strip(",.!?").lower()
        run = run + 1 if same else 1
        if run > longest:
            longest, longest_word = run, word
    if longest > MAX_SAME_WORD_RUN:
        return f"repeated_word: {longest_word!r} {longest} times in a row"
    return None


def time_quality(collected: Collected, duration_s: float) -> str | None:
    """A warning when words or utterances end after the recording (beyond `TIME_MARGIN_S`
    of rounding), else None; a duration of 0 (unknown) cannot be judged. Times before 0
    never get here (`batch.pulse.responses` refuses them)."""
    if duration_s <= 0:
        return None
    limit = duration_s + TIME_MARGIN_S
    for table, rows in (("words", collected.words), ("utterances", collected.utterances)):
        late = [row["end_s"] for row in rows if row["end_s"] > limit]
        if late:
            return (
                f"times_past_end: {len(late)} {table} end after the recording "
                f"(latest at {max(late):.1f} s; the recording is {duration_s:.1f} s)"
            )
    return None


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
    streamed_s: float = 0.0  # what was streamed for the result (less with skip_silence)
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
            status=ItemStatus.FAILED,
            error_kind=outcome.error_kind or "internal",
            error=outcome.error or "unknown failure",
            word_count=0,
        )
        return rows
    rows.words = [{**common, **w} for w in collected.words]
    rows.utterances = [{**common, **u} for u in collected.utterances]
    rows.segments = [{**common, **g} for g in collected.segments]
    transcript.update(
        status=ItemStatus.OK,
        duration_s=outcome.duration_s,
        streamed_s=outcome.streamed_s,
        transcript=collected.transcript,
        detected_language=collected.language,
        languages=collected.languages,
        redacted_entities=collected.redacted_entities,
        # Null when off, whatever a service sends unasked.
        full_transcript=collected.full_transcript if item.options.full_transcript else None,
        quality=time_quality(collected, outcome.duration_s)
        or quality(collected.transcript.split(), outcome.duration_s),
        session_id=outcome.session_id,
        word_count=len(rows.words),
    )
    return rows
