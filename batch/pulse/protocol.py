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
from enum import StrEnum
from typing import Final
from urllib.parse import urlsplit

LEGACY_PATH: Final = "/api/v1/pulse/get_text"
UNIFIED_PATH: Final = "/waves/v1/stt/live"
CURRENT_PATH: Final = "/waves/v1/pulse/get_text"
DEFAULT_URL: Final = "wss://waves-api.smallest.ai" + LEGACY_PATH


class Generation(StrEnum):
    """An endpoint generation: its path, how a stream ends, what it needs in the query.

    ``legacy`` is the reference page's ``/api/v1/pulse/get_text`` (ends on ``end``);
    ``unified`` is the SDK's ``/waves/v1/stt/live`` (needs ``model=pulse``, ends on
    ``close_stream``); ``current`` is today's API reference, ``/waves/v1/pulse/get_text``
    (ends on ``close_stream``).
    """

    LEGACY = "legacy"
    UNIFIED = "unified"
    CURRENT = "current"

    @property
    def path(self) -> str:
        return _PATHS[self]

    @property
    def end_type(self) -> str:
        return "end" if self is Generation.LEGACY else "close_stream"

    @property
    def has_finalize(self) -> bool:
        """``{"type": "finalize"}`` flushes the buffer into a final, session kept open."""
        return self is not Generation.LEGACY

    @property
    def needs_model(self) -> bool:
        return self is Generation.UNIFIED

    @property
    def takes_newer_options(self) -> bool:
        """The newer paths document tuning knobs (``punctuate``, ``vad_events``, ...)."""
        return self is not Generation.LEGACY

    @classmethod
    def for_path(cls, path: str) -> Generation | None:
        """The generation whose path ``path`` ends with (a proxy may add a prefix)."""
        trimmed = path.rstrip("/")
        return next((g for g in cls if trimmed.endswith(g.path)), None)


_PATHS: Final = {
    Generation.LEGACY: LEGACY_PATH,
    Generation.UNIFIED: UNIFIED_PATH,
    Generation.CURRENT: CURRENT_PATH,
}
KNOWN_PATHS: Final = tuple(_PATHS.values())


class UnknownEndpointPath(ValueError):
    """An endpoint URL whose path is none of the known generations' (and none was forced)."""


def generation_for(url: str, forced: str = "auto") -> Generation:
    """``forced`` is ``auto`` (the URL's path decides) or a `Generation` value.

    Raises `UnknownEndpointPath` naming the known paths when ``auto`` cannot decide.
    """
    if forced != "auto":
        return Generation(forced)
    path = urlsplit(url).path
    generation = Generation.for_path(path)
    if generation is None:
        raise UnknownEndpointPath(
            f"{path or '/'!r} is not a known Pulse endpoint path; use one of "
            f"{', '.join(KNOWN_PATHS)}, or set pulse.protocol to "
            f"{' / '.join(g.value for g in Generation)}"
        )
    return generation


LANGUAGES: Final = (
    "it", "es", "en", "pt", "hi", "de", "fr", "uk", "ru", "kn", "ml", "pl", "mr", "gu", "cs",
    "sk", "te", "or", "nl", "bn", "lv", "et", "ro", "pa", "fi", "sv", "bg", "ta", "hu", "da",
    "lt", "mt", "multi", "ja", "zh", "ko", "yue", "multi-asian",
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
# Knobs the newer paths document; validated when present, never required.
NEWER_BOOLEAN_OPTIONS: Final = (
    "punctuate",
    "capitalize",
    "itn_normalize",
    "vad",
    "vad_events",
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


# Every option the manifest names: `pulse.extra_params` may not set these (nor the key).
NAMED_OPTIONS: Final = (
    "model",
    "language",
    "encoding",
    "sample_rate",
    "word_timestamps",
    "full_transcript",
    "sentence_timestamps",
    "redact_pii",
    "redact_pci",
    "numerals",
    "keywords",
    "diarize",
)


def build_query(
    options: PulseOptions, generation: Generation = Generation.LEGACY
) -> dict[str, str]:
    """Every option explicitly, as the strings the wire carries.

    Defaults differ between endpoint generations, so nothing is left implicit.
    ``keywords`` uses the reference page's spelling (a JSON array string). Extra
    parameters come last and never replace a named option.
    """
    query: dict[str, str] = {}
    if generation.needs_model:
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
    query.update({k: v for k, v in options.extra.items() if k not in NAMED_OPTIONS})
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


def parse_query(
    params: Mapping[str, Sequence[str]], generation: Generation = Generation.LEGACY
) -> PulseOptions:
    """Validate a handshake's query parameters; raises `ParamError` naming the first bad one.

    Unknown parameters are ignored (the service's SDK sends tuning knobs we do not model).
    """
    defaults = PulseOptions()
    extra: dict[str, str] = {}
    model = _single(params, "model")
    if generation.needs_model and model is None:
        raise ParamError("model", f"required on {generation.path}; use one of {UNIFIED_MODELS}")
    if model is not None and model not in UNIFIED_MODELS:
        raise ParamError("model", f"{model!r} is not one of {UNIFIED_MODELS}")
    if generation.takes_newer_options:
        for name in NEWER_BOOLEAN_OPTIONS:
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
    if generation.takes_newer_options and _single(params, "word_timestamps") is None:
        flags["word_timestamps"] = False  # the newer paths' documented default
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


def end_message(generation: Generation) -> str:
    """The control message that ends a stream on this generation's path."""
    return json.dumps({"type": generation.end_type})


def finalize_message() -> str:
    """The control message that flushes the current buffer and keeps the session open."""
    return json.dumps({"type": "finalize"})


# --- responses: checked field by field in `batch.pulse.responses` -----------------

from batch.pulse.responses import (  # noqa: E402  (one import path for both sides)
    Ignored,
    InvalidField,
    MalformedMessage,
    ServerError,
    Transcription,
    Utterance,
    Word,
    parse_message,
)

__all__ = [
    "CURRENT_PATH",
    "DEFAULT_URL",
    "KNOWN_PATHS",
    "LANGUAGES",
    "LEGACY_PATH",
    "UNIFIED_PATH",
    "Generation",
    "Ignored",
    "InvalidField",
    "MalformedMessage",
    "ParamError",
    "PulseOptions",
    "ServerError",
    "Transcription",
    "Utterance",
    "Word",
    "build_query",
    "end_message",
    "finalize_message",
    "parse_message",
    "parse_query",
]
