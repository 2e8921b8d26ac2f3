"""One Pulse session's protocol as a state machine: no socket, no clock, no task in it.

As websockets keeps its protocol in ``protocol.py`` under thin I/O layers, `SessionMachine`
decides what a session decides, and `batch.session` only moves bytes. The shell tells it what
it sent (`begin_audio`, `sent`, `finalize`, `ended`), hands it every message the service
sends (`receive`, with the time), and asks it what to send and when to wake:

- **finals**: which messages are kept (finals with text or words), the languages and the
  latest ``full_transcript``, the session id; ``is_last`` completes the session, and before
  the end signal it is a protocol error (the rest of the audio would be lost);
- **the final wait**: once the end signal is sent, each message must come within
  ``final_timeout_s`` (`receive_deadline`);
- **the session deadline**, growing with the audio sent (`session_deadline`);
- **the reply budget** (`batch.pulse.bounds`), error messages from the service, odd frames:
  raised as `batch.errors` types with scrubbed text;
- **liveness** (`batch.pulse.liveness`): unanswered speech makes `must_hold` true; `hold`
  gives the probe and starts the answer wait; no answer by `answer_deadline` is `stalled`;
- **reuse** (`batch.pulse.reuse`): each ``finalize`` starts a unit; a final of a later unit
  (or ``is_last``) shows the earlier ones complete: `UnitFinalised` with its finals on the
  unit's own time base;
- whether the service **took audio**, so a close for concurrency after that is a failed
  attempt, not a refusal (`took_audio`).

Times are seconds on one monotonic clock the shell chooses (the event loop's); audio
positions are seconds of audio sent. Per chunk the machine does a few additions and
comparisons and allocates nothing (`sent`, `must_hold`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from batch.credentials import Scrubber
from batch.errors import ProtocolViolation, ServerReported, SessionStalled, SessionTimeout
from batch.pulse import protocol
from batch.pulse.bounds import DEFAULT_BOUNDS, ReplyBounds, ReplyMeter
from batch.pulse.liveness import DEFAULT_POLICY, Liveness, LivenessPolicy, probe_message
from batch.pulse.reuse import Span, owner, shifted

logger = logging.getLogger(__name__)

# A service at its concurrency limit refuses a session as it opens (close 1008 at once).
# A 1008 later than this, with audio read all along, ends a session the service took: a
# failed attempt that counts against max_attempts, or a file could be streamed forever.
REFUSAL_WINDOW_S: Final = 2.0


@dataclass(frozen=True)
class Timeouts:
    """Every wait of a session, named, in seconds."""

    connect_timeout_s: float = 10.0
    final_timeout_s: float = 30.0  # for each message once the end signal is sent
    session_deadline_s: float = 600.0  # the whole session, scaled to the audio by the caller
    # The deadline grows with the audio actually sent, to at least start + this x the audio
    # seconds sent + the slack: a file longer than its header said (a VBR MP3 without a
    # Xing header probes short) is never timed out for that. 0: the deadline is fixed.
    deadline_per_audio_s: float = 0.0
    deadline_slack_s: float = 0.0
    # Each send (an audio chunk, the end signal) must be taken by the peer within this: a
    # peer that stops reading fills the socket's buffers, and a send then waits forever.
    write_timeout_s: float = 30.0
    liveness: LivenessPolicy = DEFAULT_POLICY  # when a silent service is stalled

    def grown_deadline_s(self, audio_sent_s: float) -> float:
        """The session deadline (seconds from its start) once ``audio_sent_s`` was sent."""
        if self.deadline_per_audio_s <= 0:
            return self.session_deadline_s
        grown = audio_sent_s * self.deadline_per_audio_s + self.deadline_slack_s
        return max(self.session_deadline_s, grown)


DEFAULT_TIMEOUTS: Final = Timeouts()


@dataclass
class SessionResult:
    """What one complete session (ended by ``is_last``) produced, plus its timings."""

    session_id: str | None = None
    finals: list[protocol.Transcription] = field(default_factory=list)
    connect_s: float = 0.0
    first_final_s: float | None = None  # from the first audio byte sent
    end_to_last_s: float = 0.0  # from the end signal to ``is_last``
    busy_s: float = 0.0  # socket open time

    # Every language reported on a final (first-seen order) and the service's own
    # cumulative transcript, from every final, empty ones (the terminal one) included.
    languages: list[str] = field(default_factory=list)
    full_transcript: str | None = None

    @property
    def language(self) -> str | None:
        return next((f.language for f in reversed(self.finals) if f.language), None)

    def note_final(self, message: protocol.Transcription) -> None:
        for language in (message.language, *message.languages):
            if language and language not in self.languages:
                self.languages.append(language)
        if message.full_transcript is not None:
            self.full_transcript = message.full_transcript


class Event:
    """Something a message made happen that the shell acts on."""


class _Named(Event):
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


COMPLETED: Final = _Named("COMPLETED")  # ``is_last``: the session is over, and it worked
ANSWERED: Final = _Named("ANSWERED")  # an answer while holding: the sender may feed again


@dataclass(frozen=True)
class UnitFinalised(Event):
    """Unit ``index`` of a reused session is complete: its finals, on its own time base."""

    index: int
    finals: list[protocol.Transcription]


_NOTHING: Final[tuple[Event, ...]] = ()


class SessionMachine:
    """One session's protocol state; see the module docstring. ``now`` is when it opened.

    ``units``: attribute finals to the units ``finalize`` separates (a reused session).
    ``result`` is filled in place (a failed session's finals stay in it).
    """

    def __init__(
        self,
        generation: protocol.Generation,
        options: protocol.PulseOptions,
        now: float,
        *,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        bounds: ReplyBounds = DEFAULT_BOUNDS,
        scrubber: Scrubber | None = None,
        result: SessionResult | None = None,
        units: bool = False,
        label: str = "a session",
    ) -> None:
        self.generation = generation
        self.timeouts = timeouts
        self.scrubber = scrubber or Scrubber()
        self.result = result if result is not None else SessionResult()
        self.label = label  # what is streamed, for log lines
        self._diarize = options.diarize
        self.began = now
        self.started_at: float | None = None  # the first audio sent
        self.end_sent_at: float | None = None
        self.complete = False
        self.audio_sent_s = 0.0
        self.heard = False  # the service sent words: it took audio
        self.meter = ReplyMeter(bounds)
        self._full_chars = 0  # the latest full_transcript's length
        self._warned: set[str] = set()
        self._last_message_at = now
        # Liveness: off where silence cannot be told from speech and nothing can be probed
        # (Opus on the legacy path): a healthy service answering only speech would stall.
        self.probe = probe_message(generation)
        policy = timeouts.liveness
        measurable = options.encoding in protocol.PCM_SAMPLE_BYTES
        self.watches_liveness = policy.enabled and (measurable or self.probe is not None)
        self.liveness = Liveness(policy)
        self._hold_at_s = policy.unanswered_speech_s
        self.answer_deadline = math.inf  # while holding: when no answer means stalled
        self._probed = False
        self._held: tuple[float, float] = (0.0, 0.0)  # speech and audio unanswered at hold
        # Reuse: where each unit's audio starts, the unit of the latest final, units handed.
        self._units = units
        self._spans: list[Span] = [Span(0.0, math.inf)]
        self._unit_finals: list[list[protocol.Transcription]] = [[]]
        self._owner = 0
        self._handed = 0

    # --- what the shell sent ------------------------------------------------------------

    def begin_audio(self, now: float) -> None:
        """The first chunk goes out now: the origin of ``first_final_s`` and the refusal
        window."""
        if self.started_at is None:
            self.started_at = now

    def sent(self, position_s: float, speech_s: float | None) -> None:
        """A chunk was sent: ``position_s`` is the audio sent so far, ``speech_s`` the
        speech the gauge heard in it (None: not measured, counted in full)."""
        if self.watches_liveness:
            self.liveness.fed(position_s - self.audio_sent_s, speech_s)
        self.audio_sent_s = position_s

    @property
    def must_hold(self) -> bool:
        """Send no more audio now: too much speech went unanswered (call `hold`)."""
        return self.watches_liveness and self.liveness.unanswered_speech_s >= self._hold_at_s

    def finalize(self) -> str:
        """The message that ends a unit of a reused session (the session stays open); the
        next unit starts at the audio sent so far."""
        if self._units:
            self._spans.append(Span(self.audio_sent_s, math.inf))
            self._unit_finals.append([])
        return protocol.finalize_message()

    def end_signal(self) -> str:
        """The end-of-audio message of this endpoint's generation (send it, then `ended`)."""
        return protocol.end_message(self.generation)

    def ended(self, now: float) -> None:
        """The end signal was sent: from now each message must come in ``final_timeout_s``."""
        self.end_sent_at = self._last_message_at = now

    @property
    def end_sent(self) -> bool:
        return self.end_sent_at is not None

    # --- liveness -----------------------------------------------------------------------

    def hold(self, now: float) -> str | None:
        """Audio is held (`must_hold`): the answer wait starts now. Returns the probe to
        send (None: this endpoint has none)."""
        self._held = (self.liveness.unanswered_speech_s, self.liveness.unanswered_audio_s)
        self.answer_deadline = now + self.liveness.policy.answer_wait_s
        self._probed = self.probe is not None
        return self.probe

    def stalled(self) -> SessionStalled | None:
        """After the answer wait: the error when no answer came (still holding)."""
        if not self.must_hold:
            return None
        speech_s, audio_s = self._held
        wait_s = self.liveness.policy.answer_wait_s
        return SessionStalled(speech_s, audio_s, wait_s, probed=self.probe is not None)

    def _answered(self, message: protocol.Transcription) -> Event | None:
        """Words answer; so does any final once probed (a live service flushes an empty
        buffer into an empty final). Empty messages otherwise do not: a service that sends
        them to speech transcribes nothing."""
        if message.transcript or message.words or (message.is_final and self._probed):
            self._probed = False
            self.liveness.answered()
            if self.answer_deadline < math.inf:
                self.answer_deadline = math.inf
                return ANSWERED
        return None

    # --- deadlines ----------------------------------------------------------------------

    @property
    def receive_deadline(self) -> float:
        """When the next message must have come: once the end signal is sent, the last
        message (or the signal) plus ``final_timeout_s``; before it, never."""
        if self.end_sent_at is None:
            return math.inf
        return self._last_message_at + self.timeouts.final_timeout_s

    @property
    def session_deadline(self) -> float:
        """When the whole session must be over, grown with the audio sent."""
        return self.began + self.timeouts.grown_deadline_s(self.audio_sent_s)

    @property
    def next_deadline(self) -> float:
        """The earliest time at which `check` may raise: when to wake."""
        return min(self.receive_deadline, self.answer_deadline, self.session_deadline)

    def check(self, now: float) -> None:
        """Raise what ran out by ``now``: the final wait (`SessionTimeout`), the answer wait
        (`SessionStalled`), the session deadline (`SessionTimeout`)."""
        if now >= self.receive_deadline and not self.complete:
            raise self.final_timeout()
        if now >= self.answer_deadline and (stalled := self.stalled()) is not None:
            raise stalled
        if now >= self.session_deadline:
            raise SessionTimeout("session_deadline_s", now - self.began)

    def final_timeout(self) -> SessionTimeout:
        return SessionTimeout("final_timeout_s", self.timeouts.final_timeout_s)

    def took_audio(self, now: float) -> bool:
        """The service heard audio (it answered with words), got all of it, or kept reading
        past the window in which a concurrency refusal comes."""
        if self.heard or self.end_sent:
            return True
        streaming_s = now - self.started_at if self.started_at is not None else 0.0
        return streaming_s > REFUSAL_WINDOW_S

    # --- what the service sent ----------------------------------------------------------

    def receive(self, raw: str | bytes, now: float) -> Sequence[Event]:
        """One message from the service: what it made happen (`COMPLETED`, `ANSWERED`,
        `UnitFinalised`), in order. Raises `ProtocolViolation` (an unreadable or binary
        frame, a budget overrun, ``is_last`` before the end signal) or `ServerReported`.
        Messages after ``is_last`` change nothing."""
        if self.complete:
            return _NOTHING
        self._last_message_at = now
        if isinstance(raw, bytes):
            raise ProtocolViolation("service sent a binary frame; only JSON text is expected")
        message = self._parse(raw)
        if isinstance(message, protocol.ServerError):
            code = self.scrubber.scrub(message.code) if message.code else None
            raise ServerReported(self.scrubber.scrub(message.message), code)
        if isinstance(message, protocol.Ignored):
            logger.debug("ignored a %r message from the service", self.scrubber.scrub(message.kind))
            return _NOTHING
        return self._transcription(message, now)

    def _parse(self, raw: str) -> protocol.Transcription | protocol.ServerError | protocol.Ignored:
        scrubber = self.scrubber
        # A service that echoes the key into a transcript or message must not get it stored.
        raw = scrubber.scrub_whole(raw)
        try:
            scrub = scrubber.scrub if scrubber.may_hide_in(raw) else None
            message = protocol.parse_message(raw, scrub)
        except protocol.MalformedMessage as exc:
            detail = scrubber.scrub(str(exc))
            raise ProtocolViolation(f"unreadable message from the service: {detail}") from None
        over = self.meter.take(len(raw) - self._repeated(message), self.audio_sent_s)
        if over is not None:
            raise ProtocolViolation(over)
        return message

    def _repeated(self, message: object) -> int:
        """Characters of a cumulative ``full_transcript`` the budget already counted: it
        repeats the transcript so far on every final, and only the latest is kept."""
        if not isinstance(message, protocol.Transcription) or not message.full_transcript:
            return 0
        repeated = min(len(message.full_transcript), self._full_chars)
        self._full_chars = len(message.full_transcript)
        return repeated

    def _transcription(self, message: protocol.Transcription, now: float) -> Sequence[Event]:
        if message.is_last and self.end_sent_at is None:
            # A terminal message before all the audio was sent: the rest would be lost.
            raise ProtocolViolation("service sent is_last before the end of the audio")
        events: list[Event] = []
        self.heard = self.heard or bool(message.transcript or message.words)
        answered = self._answered(message)
        if answered is not None:
            events.append(answered)
        self._note_coerced(message.dropped)
        if not self._diarize:
            message = message.without_speakers()
        result = self.result
        result.session_id = message.session_id or result.session_id
        if message.is_final:
            result.note_final(message)
        if message.is_final and (message.transcript or message.words or message.is_last):
            if result.first_final_s is None and self.started_at is not None:
                result.first_final_s = now - self.started_at
            if message.transcript or message.words:
                # Only the latest full_transcript is kept (`note_final`): not one per final.
                final = replace(message, full_transcript=None)
                result.finals.append(final)
                if self._units:
                    self._attribute(final, events)
        if message.is_last:
            self.complete = True
            assert self.end_sent_at is not None
            result.end_to_last_s = now - self.end_sent_at
            if self._units:
                self._hand(len(self._spans), events)
            events.append(COMPLETED)
        return events

    def _note_coerced(self, fields: tuple[str, ...]) -> None:
        for name in fields:
            if name not in self._warned:  # once per field per session, not per message
                self._warned.add(name)
                logger.warning(
                    "%s: the service sent an odd %s value; stored as null", self.label, name
                )

    # --- reuse --------------------------------------------------------------------------

    def _attribute(self, final: protocol.Transcription, events: list[Event]) -> None:
        """``final`` to the unit holding its first word (finals come in order, so every
        unit before it is complete)."""
        unit = owner(final, self._spans, self._owner)
        self._owner = max(self._owner, unit)
        self._unit_finals[unit].append(shifted(final, self._spans[unit].start_s))
        self._hand(self._owner, events)

    def _hand(self, complete_units: int, events: list[Event]) -> None:
        for index in range(self._handed, complete_units):
            events.append(UnitFinalised(index, self._unit_finals[index]))
        self._handed = max(self._handed, complete_units)

    @property
    def units_finalised(self) -> int:
        """How many leading units were handed on as complete (`UnitFinalised`)."""
        return self._handed
