"""Turn a session's final segments into rows: one transcript, its words, its utterances.

Pure functions: data in, data out. Only ``is_final`` segments ever reach here (partials are
revised later and may show unredacted text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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
