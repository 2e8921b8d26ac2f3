"""Subtitle cues from timed words or utterances, and their SRT / WebVTT text.

Pure functions: rows in, cues (and text) out. Cue times are the words' own times, rounded to
the millisecond the formats carry: a cue starts when its first word starts and ends when its
last word ends. A new cue starts at a speaker change, at a pause of ``pause_s`` or more, after
a sentence end, and whenever the next word would make the cue longer than ``max_duration_s``
or too long for ``max_lines`` lines of ``max_chars`` characters.

Service text is never markup and never breaks a file: `clean_text` makes each word one line
of printable text (control characters, NUL and line breaks become spaces, so no blank line
ends a cue early); `to_vtt` escapes ``&``, ``<`` and ``>`` (so no ``-->`` either); `to_srt`,
which has no escapes, writes ``<`` as ``‹`` (players read ``<i>`` and ``<font>`` as tags)
and ``-->`` as ``->``. Words are cued in time order whatever order they came in; cues are
sorted by start, and each ends at or after its start.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Final

import srt
import webvtt

_SENTENCE_END = (".", "?", "!", "。", "？", "！", "…")
# C0 and C1 controls (NUL, CR, LF, NEL, ...), DEL, and the Unicode line/paragraph separators.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SPACES: Final = re.compile(r"\s+")
_ARROW: Final = re.compile(r"-{2,}>")


@dataclass(frozen=True)
class CueLimits:
    """What subtitle users expect (BBC / Netflix style guides use 37-42 characters a line,
    two lines, and about 7 seconds at most on screen)."""

    max_chars: int = 42
    max_lines: int = 2
    max_duration_s: float = 7.0
    pause_s: float = 0.8  # a silence at least this long always starts a new cue


@dataclass(frozen=True)
class TimedText:
    """A word or utterance: its text, times in seconds, and speaker label if any."""

    text: str
    start_s: float
    end_s: float
    speaker: str | None = None


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    lines: tuple[str, ...]
    speaker: str | None = None


def clean_text(text: str) -> str:
    """Service text as one line of printable text: control characters and line breaks
    become spaces, runs of whitespace one space, no space at either end."""
    return _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()


def _seconds(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def timed(rows: Iterable[Mapping[str, Any]], text_key: str = "word") -> list[TimedText]:
    """Table rows (``words`` or ``utterances``) as timed text in time order (by start, then
    end; rows of equal times keep their order). Text is `clean_text`; rows left blank, or
    without finite times, are dropped (they cannot be cued)."""
    out = []
    for row in rows:
        text = clean_text(str(row.get(text_key) or ""))
        start, end = _seconds(row.get("start_s")), _seconds(row.get("end_s"))
        if text and start is not None and end is not None:
            speaker = clean_text(str(row.get("speaker") or "")) or None
            out.append(TimedText(text, start, max(start, end), speaker))
    return sorted(out, key=lambda t: (t.start_s, t.end_s))


def layout(words: Sequence[str], max_chars: int, max_lines: int) -> tuple[str, ...] | None:
    """The words as at most ``max_lines`` lines of at most ``max_chars`` characters, or None
    if they do not fit. Two lines are balanced (the break that makes the longer line
    shortest); a single word longer than a line gets a line of its own."""
    text = " ".join(words)
    if len(text) <= max_chars or len(words) == 1:
        return (text,) if max_lines >= 1 else None
    if max_lines == 2:
        best: tuple[str, str] | None = None
        for cut in range(1, len(words)):
            first, second = " ".join(words[:cut]), " ".join(words[cut:])
            if len(first) > max_chars or len(second) > max_chars:
                continue
            if best is None or max(len(first), len(second)) < max(map(len, best)):
                best = (first, second)
        return best
    lines: list[list[str]] = [[]]
    for word in words:
        candidate = " ".join([*lines[-1], word])
        if lines[-1] and len(candidate) > max_chars:
            lines.append([word])
        else:
            lines[-1].append(word)
    return tuple(" ".join(line) for line in lines) if len(lines) <= max_lines else None


def _ms(seconds: float) -> float:
    return round(seconds * 1000) / 1000


def _cue(group: Sequence[TimedText], lines: tuple[str, ...]) -> Cue:
    # Words come sorted by start; the last to end may not be the last to start.
    start = _ms(min(w.start_s for w in group))
    return Cue(start, max(start, _ms(max(w.end_s for w in group))), lines, group[0].speaker)


def _in_time_order(cues: list[Cue]) -> list[Cue]:
    return sorted(cues, key=lambda c: (c.start_s, c.end_s))  # stable: ties keep their order


def cues_from_words(
    words: Sequence[TimedText], limits: CueLimits = CueLimits(), *, sentence_breaks: bool = True
) -> list[Cue]:
    """Group words (in time order, as `timed` gives them) into cues within ``limits`` (see
    the module docstring)."""
    cues: list[Cue] = []
    group: list[TimedText] = []
    lines: tuple[str, ...] = ()
    for word in words:
        if group:
            previous = group[-1]
            grown = layout([w.text for w in (*group, word)], limits.max_chars, limits.max_lines)
            starts_new = (
                word.speaker != previous.speaker
                or word.start_s - previous.end_s >= limits.pause_s
                or (sentence_breaks and previous.text.endswith(_SENTENCE_END))
                or word.end_s - group[0].start_s > limits.max_duration_s
                or grown is None
            )
            if not starts_new and grown is not None:
                group.append(word)
                lines = grown
                continue
            cues.append(_cue(group, lines))
        group = [word]
        lines = layout([word.text], limits.max_chars, limits.max_lines) or (word.text,)
    if group:
        cues.append(_cue(group, lines))
    return _in_time_order(cues)


def cues_from_utterances(
    utterances: Sequence[TimedText], limits: CueLimits = CueLimits()
) -> list[Cue]:
    """One cue per utterance when it fits the limits; a longer one is cut into several cues
    at word boundaries, their times interpolated by characters (an utterance carries no
    word times)."""
    cues: list[Cue] = []
    for utterance in utterances:
        words = utterance.text.split()
        total_chars = max(1, len(utterance.text))
        span = utterance.end_s - utterance.start_s
        pseudo: list[TimedText] = []
        position = 0
        for word in words:
            start = utterance.start_s + span * position / total_chars
            position += len(word) + 1
            end = utterance.start_s + span * min(position - 1, total_chars) / total_chars
            pseudo.append(TimedText(word, start, end, utterance.speaker))
        # Inside one utterance (one sentence: "Dr." must not cut it) only the layout and
        # duration limits cut it.
        inner = replace(limits, pause_s=float("inf"))
        pieces = cues_from_words(pseudo, inner, sentence_breaks=False)
        if pieces:  # the first and last cue keep the utterance's exact times
            pieces[0] = replace(pieces[0], start_s=_ms(utterance.start_s))
            pieces[-1] = replace(pieces[-1], end_s=_ms(utterance.end_s))
        cues.extend(pieces)
    return _in_time_order(cues)  # utterances may overlap


def _delta(seconds: float) -> timedelta:
    return timedelta(milliseconds=round(seconds * 1000))


def _vtt_time(seconds: float) -> str:
    total_ms = round(seconds * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, ms = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{ms:03d}"


def _srt_text(text: str) -> str:
    return _ARROW.sub("->", clean_text(text)).replace("<", "\u2039")


def to_srt(cues: Sequence[Cue]) -> str:
    """SubRip text; a speaker label starts the cue's first line (``speaker_0: ...``)."""
    subtitles = [
        srt.Subtitle(
            index=number,
            start=_delta(cue.start_s),
            end=_delta(cue.end_s),
            content="\n".join(_srt_text(line) for line in _labelled(cue)),
        )
        for number, cue in enumerate(cues, start=1)
    ]
    return str(srt.compose(subtitles, reindex=False))


def _labelled(cue: Cue) -> list[str]:
    lines = list(cue.lines)
    if cue.speaker:
        lines[0] = f"{cue.speaker}: {lines[0]}"
    return lines


def _vtt_text(text: str) -> str:
    # Escaping ">" too leaves no "-->" (which would end the cue's timing line early).
    return html.escape(clean_text(text), quote=False)


def to_vtt(cues: Sequence[Cue]) -> str:
    """WebVTT text; a speaker label is a voice span (``<v speaker_0>``), as the format
    intends, so players can style or hide it."""
    document = webvtt.WebVTT()
    for cue in cues:
        lines = [_vtt_text(line) for line in cue.lines]
        if cue.speaker:
            lines[0] = f"<v {_vtt_text(cue.speaker)}>{lines[0]}"
        document.captions.append(
            webvtt.Caption(_vtt_time(cue.start_s), _vtt_time(cue.end_s), lines)
        )
    return str(document.content)
