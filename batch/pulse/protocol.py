"""The Pulse streaming protocol as plain data: options, query strings, messages.

Pure functions only (no sockets), shared by the client (`batch.session`) and the
local server (`batch.server`), so both sides agree on what is valid by construction.
See ``shared/pulse/`` for the vendor's reference page and our notes on the SDK.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

LEGACY_PATH: Final = "/api/v1/pulse/get_text"
UNIFIED_PATH: Final = "/waves/v1/stt/live"
DEFAULT_URL: Final = "wss://waves-api.smallest.ai" + LEGACY_PATH

LANGUAGES: Final = (
    "it", "es", "en", "pt", "hi", "de", "fr", "uk", "ru", "kn", "ml", "pl", "mr", "gu", "cs",
    "sk", "te", "or", "nl", "bn", "lv", "et", "ro", "pa", "fi", "sv", "bg", "ta", "hu", "da",
    "lt", "mt", "multi",
)  # fmt: skip
ENCODINGS: Final = ("linear16", "linear32", "alaw", "mulaw", "opus", "ogg_opus")
SAMPLE_RATES: Final = (8000, 16000, 22050, 24000, 44100, 48000)
NUMERALS: Final = ("true", "false", "auto")
BOOLEAN_OPTIONS: Final = (
    "word_timestamps",
    "full_transcript",
    "sentence_timestamps",
    "redact_pii",
    "redact_pci",
    "diarize",
)
# Extra knobs the unified path documents; validated when present, never required.
UNIFIED_BOOLEAN_OPTIONS: Final = (
    "punctuate",
    "capitalize",
    "itn_normalize",
    "vad",
    "finalize_on_words",
    "emotion_detection",
    "gender_detection",
)
UNIFIED_MODELS: Final = ("pulse", "pulse-pro")

# Bytes per sample of each PCM wire encoding (opus kinds are framed, not per-sample).
PCM_SAMPLE_BYTES: Final = {"linear16": 2, "linear32": 4, "mulaw": 1, "alaw": 1}
# Opus codes only these rates. ``opus``: one Opus packet per binary message;
# ``ogg_opus``: an Ogg Opus stream cut into messages anywhere.
OPUS_ENCODINGS: Final = ("opus", "ogg_opus")
OPUS_SAMPLE_RATES: Final = (8000, 12000, 16000, 24000, 48000)
OPUS_FRAME_S: Final = 0.02


class ParamError(ValueError):
    """A query parameter has a value the protocol does not allow."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"invalid query parameter {name!r}: {message}")
        self.name = name


@dataclass(frozen=True)
class PulseOptions:
    """Session options, with the reference page's defaults."""

    language: str = "en"
    encoding: str = "linear16"
    sample_rate: int = 16000
    word_timestamps: bool = True
    full_transcript: bool = False
    sentence_timestamps: bool = False
    redact_pii: bool = False
    redact_pci: bool = False
    numerals: str = "auto"
    keywords: tuple[str, ...] = ()
    diarize: bool = False
    # Unified-path extras, sent only when set.
    extra: Mapping[str, str] = field(default_factory=dict)


def _bool_text(value: bool) -> str:
    return "true" if value else "false"


def build_query(options: PulseOptions, *, unified: bool = False) -> dict[str, str]:
    """Every option explicitly, as the strings the wire carries.

    Defaults differ between endpoint generations, so nothing is left implicit.
    ``keywords`` uses the reference page's spelling (a JSON array string).
    """
    query: dict[str, str] = {}
    if unified:
        query["model"] = "pulse"
    query.update(
        {
            "language": options.language,
            "encoding": options.encoding,
            "sample_rate": str(options.sample_rate),
            "word_timestamps": _bool_text(options.word_timestamps),
            "full_transcript": _bool_text(options.full_transcript),
            "sentence_timestamps": _bool_text(options.sentence_timestamps),
            "redact_pii": _bool_text(options.redact_pii),
            "redact_pci": _bool_text(options.redact_pci),
            "numerals": options.numerals,
            "diarize": _bool_text(options.diarize),
        }
    )
    if options.keywords:
        query["keywords"] = json.dumps(list(options.keywords))
    query.update(options.extra)
    return query


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise ParamError(name, f"expected true or false, got {value!r}")


def validate_keyword(keyword: str, name: str = "keywords") -> str:
    """``word:weight`` with a positive finite weight; returns it stripped."""
    word, sep, weight_text = keyword.strip().rpartition(":")
    if not sep or not word.strip():
        raise ParamError(name, f"each keyword must look like 'word:5.0', got {keyword!r}")
    try:
        weight = float(weight_text)
    except ValueError:
        raise ParamError(name, f"weight of {keyword!r} is not a number") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ParamError(name, f"weight of {keyword!r} must be a positive number")
    return keyword.strip()


def parse_keywords(value: str) -> tuple[str, ...]:
    """Both spellings: a JSON array string (reference page) or comma-joined (the SDK)."""
    text = value.strip()
    # The reference page's own example sends keywords=auto (and "None" when unset).
    if not text or text.lower() in ("auto", "none", "null"):
        return ()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            raise ParamError("keywords", "not a valid JSON array") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ParamError("keywords", "JSON form must be an array of strings")
    else:
        items = [part for part in text.split(",") if part.strip()]
    return tuple(validate_keyword(item) for item in items)


def _single(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ParamError(name, "given more than once")
    return values[0]


def parse_query(params: Mapping[str, Sequence[str]], *, unified: bool = False) -> PulseOptions:
    """Validate a handshake's query parameters; raises `ParamError` naming the first bad one.

    Unknown parameters are ignored (the service's SDK sends tuning knobs we do not model).
    """
    defaults = PulseOptions()
    extra: dict[str, str] = {}
    if unified:
        model = _single(params, "model")
        if model is None:
            raise ParamError("model", f"required on {UNIFIED_PATH}; use one of {UNIFIED_MODELS}")
        if model not in UNIFIED_MODELS:
            raise ParamError("model", f"{model!r} is not one of {UNIFIED_MODELS}")
        for name in UNIFIED_BOOLEAN_OPTIONS:
            raw = _single(params, name)
            if raw is not None:
                extra[name] = _bool_text(parse_bool(name, raw))
        eou = _single(params, "eou_timeout_ms")
        if eou is not None and not eou.isdigit():
            raise ParamError("eou_timeout_ms", f"expected a whole number of ms, got {eou!r}")

    language = _single(params, "language") or defaults.language
    if language not in LANGUAGES:
        raise ParamError("language", f"{language!r} is not supported; use one of {LANGUAGES}")
    encoding = _single(params, "encoding") or defaults.encoding
    if encoding not in ENCODINGS:
        raise ParamError("encoding", f"{encoding!r} is not one of {ENCODINGS}")
    rate_text = _single(params, "sample_rate") or str(defaults.sample_rate)
    if not rate_text.isdigit() or int(rate_text) not in SAMPLE_RATES:
        raise ParamError("sample_rate", f"{rate_text!r} is not one of {SAMPLE_RATES}")
    if encoding in OPUS_ENCODINGS and int(rate_text) not in OPUS_SAMPLE_RATES:
        raise ParamError(
            "sample_rate",
            f"{encoding} needs one of {tuple(r for r in SAMPLE_RATES if r in OPUS_SAMPLE_RATES)}",
        )
    numerals = (_single(params, "numerals") or defaults.numerals).lower()
    if numerals not in NUMERALS:
        raise ParamError("numerals", f"{numerals!r} is not one of {NUMERALS}")
    flags = {}
    for name in BOOLEAN_OPTIONS:
        raw = _single(params, name)
        flags[name] = getattr(defaults, name) if raw is None else parse_bool(name, raw)
    if unified and _single(params, "word_timestamps") is None:
        flags["word_timestamps"] = False  # the unified path's documented default
    keywords = parse_keywords(_single(params, "keywords") or "")
    return PulseOptions(
        language=language,
        encoding=encoding,
        sample_rate=int(rate_text),
        numerals=numerals,
        keywords=keywords,
        extra=extra,
        **flags,
    )


END_MESSAGES: Final = {LEGACY_PATH: {"type": "end"}, UNIFIED_PATH: {"type": "close_stream"}}


def end_message(unified: bool) -> str:
    return json.dumps(END_MESSAGES[UNIFIED_PATH if unified else LEGACY_PATH])


# --- responses -------------------------------------------------------------------


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
class Transcription:
    session_id: str | None
    transcript: str
    is_final: bool
    is_last: bool
    language: str | None = None
    words: tuple[Word, ...] = ()
    utterances: tuple[Utterance, ...] = ()
    full_transcript: str | None = None


class MalformedMessage(ValueError):
    """A text frame that is not a JSON object of a known shape."""


def _speaker(value: Any) -> str | None:
    # An integer on the reference page, a string in the SDK's types: keep text.
    return None if value is None else str(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _parse_word(item: Mapping[str, Any]) -> Word:
    return Word(
        word=str(item["word"]),
        start_s=float(item["start"]),
        end_s=float(item["end"]),
        confidence=_float_or_none(item.get("confidence")),
        speaker=_speaker(item.get("speaker")),
        speaker_confidence=_float_or_none(item.get("speaker_confidence")),
    )


def _parse_utterance(item: Mapping[str, Any]) -> Utterance:
    return Utterance(
        text=str(item.get("text", "")),
        start_s=float(item["start"]),
        end_s=float(item["end"]),
        speaker=_speaker(item.get("speaker")),
    )


def _error_in(data: Mapping[str, Any]) -> ServerError | None:
    """Every error shape the service has used: unified, older schema, top-level keys."""
    nested = data.get("error")
    if data.get("type") == "error" or data.get("status") == "error" or nested is not None:
        if isinstance(nested, Mapping):
            message = nested.get("message") or json.dumps(nested)
            code = nested.get("code")
        else:
            message = data.get("message") or (nested if isinstance(nested, str) else None)
            code = data.get("code")
        return ServerError(
            str(message or "unspecified server error"), None if code is None else str(code)
        )
    return None


def parse_message(text: str | bytes) -> Transcription | ServerError:
    """Decode one server text frame; raises `MalformedMessage` for anything unparseable."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage("not a JSON object")
    error = _error_in(data)
    if error is not None:
        return error
    try:
        transcript = data.get("transcript", data.get("transcription", "")) or ""
        return Transcription(
            session_id=None if data.get("session_id") is None else str(data["session_id"]),
            transcript=str(transcript),
            is_final=bool(data.get("is_final", False)),
            is_last=bool(data.get("is_last", False)),
            language=data.get("language"),
            words=tuple(_parse_word(w) for w in data.get("words") or ()),
            utterances=tuple(_parse_utterance(u) for u in data.get("utterances") or ()),
            full_transcript=data.get("full_transcript"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedMessage(f"unexpected shape: {exc!r}") from None
