"""Odd field values for the ``odd_values`` fault: valid JSON a careless client would store.

Each variant rewrites one final message (a plain dict, about to be sent) in place. Pure and
deterministic. ``fails`` says what a correct client does with it (`batch.pulse.responses`):
fail the session (``True``) or store the message with the odd value coerced to null or
replaced (``False``). Word-level variants need a final that has words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

Message = dict[str, Any]


@dataclass(frozen=True)
class OddValue:
    name: str
    fails: bool
    needs_words: bool
    apply: Callable[[Message], None]


def _first_word(field: str, value: Any) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        message["words"][0][field] = value

    return apply


def _top(field: str, value: Any) -> Callable[[Message], None]:
    def apply(message: Message) -> None:
        message[field] = value

    return apply


def _reversed(message: Message) -> None:
    word = message["words"][0]
    word["start"], word["end"] = float(word["end"]) + 1.0, float(word["start"])


def _surrogate(message: Message) -> None:
    # json.dumps writes it as the escape "\ud800": valid JSON, not valid UTF-8 text.
    message["transcript"] = f"{message.get('transcript', '')} \ud800".strip()
    if "transcription" in message:
        message["transcription"] = message["transcript"]


_CATALOG: Final = (
    OddValue("is_final_string", True, False, _top("is_final", "false")),
    OddValue("is_last_string", True, False, _top("is_last", "false")),
    OddValue("transcript_number", True, False, _top("transcript", 42)),
    OddValue("words_not_list", True, False, _top("words", "hello world")),
    OddValue("word_null", True, True, _first_word("word", None)),
    OddValue("time_nan", True, True, _first_word("start", float("nan"))),
    OddValue("time_inf", True, True, _first_word("end", float("inf"))),
    OddValue("time_negative", True, True, _first_word("start", -3.0)),
    OddValue("time_string", True, True, _first_word("start", "0.5")),
    OddValue("time_huge", True, True, _first_word("end", 10**400)),
    OddValue("time_reversed", True, True, _reversed),
    OddValue("confidence_above_1", False, True, _first_word("confidence", 7.5)),
    OddValue("confidence_negative", False, True, _first_word("confidence", -0.2)),
    OddValue("confidence_nan", False, True, _first_word("confidence", float("nan"))),
    OddValue("confidence_string", False, True, _first_word("confidence", "0.9")),
    OddValue("speaker_object", False, True, _first_word("speaker", {"id": 1})),
    OddValue("language_number", False, False, _top("language", 5)),
    OddValue("language_list", False, False, _top("language", ["en"])),
    OddValue("languages_mixed", False, False, _top("languages", ["en", 5, None])),
    OddValue("redacted_entities_number", False, False, _top("redacted_entities", 3)),
    OddValue("full_transcript_object", False, False, _top("full_transcript", {"a": 1})),
    OddValue("session_id_list", False, False, _top("session_id", ["x"])),
    OddValue("lone_surrogate", False, False, _surrogate),
)
ODD_VALUES: Final = {odd.name: odd for odd in _CATALOG}
