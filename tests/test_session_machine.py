"""The session's protocol without a socket: `SessionMachine` driven with plain values.

Text and audio seconds in, events, deadlines and errors out; times are plain numbers.
What the shell does with them over a real connection is tested against the local server
(tests/test_liveness.py, test_reuse.py, test_session_bounds.py, test_faults.py).
"""

from __future__ import annotations

import json
import logging
import math
import random
import tracemalloc
from typing import Any

import pytest

from batch.credentials import REDACTED, Scrubber
from batch.errors import ProtocolViolation, ServerReported, SessionStalled, SessionTimeout
from batch.pulse.bounds import ReplyBounds
from batch.pulse.liveness import LivenessPolicy
from batch.pulse.machine import (
    ANSWERED,
    COMPLETED,
    REFUSAL_WINDOW_S,
    SessionMachine,
    Timeouts,
    UnitFinalised,
)
from batch.pulse.protocol import Generation, PulseOptions
from batch.pulse.reuse import Span, split_finals

CURRENT, LEGACY = Generation.CURRENT, Generation.LEGACY
REUSABLE = PulseOptions(word_timestamps=True, full_transcript=False)


def _text(
    transcript: str = "",
    *,
    final: bool = True,
    last: bool = False,
    words: list[tuple[str, float, float]] | None = None,
    **extra: Any,
) -> str:
    message: dict[str, Any] = {
        "session_id": "s1",
        "transcript": transcript,
        "is_final": final,
        "is_last": last,
        **extra,
    }
    if words is not None:
        message["words"] = [
            {"word": w, "start": start, "end": end, "confidence": 0.9} for w, start, end in words
        ]
    return json.dumps(message)


def _machine(generation: Generation = CURRENT, **kwargs: Any) -> SessionMachine:
    options = kwargs.pop("options", PulseOptions())
    return SessionMachine(generation, options, 100.0, **kwargs)


def _feed(
    machine: SessionMachine, seconds: float, speech: float | None, step: float = 0.128
) -> None:
    """Send ``seconds`` of audio in chunks; each chunk's speech share is ``speech``."""
    position = machine.audio_sent_s
    end = position + seconds
    while position < end - 1e-9 and not machine.must_hold:
        chunk = min(step, end - position)
        position += chunk
        machine.sent(position, None if speech is None else chunk * speech)


# --- the end signal, finals and is_last ---------------------------------------------------


def test_is_last_before_the_end_signal_is_a_protocol_error() -> None:
    machine = _machine()
    machine.begin_audio(100.0)
    machine.sent(1.0, None)
    with pytest.raises(ProtocolViolation, match="is_last before the end of the audio"):
        machine.receive(_text("hello", last=True), 101.0)
    assert not machine.complete


def test_is_last_after_the_end_signal_completes_and_later_messages_change_nothing() -> None:
    machine = _machine(LEGACY)
    machine.begin_audio(100.0)
    machine.sent(2.0, None)
    assert machine.end_signal() == json.dumps({"type": "end"})
    machine.ended(102.0)
    assert machine.receive(_text("hello there", words=[("hello", 0.1, 0.4)]), 103.0) == []
    assert list(machine.receive(_text("", last=True), 103.5)) == [COMPLETED]
    result = machine.result
    assert machine.complete and result.end_to_last_s == pytest.approx(1.5)
    assert result.first_final_s == pytest.approx(3.0)  # from the first audio sent
    # A final after is_last (a confused service) is not stored, and raises nothing.
    assert list(machine.receive(_text("late", words=[("late", 1.0, 1.2)]), 104.0)) == []
    assert [f.transcript for f in result.finals] == ["hello there"]


def test_only_finals_with_text_are_kept_and_languages_and_full_transcript_are_noted() -> None:
    machine = _machine(CURRENT)
    machine.receive(_text("hel", final=False), 100.1)
    machine.receive(_text("", language="en"), 100.2)  # an empty final: noted, not kept
    machine.receive(_text("hello", language="fr", full_transcript="hello"), 100.3)
    result = machine.result
    assert [f.transcript for f in result.finals] == ["hello"]
    assert result.finals[0].full_transcript is None  # only the latest is kept, once
    assert (result.languages, result.full_transcript, result.session_id) == (
        ["en", "fr"],
        "hello",
        "s1",
    )
    assert machine.end_signal() == json.dumps({"type": "close_stream"})


def test_speakers_are_dropped_without_diarize() -> None:
    word = {"word": "hi", "start": 0.0, "end": 0.2, "speaker": 1}
    raw = json.dumps({"transcript": "hi", "is_final": True, "is_last": False, "words": [word]})
    plain, diarized = _machine(), _machine(options=PulseOptions(diarize=True))
    plain.receive(raw, 100.0)
    diarized.receive(raw, 100.0)
    assert plain.result.finals[0].words[0].speaker is None
    assert diarized.result.finals[0].words[0].speaker == "1"


def test_an_odd_field_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="batch.pulse.machine")
    machine = _machine(label="talk.wav")
    for at in (100.0, 100.5):
        machine.receive(_text("hi", language=["en"]), at)
    assert caplog.text.count("talk.wav: the service sent an odd language value") == 1


# --- what the service may send ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw, code",
    [
        ('{"type": "error", "status": "error", "message": "boom KEY-0123456789abcdef"}', None),
        ('{"status": "error", "error": {"message": "boom", "code": "500"}}', "500"),
        ('{"error": "boom", "code": 42}', "42"),
    ],
)
def test_every_error_shape_is_server_reported_with_the_key_scrubbed(
    raw: str, code: str | None
) -> None:
    machine = _machine(scrubber=Scrubber("KEY-0123456789abcdef"))
    with pytest.raises(ServerReported) as caught:
        machine.receive(raw, 100.0)
    assert caught.value.code == code and "boom" in str(caught.value)
    assert "0123456789abcdef" not in str(caught.value)


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"\x00\x01", "binary frame"),
        ("not json", "unreadable message"),
        ('{"is_final": true, "words": [{"word": "x"}]}', "unreadable message"),
    ],
)
def test_frames_that_break_the_protocol(raw: str | bytes, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        _machine().receive(raw, 100.0)


def test_events_and_unknown_types_are_ignored() -> None:
    machine = _machine()
    event = {"type": "speech_started", "session_id": "s1", "timestamp": 0.5}
    assert list(machine.receive(json.dumps(event), 100.0)) == []
    assert machine.result.finals == [] and machine.meter.messages == 1  # counted all the same


def test_the_reply_budget_grows_with_the_audio_sent() -> None:
    bounds = ReplyBounds(messages_per_audio_s=1.0, messages_slack=2)
    machine = _machine(bounds=bounds)
    for at in range(3):
        machine.receive(_text("x", final=False), 100.0 + at)
        machine.sent(float(at + 1), None)  # one more message allowed per audio second
    machine.receive(_text("x", final=False), 104.0)
    machine.receive(_text("x", final=False), 104.2)  # 5: 2 + 3 s x 1
    with pytest.raises(ProtocolViolation, match=r"run\.max_replies_per_audio_s"):
        machine.receive(_text("x", final=False), 104.5)


def test_a_cumulative_full_transcript_counts_only_what_it_adds() -> None:
    machine = _machine(bounds=ReplyBounds(chars_per_audio_s=0.0, chars_slack=8_000))
    text = ""
    for index in range(40):  # 40 finals repeating a growing transcript: ~14 KB of it
        text += f" word{index:03d} and more"
        machine.receive(_text("w", full_transcript=text.strip()), 100.0 + index)
    assert machine.result.full_transcript == text.strip()
    with pytest.raises(ProtocolViolation, match=r"run\.max_reply_chars_per_audio_s"):
        machine.receive(_text("y" * 4_000), 150.0)


# --- the final wait and the session deadline ----------------------------------------------


def test_the_final_wait_starts_at_the_end_signal_and_restarts_with_each_message() -> None:
    machine = _machine(timeouts=Timeouts(final_timeout_s=30.0))
    assert machine.receive_deadline == math.inf  # before the end signal: no final wait
    machine.check(699.0)  # nor any other wait until the session deadline (600 s from 100)
    machine.sent(5.0, None)
    machine.ended(110.0)
    assert machine.receive_deadline == 140.0
    machine.receive(_text("a", final=False), 125.0)
    assert machine.receive_deadline == 155.0 == machine.next_deadline
    machine.check(154.9)
    with pytest.raises(SessionTimeout, match="final_timeout_s") as caught:
        machine.check(155.0)
    assert caught.value.timeout == "final_timeout_s"


def test_the_session_deadline_grows_with_the_audio_sent() -> None:
    timeouts = Timeouts(session_deadline_s=100.0, deadline_per_audio_s=1.5, deadline_slack_s=60.0)
    machine = _machine(timeouts=timeouts)
    assert machine.session_deadline == 200.0  # opened at 100: at least session_deadline_s
    machine.sent(200.0, None)
    assert machine.session_deadline == 100.0 + 200.0 * 1.5 + 60.0
    with pytest.raises(SessionTimeout, match="session_deadline_s"):
        machine.check(460.0)


def test_the_service_took_audio_once_it_answered_or_read_past_the_refusal_window() -> None:
    quiet, answered, ended = _machine(), _machine(), _machine()
    for machine in (quiet, answered, ended):
        machine.begin_audio(100.0)
    assert not quiet.took_audio(100.0 + REFUSAL_WINDOW_S)
    assert quiet.took_audio(100.1 + REFUSAL_WINDOW_S)
    answered.receive(_text("hi", final=False), 100.5)
    ended.ended(100.5)
    assert answered.took_audio(100.5) and ended.took_audio(100.5)
    assert not _machine().took_audio(1_000.0)  # never sent audio: a refusal at most


# --- liveness -------------------------------------------------------------------------------

POLICY = LivenessPolicy(unanswered_speech_s=15.0, watch_after_s=3.0, answer_wait_s=10.0)


def test_unanswered_speech_holds_probes_and_stalls_after_the_answer_wait() -> None:
    machine = _machine(timeouts=Timeouts(liveness=POLICY))
    _feed(machine, 30.0, speech=1.0)
    assert machine.must_hold and 15.0 <= machine.audio_sent_s < 15.2  # no more fed
    assert machine.hold(200.0) == json.dumps({"type": "finalize"})
    assert machine.answer_deadline == 210.0 == machine.next_deadline
    machine.check(209.9)
    with pytest.raises(SessionStalled, match=r"nothing for 15\.1 s of speech") as caught:
        machine.check(210.0)
    assert caught.value.speech_s >= 15.0 and caught.value.waited_s == 10.0


def test_an_answer_while_holding_releases_the_audio() -> None:
    machine = _machine(timeouts=Timeouts(liveness=POLICY))
    _feed(machine, 30.0, speech=1.0)
    machine.hold(200.0)
    # A live service flushes an empty buffer into an empty final: once probed, an answer.
    assert list(machine.receive(_text(""), 201.0)) == [ANSWERED]
    assert not machine.must_hold and machine.stalled() is None
    assert machine.answer_deadline == math.inf
    machine.check(500.0)  # nothing ran out
    # An answer while not holding resets the count, and needs no wake.
    _feed(machine, 5.0, speech=1.0)
    assert list(machine.receive(_text("words"), 202.0)) == []
    assert machine.liveness.unanswered_speech_s == 0.0


def test_empty_finals_are_no_answer_unless_probed() -> None:
    machine = _machine(LEGACY, timeouts=Timeouts(liveness=POLICY))
    _feed(machine, 30.0, speech=1.0)
    assert machine.hold(200.0) is None  # the legacy path has no probe: wait only
    machine.receive(_text(""), 201.0)
    machine.receive(_text("", final=False), 202.0)
    assert isinstance(machine.stalled(), SessionStalled)


def test_silence_and_music_do_not_count_and_unmeasured_audio_counts_in_full() -> None:
    machine = _machine(timeouts=Timeouts(liveness=POLICY))
    _feed(machine, 120.0, speech=0.0)  # two minutes the gauge calls silence or music
    assert not machine.must_hold
    _feed(machine, 14.0, speech=None)  # not measured: counted as speech
    assert not machine.must_hold
    _feed(machine, 1.1, speech=None)
    assert machine.must_hold


def test_liveness_is_off_when_disabled_or_when_silence_cannot_be_told_and_not_probed() -> None:
    off = _machine(timeouts=Timeouts(liveness=LivenessPolicy(unanswered_speech_s=0.0)))
    opus = PulseOptions(encoding="opus")
    legacy_opus = _machine(LEGACY, options=opus)
    current_opus = _machine(CURRENT, options=opus)
    for machine in (off, legacy_opus):
        _feed(machine, 100.0, speech=None)
        assert not machine.watches_liveness and not machine.must_hold
    assert current_opus.watches_liveness  # the probe tells a live service from a silent one


# --- reuse: units and their finals ----------------------------------------------------------


def _reused(**kwargs: Any) -> SessionMachine:
    return _machine(options=REUSABLE, units=True, **kwargs)


def test_each_unit_is_finalised_when_a_later_units_final_comes_on_its_own_time_base() -> None:
    machine = _reused()
    machine.sent(3.0, None)
    assert machine.finalize() == json.dumps({"type": "finalize"})
    machine.sent(7.0, None)
    machine.finalize()
    machine.sent(9.0, None)
    assert list(machine.receive(_text("one", words=[("one", 1.0, 1.4)]), 101.0)) == []
    events = machine.receive(_text("two", words=[("two", 4.0, 4.5)]), 102.0)
    assert events == [UnitFinalised(0, machine.result.finals[:1])]
    # A final with no word times goes with the one before it.
    machine.receive(_text("and"), 102.5)
    machine.ended(103.0)
    events = machine.receive(_text("", last=True), 104.0)
    assert [type(e) for e in events] == [UnitFinalised, UnitFinalised, type(COMPLETED)]
    unit1, unit2 = events[0], events[1]
    assert isinstance(unit1, UnitFinalised) and isinstance(unit2, UnitFinalised)
    assert (unit1.index, unit2.index) == (1, 2) and unit2.finals == []
    assert [f.transcript for f in unit1.finals] == ["two", "and"]
    word = unit1.finals[0].words[0]
    assert (word.start_s, word.end_s) == (1.0, 1.5)  # 4.0-4.5 in the session, 3.0 in
    assert machine.units_finalised == 3


def test_a_failed_reused_session_has_finalised_only_the_units_known_complete() -> None:
    machine = _reused()
    machine.sent(3.0, None)
    machine.finalize()
    machine.sent(6.0, None)
    machine.receive(_text("one", words=[("one", 1.0, 1.4)]), 101.0)
    machine.receive(_text("two", words=[("two", 3.5, 3.9)]), 102.0)
    assert machine.units_finalised == 1  # unit 1 may have more to come: retried


def test_a_word_a_little_before_its_units_start_begins_at_zero() -> None:
    machine = _reused()
    machine.sent(3.0, None)
    machine.finalize()
    machine.sent(6.0, None)
    machine.ended(110.0)
    events = machine.receive(_text("two", last=True, words=[("two", 2.99, 3.4)]), 111.0)
    unit1 = events[1]
    assert isinstance(unit1, UnitFinalised) and unit1.index == 1
    assert (unit1.finals[0].words[0].start_s, unit1.finals[0].words[0].end_s) == (0.0, 0.4)


def test_a_session_of_one_unit_attributes_nothing() -> None:
    machine = _machine()
    machine.sent(3.0, None)
    machine.finalize()  # a probe-like flush: no unit boundary outside reuse
    machine.ended(104.0)
    assert list(machine.receive(_text("hi", last=True, words=[("hi", 4.0, 4.2)]), 105.0)) == [
        COMPLETED
    ]
    assert machine.result.finals[0].words[0].start_s == 4.0 and REDACTED not in repr(machine)


def test_units_get_the_finals_split_finals_gives_them_arriving_one_by_one() -> None:
    """The machine attributes finals as they come; `split_finals` over the whole session
    (what a unit's own session is compared against in test_reuse) gives the same."""
    rng = random.Random(7)
    for _ in range(50):
        starts = [0.0]
        for _ in range(rng.randint(0, 4)):
            starts.append(starts[-1] + rng.uniform(0.5, 5.0))
        end = starts[-1] + rng.uniform(0.5, 5.0)
        machine = _reused()
        for start in starts[1:]:
            machine.sent(start, None)
            machine.finalize()
        machine.sent(end, None)
        machine.ended(200.0)
        finalised: list[UnitFinalised] = []
        times = sorted(rng.uniform(0.0, end) for _ in range(rng.randint(0, 12)))
        for index, at in enumerate(times):
            words = [] if rng.random() < 0.2 else [(f"w{index}", at, at + 0.2)]
            for event in machine.receive(_text(f"w{index}", words=words), 201.0):
                assert isinstance(event, UnitFinalised)
                finalised.append(event)
        for event in machine.receive(_text("", last=True), 202.0):
            if isinstance(event, UnitFinalised):
                finalised.append(event)
        spans = [Span(start, math.inf) for start in starts]
        assert [e.index for e in finalised] == list(range(len(starts)))
        assert [e.finals for e in finalised] == split_finals(machine.result.finals, spans)


def test_feeding_a_chunk_holds_nothing_more_in_memory() -> None:
    """The per-chunk calls (`must_hold`, `sent`, `session_deadline`) keep no state that
    grows: an hour of 128 ms chunks leaves the machine's memory where it was."""
    machine = _machine(timeouts=Timeouts(liveness=POLICY, deadline_per_audio_s=1.5))
    position = 0.0
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(28_125):
            if not machine.must_hold:
                position += 0.128
                machine.sent(position, 0.0)
                assert machine.session_deadline > 0
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert position > 3_599.0 and after - before < 1_000
