"""One session for several units, as plain data: who may share, and whose each final is.

A reused session streams units back to back with ``{"type": "finalize"}`` between them
(`batch.reuse`): the service flushes its buffer at each, so no segment, and no word, spans
two units, and its times keep counting from the session's first audio. Here, pure: which
options allow that, which unit each final belongs to (by its words' times), its times moved
onto the unit's own audio, and how many units are known complete when a session fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from batch.pulse.protocol import PCM_SAMPLE_BYTES, Generation, PulseOptions, Transcription


def reusable(options: PulseOptions, generation: Generation) -> bool:
    """Whether units with ``options`` can share a session and still get exactly what their
    own session would give: the endpoint must have ``finalize``; finals need word times to
    be told apart; and nothing may carry over from one unit to the next (a cumulative
    ``full_transcript``, speaker labels, redaction numbering, detected languages); and the
    audio must be raw PCM (an Opus stream has a header of its own)."""
    return (
        generation.has_finalize
        and options.word_timestamps
        and not options.full_transcript
        and not options.diarize
        and not (options.redact_pii or options.redact_pci)
        and not options.language.startswith("multi")
        and options.encoding in PCM_SAMPLE_BYTES
    )


@dataclass(frozen=True)
class Span:
    """Where one unit's audio lies in its session's: ``[start_s, end_s)``."""

    start_s: float
    end_s: float


def _at(time_s: float, spans: Sequence[Span]) -> int:
    """The index of the span holding ``time_s`` (before the first: 0; after all: the last)."""
    for index in range(len(spans) - 1, -1, -1):
        if time_s >= spans[index].start_s:
            return index
    return 0


def owner(final: Transcription, spans: Sequence[Span], previous: int = 0) -> int:
    """The unit a final belongs to: the one holding its first word's middle. A final with
    no word times (an odd service) goes with the one before it (finals come in order)."""
    if not final.words:
        return previous
    first = final.words[0]
    return _at((first.start_s + first.end_s) / 2, spans)


def _moved(time_s: float, offset_s: float) -> float:
    # The service's millisecond grid kept; a word whose onset it put a little before the
    # unit's first sample starts at 0, as in a session of its own.
    return max(0.0, round(time_s - offset_s, 3))


def shifted(final: Transcription, offset_s: float) -> Transcription:
    """``final`` on its unit's time base."""
    words = tuple(
        replace(w, start_s=_moved(w.start_s, offset_s), end_s=_moved(w.end_s, offset_s))
        for w in final.words
    )
    utterances = tuple(
        replace(u, start_s=_moved(u.start_s, offset_s), end_s=_moved(u.end_s, offset_s))
        for u in final.utterances
    )
    return replace(final, words=words, utterances=utterances)


def split_finals(
    finals: Sequence[Transcription], spans: Sequence[Span]
) -> list[list[Transcription]]:
    """Each unit's finals, in order, with times relative to its own audio."""
    split: list[list[Transcription]] = [[] for _ in spans]
    unit = 0
    for final in finals:
        unit = owner(final, spans, unit)
        split[unit].append(shifted(final, spans[unit].start_s))
    return split


def settled(finals: Sequence[Transcription], spans: Sequence[Span], complete: bool) -> int:
    """How many leading units are known to have all their finals: every unit before one
    that a final belongs to (finals come in order), or all once ``is_last`` came."""
    if complete:
        return len(spans)
    unit = 0
    for final in finals:
        unit = max(unit, owner(final, spans, unit))
    return unit
