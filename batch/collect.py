"""Turn a session's final segments into rows: one transcript, its segments, words, utterances.

Pure functions: data in, data out. Only ``is_final`` segments ever reach here (partials are
revised later and may show unredacted text).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from batch.pulse.protocol import Transcription

# Fast talkers reach about 4-5 words a second; a recogniser stuck in a loop makes 10-20.
MAX_WORDS_PER_S: Final = 6.0
MIN_DURATION_FOR_RATE_S: Final = 2.0
MAX_SAME_WORD_RUN: Final = 10


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


def _span(final: Transcription, offset_s: float) -> tuple[float | None, float | None]:
    """A segment's time: from its words, else its utterances, else unknown."""
    timed = final.words or final.utterances
    if not timed:
        return None, None
    start = min(t.start_s for t in timed)
    end = max(t.end_s for t in timed)
    return round(start + offset_s, 6), round(end + offset_s, 6)


def collect_finals(
    finals: Sequence[Transcription],
    *,
    offset_s: float = 0.0,
    languages: Sequence[str] = (),
    full_transcript: str | None = None,
) -> Collected:
    """Rows from final segments, in order; ``offset_s`` shifts times into the file's base.

    ``languages`` and ``full_transcript`` are what the session saw on every final (the
    terminal one included, which may carry no text): see `batch.session.SessionResult`.
    """
    out = Collected(transcript=join_segments([f.transcript for f in finals]))
    out.language = next((f.language for f in reversed(finals) if f.language), None)
    out.languages = first_seen(*((f.language, *f.languages) for f in finals), languages)
    out.full_transcript = full_transcript
    for segment, final in enumerate(finals):
        start_s, end_s = _span(final, offset_s)
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
