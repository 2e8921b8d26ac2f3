"""The service's JSON messages, checked field by field at the protocol boundary.

Pure: one text frame in, one value out (`Transcription`, `ServerError` or `Ignored`), or
`MalformedMessage`. Nothing the service sends reaches the tables unchecked. Per field:

- **Fail the session** (`InvalidField`, a `MalformedMessage`): the fields the transcript is
  made of. ``transcript``/``transcription`` not a string; ``is_final``/``is_last`` not a JSON
  boolean (the string ``"false"`` is not false); ``words``/``utterances`` not a list of
  objects; a word whose ``word`` is not a string (``null`` included); a word or utterance
  time that is not a finite number, is negative, or ends before it starts (1 ms of
  rounding is forgiven), or lies beyond `MAX_TIME_S`.
- **Coerce, and say so** (the field's name lands in ``Transcription.dropped``): metadata a
  transcript stays right without. ``confidence``/``speaker_confidence`` outside 0..1 or
  not a number become null; ``speaker`` that is neither an integer nor a string becomes
  null (integers become their text); ``language`` that is not a language tag (``5``,
  ``["en"]``) becomes null; entries of ``languages`` that are not strings are left out;
  a ``redacted_entities`` entry that is an object (an entity's type and place, say) is kept
  as its JSON text, and one that is neither string nor object is left out; a
  ``full_transcript`` or ``session_id`` of the wrong type becomes null. Text with lone
  surrogates (valid JSON, invalid UTF-8) gets U+FFFD in their place.
- **Ignore** (`Ignored`): events such as ``speech_started``/``speech_ended``, messages of a
  type we do not know that carry no transcript, and every unknown field.

Given a ``scrub`` function, every string of the decoded message (values and keys, at any
depth) goes through it before anything is read: a service that echoes the API key, however
its JSON escapes it (``\\u0073k...``, ``\\/``), leaves none in the value returned or in the
text of a `MalformedMessage`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

# Later than any recording could last (about 115 days): a time beyond it is garbage.
MAX_TIME_S: Final = 1e7
_ROUNDING_S: Final = 0.001
# Events the service interleaves with transcripts (``vad_events=true``) and keep-alives.
EVENT_TYPES: Final = frozenset(
    {"speech_started", "speech_ended", "utterance_end", "metadata", "ping", "pong", "keepalive"}
)
_TRANSCRIPT_KEYS: Final = ("transcript", "transcription", "is_final", "is_last")
_LANGUAGE_TAG: Final = re.compile(r"^[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8})*$")


@dataclass(frozen=True)
class Word:
    word: str
    start_s: float
    end_s: float
    confidence: float | None = None
    speaker: str | None = None
    speaker_confidence: float | None = None


@dataclass(frozen=True)
class Utterance:
    text: str
    start_s: float
    end_s: float
    speaker: str | None = None


@dataclass(frozen=True)
class ServerError:
    message: str
    code: str | None = None


@dataclass(frozen=True)
class Ignored:
    """A message the client has no use for (an event, an unknown type); ``kind`` names it."""

    kind: str


@dataclass(frozen=True)
class Transcription:
    session_id: str | None
    transcript: str
    is_final: bool
    is_last: bool
    language: str | None = None
    words: tuple[Word, ...] = ()
    utterances: tuple[Utterance, ...] = ()
    full_transcript: str | None = None
    languages: tuple[str, ...] = ()
    redacted_entities: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()  # fields whose odd values were coerced to null

    def without_speakers(self) -> Transcription:
        """Speakers removed: a session without ``diarize`` has no speaker to report."""
        words, utterances = self.words, self.utterances
        if all(w.speaker is None and w.speaker_confidence is None for w in words) and all(
            u.speaker is None for u in utterances
        ):
            return self  # nothing to remove (most messages): no copies
        return replace(
            self,
            words=tuple(replace(w, speaker=None, speaker_confidence=None) for w in self.words),
            utterances=tuple(replace(u, speaker=None) for u in self.utterances),
        )


class MalformedMessage(ValueError):
    """A text frame that is not a JSON object of a known shape."""


class InvalidField(MalformedMessage):
    """A field the transcript is built from has a value the protocol does not allow."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where


def _clean(text: str) -> str:
    # json.loads accepts lone surrogates ("\ud800"); Parquet's UTF-8 does not.
    if text.isascii():  # no surrogate in it: nothing to replace
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _text_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return _clean(value) if isinstance(value, str) else None


def _flag(data: Mapping[str, Any], name: str) -> bool:
    value = data.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidField(name, f"must be true or false, got {value!r}")
    return value


def _time(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(where, f"must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        raise InvalidField(where, "is too large to be a time") from None
    if not math.isfinite(seconds):
        raise InvalidField(where, f"must be finite, got {value!r}")
    if seconds < -_ROUNDING_S:
        raise InvalidField(where, f"must not be negative, got {value!r}")
    if seconds > MAX_TIME_S:
        raise InvalidField(where, f"is beyond any recording ({value!r} s)")
    return max(seconds, 0.0)


def _span(item: Mapping[str, Any], where: str) -> tuple[float, float]:
    start = _time(item.get("start"), f"{where}.start")
    end = _time(item.get("end"), f"{where}.end")
    if end < start - _ROUNDING_S:
        raise InvalidField(where, f"ends ({end:g} s) before it starts ({start:g} s)")
    return start, max(start, end)


class _Coercions:
    """Collects the names of fields whose values were replaced by null."""

    def __init__(self) -> None:
        self.names: list[str] = []

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(self.names)

    def note(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)

    def probability(self, value: Any, name: str) -> float | None:
        if value is None:
            return None
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and 0.0 <= value <= 1.0
        ):
            return float(value)
        self.note(name)
        return None

    def speaker(self, value: Any, name: str) -> str | None:
        # An integer on the reference page, a string in the SDK's types: keep text.
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        if isinstance(value, str) and value.strip():
            return _clean(value.strip())
        self.note(name)
        return None

    def language(self, value: Any, name: str = "language") -> str | None:
        if value is None:
            return None
        if isinstance(value, str) and _LANGUAGE_TAG.match(value):
            return value
        self.note(name)
        return None

    def strings(self, value: Any, name: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if not isinstance(value, list):
            self.note(name)
            return ()
        kept = tuple(_clean(v) for v in value if isinstance(v, str))
        if len(kept) != len(value):
            self.note(name)
        return kept

    def entities(self, value: Any, name: str) -> tuple[str, ...]:
        """Like `strings`, but an object entry is kept as its JSON text: what the service
        says about an entity is stored, not dropped."""
        if not isinstance(value, list):
            return self.strings(value, name)
        return self.strings(
            [json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for v in value], name
        )

    def text(self, value: Any, name: str) -> str | None:
        text = _text_or_none(value)
        if text is None and value is not None:
            self.note(name)
        return text


def _objects(data: Mapping[str, Any], name: str) -> list[Mapping[str, Any]]:
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidField(name, f"must be a list, got {type(value).__name__}")
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise InvalidField(f"{name}[{index}]", f"must be an object, got {item!r}")
    return value


def _word(item: Mapping[str, Any], index: int, fix: _Coercions) -> Word:
    text = item.get("word")
    if not isinstance(text, str):
        raise InvalidField(f"words[{index}].word", f"must be a string, got {text!r}")
    # The usual word (float times in order, a confidence in 0..1, no speaker) passes
    # straight through; anything else takes the checks that name the field.
    start, end = item.get("start"), item.get("end")
    if not (type(start) is float and type(end) is float and 0.0 <= start <= end <= MAX_TIME_S):
        start, end = _span(item, f"words[{index}]")
    confidence = item.get("confidence")
    if confidence is not None and not (type(confidence) is float and 0.0 <= confidence <= 1.0):
        confidence = fix.probability(confidence, "words.confidence")
    speaker = item.get("speaker")
    if speaker is not None:
        speaker = fix.speaker(speaker, "words.speaker")
    speaker_confidence = item.get("speaker_confidence")
    if speaker_confidence is not None:
        speaker_confidence = fix.probability(speaker_confidence, "words.speaker_confidence")
    return Word(_clean(text), start, end, confidence, speaker, speaker_confidence)


def _utterance(item: Mapping[str, Any], where: str, fix: _Coercions) -> Utterance:
    text = item.get("text")
    if text is not None and not isinstance(text, str):
        raise InvalidField(f"{where}.text", f"must be a string, got {text!r}")
    start, end = _span(item, where)
    return Utterance(
        text=_clean(text or ""),
        start_s=start,
        end_s=end,
        speaker=fix.speaker(item.get("speaker"), "utterances.speaker"),
    )


def _transcript_text(data: Mapping[str, Any]) -> str:
    # The newer paths repeat the text as ``transcription``; either may be the only one.
    for name in ("transcript", "transcription"):
        value = data.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise InvalidField(name, f"must be a string, got {value!r}")
        return _clean(value)
    return ""


def _error_in(data: Mapping[str, Any]) -> ServerError | None:
    """Every error shape the service has used: unified, older schema, top-level keys."""
    nested = data.get("error")
    if nested is False or nested == "":  # ``"error": false`` on a final says "no error"
        nested = None
    if data.get("type") == "error" or data.get("status") == "error" or nested is not None:
        if isinstance(nested, Mapping):
            message = nested.get("message") or json.dumps(nested)
            code = nested.get("code")
        else:
            message = data.get("message") or (nested if isinstance(nested, str) else None)
            code = data.get("code")
        return ServerError(
            _clean(str(message or "unspecified server error")),
            None if code is None else _clean(str(code)),
        )
    return None


def _ignorable(data: Mapping[str, Any]) -> str | None:
    """The kind of a message that carries nothing for the transcript, else None."""
    kind = data.get("type")
    if isinstance(kind, str) and kind in EVENT_TYPES:
        return kind
    if not any(key in data for key in _TRANSCRIPT_KEYS):
        return str(kind) if kind is not None else "untyped"
    return None


def scrub_strings(data: Any, scrub: Callable[[str], str]) -> Any:
    """``data`` (fresh from `json.loads`) with ``scrub`` applied to every string in it, keys
    included, in place. Iterative: as deep as the decoder allows, without recursion."""
    if isinstance(data, str):
        return scrub(data)
    stack = [data]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            entries = list(node.items())
            node.clear()
            for key, value in entries:
                node[scrub(key)] = scrub(value) if isinstance(value, str) else value
                if isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                if isinstance(value, str):
                    node[index] = scrub(value)
                elif isinstance(value, dict | list):
                    stack.append(value)
    return data


def parse_message(
    text: str | bytes, scrub: Callable[[str], str] | None = None
) -> Transcription | ServerError | Ignored:
    """Decode and check one server text frame (see the module docstring for the rules);
    ``scrub`` cleans every decoded string first.

    Raises `MalformedMessage` (or its `InvalidField`) for anything the transcript
    cannot be built from.
    """
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        # The decoder's message quotes no more than a position; nothing of the frame.
        raise MalformedMessage(f"not JSON: {exc}") from None
    if scrub is not None:
        data = scrub_strings(data, scrub)
    if not isinstance(data, dict):
        raise MalformedMessage("not a JSON object")
    error = _error_in(data)
    if error is not None:
        return error
    ignored = _ignorable(data)
    if ignored is not None:
        return Ignored(ignored)
    fix = _Coercions()
    session_id = data.get("session_id")
    if isinstance(session_id, int) and not isinstance(session_id, bool):
        session_id = str(session_id)
    return Transcription(
        session_id=fix.text(session_id, "session_id"),
        transcript=_transcript_text(data),
        is_final=_flag(data, "is_final"),
        is_last=_flag(data, "is_last"),
        language=fix.language(data.get("language")),
        words=tuple(_word(w, i, fix) for i, w in enumerate(_objects(data, "words"))),
        utterances=tuple(
            _utterance(u, f"utterances[{i}]", fix)
            for i, u in enumerate(_objects(data, "utterances"))
        ),
        full_transcript=fix.text(data.get("full_transcript"), "full_transcript"),
        languages=tuple(
            lang
            for lang in fix.strings(data.get("languages"), "languages")
            if fix.language(lang, "languages")
        ),
        redacted_entities=fix.entities(data.get("redacted_entities"), "redacted_entities"),
        dropped=fix.dropped,  # read last: every field above was coerced by then
    )
