"""Turn a session's final segments into rows: one transcript, its words, its utterances.

Pure functions: data in, data out. Only ``is_final`` segments ever reach here (partials are
revised later and may show unredacted text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from batch.pulse.protocol import Transcription
from batch.timemap import TimeMap


@dataclass
class Collected:
    """Everything one item (or channel) contributes to the tables, minus bookkeeping columns."""

    transcript: str = ""
    language: str | None = None
    words: list[dict[str, Any]] = field(default_factory=list)
    utterances: list[dict[str, Any]] = field(default_factory=list)


def join_segments(texts: Sequence[str]) -> str:
    return " ".join(t.strip() for t in texts if t and t.strip())


def _source_times(
    timemap: TimeMap | None, start_s: float, end_s: float
) -> tuple[float, float, bool]:
    """A reported span in the file's time base, and whether an edge fell in a skipped gap."""
    if timemap is None:
        return round(start_s, 6), round(end_s, 6), False
    start, start_moved = timemap.to_source(start_s)
    end, end_moved = timemap.to_source(end_s)
    return round(start, 6), round(max(start, end), 6), start_moved or end_moved


def collect_finals(finals: Sequence[Transcription], *, timemap: TimeMap | None = None) -> Collected:
    """Rows from final segments, in order; ``timemap`` (None: the stream is the file) puts
    the times into the file's time base."""
    out = Collected(transcript=join_segments([f.transcript for f in finals]))
    out.language = next((f.language for f in reversed(finals) if f.language), None)
    for segment, final in enumerate(finals):
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
