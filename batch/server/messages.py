"""The JSON messages the local server sends, built from words and session options.

Pure functions (data in, dict out). Shapes follow the vendor's reference page; the
unified path adds ``type: "transcription"`` and repeats the text as ``transcription``.
Times are seconds from the start of the session's audio, rounded to milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from batch.pulse.protocol import Generation, PulseOptions, Word
from batch.server.text import join_words, sentences


def shift_words(words: Sequence[Word], offset_s: float) -> list[Word]:
    """Segment-relative words moved onto the session's time base."""
    return [
        Word(
            word=w.word,
            start_s=round(w.start_s + offset_s, 3),
            end_s=round(w.end_s + offset_s, 3),
            confidence=w.confidence,
        )
        for w in words
    ]


def transcript_text(words: Sequence[Word]) -> str:
    return join_words([w.word for w in words])


def word_entry(word: Word) -> dict[str, Any]:
    # No speaker: the local engines do not diarize, and a made-up "0" would look real.
    return {
        "word": word.word,
        "start": round(word.start_s, 3),
        "end": round(word.end_s, 3),
        "confidence": 1.0 if word.confidence is None else word.confidence,
    }


def utterances(words: Sequence[Word]) -> list[dict[str, Any]]:
    """Sentences (not cut at ``Dr.`` or initials); a trailing remainder counts too."""
    return [
        {
            "text": transcript_text(sentence),
            "start": round(sentence[0].start_s, 3),
            "end": round(sentence[-1].end_s, 3),
        }
        for sentence in sentences(words)
    ]


def reported_language(options: PulseOptions) -> str:
    # "multi"/"multi-asian" ask for detection; the plain local engines only know English.
    return "en" if options.language.startswith("multi") else options.language


@dataclass(frozen=True)
class FinalFacts:
    """What a final reports besides its words: set by the session, which keeps the state."""

    language: str
    languages: Sequence[str] = ()
    redacted_entities: Sequence[str] = ()
    full_transcript: str | None = None


def transcript_message(
    *,
    session_id: str,
    words: Sequence[Word],
    options: PulseOptions,
    generation: Generation,
    is_final: bool,
    is_last: bool = False,
    final: FinalFacts | None = None,
) -> dict[str, Any]:
    """One transcription message; ``words`` already on the session time base (and, for a
    final, already redacted and with numerals applied).

    ``final`` carries a final's language(s), placeholders and the cumulative
    ``full_transcript`` (sent only when the session asked for it).
    """
    text = transcript_text(words)
    message: dict[str, Any] = {}
    unified = generation is not Generation.LEGACY  # both newer paths use this shape
    if unified:
        message["type"] = "transcription"
    message.update(
        {"session_id": session_id, "transcript": text, "is_final": is_final, "is_last": is_last}
    )
    if unified:
        message["transcription"] = text
    if is_final:
        final = final or FinalFacts(reported_language(options))
        message["language"] = final.language
        message["languages"] = list(final.languages or [final.language])
        if options.full_transcript:
            message["full_transcript"] = final.full_transcript or ""
        if options.redact_pii or options.redact_pci:
            message["redacted_entities"] = list(final.redacted_entities)
    if options.word_timestamps:
        message["words"] = [word_entry(w) for w in words]
    if options.sentence_timestamps and is_final:
        message["utterances"] = utterances(words)
    return message


def wants_vad_events(options: PulseOptions) -> bool:
    """``vad_events=true`` (alias ``vad=true``) on a newer path asks for speech events."""
    return "true" in (options.extra.get("vad_events"), options.extra.get("vad"))


def speech_event(session_id: str, kind: str, at_s: float) -> dict[str, Any]:
    """``speech_started`` / ``speech_ended``: seconds from the session's first audio."""
    return {"type": kind, "session_id": session_id, "timestamp": round(at_s, 3)}


def error_message(session_id: str, message: str, code: str) -> dict[str, Any]:
    """The unified error shape, used on both paths (clients must parse it anyway)."""
    return {
        "type": "error",
        "status": "error",
        "message": message,
        "code": code,
        "session_id": session_id,
    }
