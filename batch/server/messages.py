"""The JSON messages the local server sends, built from words and session options.

Pure functions (data in, dict out). Shapes follow the vendor's reference page; the
unified path adds ``type: "transcription"`` and repeats the text as ``transcription``.
Times are seconds from the start of the session's audio, rounded to milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batch.pulse.protocol import Generation, PulseOptions, Word

# The local engines do not diarise: every word is speaker 0, with full confidence.
SPEAKER = 0
SPEAKER_CONFIDENCE = 1.0
SENTENCE_ENDS = (".", "?", "!")


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
    return " ".join(w.word for w in words)


def word_entry(word: Word, *, diarize: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "word": word.word,
        "start": round(word.start_s, 3),
        "end": round(word.end_s, 3),
        "confidence": 1.0 if word.confidence is None else word.confidence,
    }
    if diarize:
        entry["speaker"] = SPEAKER
        entry["speaker_confidence"] = SPEAKER_CONFIDENCE
    return entry


def utterances(words: Sequence[Word]) -> list[dict[str, Any]]:
    """Sentences, split after words ending in . ? or !; a trailing remainder counts too."""
    result: list[dict[str, Any]] = []
    sentence: list[Word] = []
    for word in words:
        sentence.append(word)
        if word.word.endswith(SENTENCE_ENDS):
            result.append(_utterance(sentence))
            sentence = []
    if sentence:
        result.append(_utterance(sentence))
    return result


def _utterance(words: Sequence[Word]) -> dict[str, Any]:
    return {
        "text": transcript_text(words),
        "start": round(words[0].start_s, 3),
        "end": round(words[-1].end_s, 3),
        "speaker": SPEAKER,
    }


def reported_language(options: PulseOptions) -> str:
    # "multi" asks for detection; the local engines only know English.
    return "en" if options.language == "multi" else options.language


def transcript_message(
    *,
    session_id: str,
    words: Sequence[Word],
    options: PulseOptions,
    generation: Generation,
    is_final: bool,
    is_last: bool = False,
    full_transcript: str | None = None,
) -> dict[str, Any]:
    """One transcription message; ``words`` already on the session time base.

    ``full_transcript`` (the cumulative finals) is included only on finals and only
    when the session asked for it.
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
        language = reported_language(options)
        message["language"] = language
        message["languages"] = [language]
        if options.full_transcript:
            message["full_transcript"] = full_transcript or ""
        if options.redact_pii or options.redact_pci:
            message["redacted_entities"] = []  # accepted, not implemented locally
    if options.word_timestamps:
        message["words"] = [word_entry(w, diarize=options.diarize) for w in words]
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
