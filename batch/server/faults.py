"""Fault injection for the local server: what to break, how often, decided up front.

Every handshake that passes path, key and parameter checks gets the next *session
index* (0, 1, 2, ... in arrival order). Its fault is drawn from
``random.Random(f"{seed}:{index}")``, so a run is reproducible from the seed alone,
however the sessions interleave. The kinds, and what a client observes:

============  ===============================================================
refuse_429    HTTP 429 before the upgrade, with a ``Retry-After`` header.
refuse_5xx    HTTP ``refuse_5xx_status`` (default 503) before the upgrade.
drop          the TCP connection is aborted mid-stream: no close frame (1006),
              no ``is_last``.
error         an error message ``{"type": "error", ...}``, then close 1011.
malformed     one non-JSON text frame; the session then carries on and
              completes normally (``is_last``, close 1000).
stall         the server stops sending: no more transcripts, no ``is_last``;
              the socket stays open until the client gives up.
early_last    the server ends the session early: finals for what it has, ``is_last``
              and close 1000 while the client is still sending (a truncated result).
late_1008     at the end signal, after finals for what it heard: close 1008 (policy,
              the code the service uses for too many sessions) with no ``is_last``.
odd_values    the next final (with words, for word-level variants) carries one odd
              field value (`batch.server.odd`): NaN or reversed times, ``"word":
              null``, ``"is_final": "false"``, ``"language": 5``, ... The variant is
              drawn per session from ``odd_value_kinds`` (empty: all of them).
silent        ``stall_after_s`` (not a rate: every session the draw leaves unfaulted,
              up to ``fault_limit``): after that much audio the server sends nothing
              more, not even for ``finalize`` or the end signal, while it keeps reading
              (and counting, in its stats) the audio; it never closes.
============  ===============================================================

Mid-stream kinds fire once the session has received ``trigger_s`` seconds of audio
(drawn uniformly in ``[0, fault_at_max_s]``), or at the end signal if the audio is
shorter, so every faulted session is observably faulted. ``fault_limit`` caps the
number of faulted sessions in total so that retries eventually succeed.
``max_sessions`` is not a fault but a real concurrency limit (429 beyond it).

``reply_latency_s`` is not a fault either: the upgrade and every message the server sends
wait that long first (in order), as a distant service's would.

Two settings change how refusals and errors look rather than how often they happen, to
test a client's bounds: ``retry_after_header`` sends its text as the 429s' ``Retry-After``
verbatim (``inf``, ``1e8``, ``soon``, an HTTP date ...), and ``echo_authorization`` makes
every refusal body (401, 429, 5xx), error message and close reason repeat the request's
``Authorization`` header, as a careless proxy would.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from batch.server.odd import ODD_VALUES


class FaultKind(StrEnum):
    REFUSE_429 = "refuse_429"
    REFUSE_5XX = "refuse_5xx"
    DROP = "drop"
    ERROR = "error"
    MALFORMED = "malformed"
    STALL = "stall"
    EARLY_LAST = "early_last"
    ODD_VALUES = "odd_values"
    LATE_1008 = "late_1008"
    SILENT = "silent"

    @property
    def at_handshake(self) -> bool:
        return self in (FaultKind.REFUSE_429, FaultKind.REFUSE_5XX)


class FaultConfigError(ValueError):
    """A fault configuration (file, mapping or flags) that cannot be used."""


@dataclass(frozen=True)
class FaultConfig:
    """Which faults to inject and how often; all rates are per-session probabilities.

    The rates are mutually exclusive outcomes of one draw, so their sum must be <= 1.
    """

    seed: int = 0
    refuse_429_rate: float = 0.0
    retry_after_s: float = 1.0
    refuse_5xx_rate: float = 0.0
    refuse_5xx_status: int = 503
    drop_rate: float = 0.0
    error_rate: float = 0.0
    malformed_rate: float = 0.0
    stall_rate: float = 0.0
    early_last_rate: float = 0.0
    odd_values_rate: float = 0.0
    late_1008_rate: float = 0.0
    odd_value_kinds: tuple[str, ...] = ()
    max_sessions: int | None = None
    fault_limit: int | None = None
    fault_at_max_s: float = 2.0
    retry_after_header: str | None = None
    echo_authorization: bool = False
    stall_after_s: float | None = None
    reply_latency_s: float = 0.0  # not a fault: every reply (and the upgrade) waits this

    def __post_init__(self) -> None:
        rates = self.rates()
        for kind, rate in rates.items():
            if not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
                raise FaultConfigError(f"{kind}_rate must be a number in [0, 1], got {rate!r}")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise FaultConfigError("fault rates must add up to at most 1")
        if not isinstance(self.seed, int):
            raise FaultConfigError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.retry_after_s, int | float) or self.retry_after_s < 0:
            raise FaultConfigError(f"retry_after_s must be >= 0, got {self.retry_after_s!r}")
        if not isinstance(self.refuse_5xx_status, int) or not 500 <= self.refuse_5xx_status <= 599:
            raise FaultConfigError(
                f"refuse_5xx_status must be in 500..599, got {self.refuse_5xx_status!r}"
            )
        for name in ("max_sessions", "fault_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise FaultConfigError(f"{name} must be a whole number >= 0, got {value!r}")
        if not isinstance(self.fault_at_max_s, int | float) or self.fault_at_max_s < 0:
            raise FaultConfigError(f"fault_at_max_s must be >= 0, got {self.fault_at_max_s!r}")
        latency = self.reply_latency_s
        if not isinstance(latency, int | float) or not 0 <= latency <= 60:
            raise FaultConfigError(f"reply_latency_s must be 0-60 seconds, got {latency!r}")
        after = self.stall_after_s
        if after is not None and (not isinstance(after, int | float) or after < 0):
            raise FaultConfigError(f"stall_after_s must be >= 0 seconds, got {after!r}")
        header = self.retry_after_header
        if header is not None and (not isinstance(header, str) or "\n" in header or "\r" in header):
            raise FaultConfigError(f"retry_after_header must be one line of text, got {header!r}")
        if not isinstance(self.echo_authorization, bool):
            raise FaultConfigError(
                f"echo_authorization must be true or false, got {self.echo_authorization!r}"
            )
        kinds = self.odd_value_kinds
        if isinstance(kinds, str) or not isinstance(kinds, list | tuple):
            raise FaultConfigError(f"odd_value_kinds must be a list, got {kinds!r}")
        unknown = sorted(set(kinds) - set(ODD_VALUES))
        if unknown:
            raise FaultConfigError(f"unknown odd_value_kinds {unknown}; known: {list(ODD_VALUES)}")
        object.__setattr__(self, "odd_value_kinds", tuple(kinds))  # YAML gives a list

    def rates(self) -> dict[FaultKind, float]:
        """Each kind's rate, in the fixed order the draw walks them."""
        return {
            FaultKind.REFUSE_429: self.refuse_429_rate,
            FaultKind.REFUSE_5XX: self.refuse_5xx_rate,
            FaultKind.DROP: self.drop_rate,
            FaultKind.ERROR: self.error_rate,
            FaultKind.MALFORMED: self.malformed_rate,
            FaultKind.STALL: self.stall_rate,
            FaultKind.EARLY_LAST: self.early_last_rate,
            FaultKind.ODD_VALUES: self.odd_values_rate,
            FaultKind.LATE_1008: self.late_1008_rate,
        }

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> FaultConfig:
        """Build from plain data; raises `FaultConfigError` naming an unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise FaultConfigError(f"unknown fault setting(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | Path) -> FaultConfig:
        """Load a YAML or JSON file holding one mapping of the fields above."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            data = yaml.safe_load(text) if Path(path).suffix != ".json" else json.loads(text)
        except (OSError, yaml.YAMLError, json.JSONDecodeError) as exc:
            raise FaultConfigError(f"cannot read fault config {str(path)!r}: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise FaultConfigError(f"fault config {str(path)!r} must hold a mapping")
        return cls.from_mapping(data)


@dataclass(frozen=True)
class FaultDraw:
    """One session's fault: its kind and, for mid-stream kinds, when it fires."""

    kind: FaultKind
    trigger_s: float = 0.0
    odd_value: str | None = None  # for odd_values: the variant (a key of ODD_VALUES)


def draw_fault(config: FaultConfig, session_index: int) -> FaultDraw | None:
    """The fault (or None) for the session with this index; pure and deterministic.

    ``fault_limit`` is not applied here: it depends on history, so the server does it.
    """
    rng = random.Random(f"{config.seed}:{session_index}")
    roll = rng.random()
    trigger_s = rng.uniform(0.0, config.fault_at_max_s)
    odd_value = rng.choice(config.odd_value_kinds or tuple(ODD_VALUES))
    cumulative = 0.0
    for kind, rate in config.rates().items():
        cumulative += rate
        if rate > 0 and roll < cumulative:
            if kind is FaultKind.ODD_VALUES:
                return FaultDraw(kind, trigger_s, odd_value)
            return FaultDraw(kind, 0.0 if kind.at_handshake else trigger_s)
    if config.stall_after_s is not None:
        return FaultDraw(FaultKind.SILENT, float(config.stall_after_s))
    return None
