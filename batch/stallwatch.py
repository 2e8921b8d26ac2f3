"""The session's liveness at work: speech measured off the event loop, the audio held.

`batch.pulse.machine.SessionMachine` decides (pure: `must_hold`, `hold`, `stalled`);
`batch.speech_gauge` measures speech in the reader thread; this thin shell joins them to
one session's sender: `gauged` wraps the audio source, and `hold` sends the probe
(``finalize`` where the endpoint has it) and waits ``answer_wait_s`` for an answer before
raising `SessionStalled`, so a silent service is fed a bounded amount of speech, never the
rest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

from batch.pulse.liveness import DEFAULT_POLICY as DEFAULT_POLICY
from batch.pulse.liveness import LivenessPolicy as LivenessPolicy
from batch.pulse.machine import SessionMachine
from batch.pulse.protocol import PulseOptions
from batch.readahead import AudioSource
from batch.speech_gauge import SpeechGauge

logger = logging.getLogger(__name__)


def gauged(
    audio: AudioSource, machine: SessionMachine, options: PulseOptions
) -> tuple[AudioSource, SpeechGauge | None]:
    """``audio`` measured for speech as it is read, and its gauge (itself and None when
    the machine watches no liveness). The gauge measures only while the machine asks
    (`Liveness.watching`: a plain attribute read from the reader thread)."""
    if not machine.watches_liveness:
        return audio, None
    liveness = machine.liveness
    gauge = SpeechGauge(audio, options.encoding, options.sample_rate, lambda: liveness.watching)
    return gauge, gauge


async def hold(
    machine: SessionMachine,
    send: Callable[[str], Awaitable[None]],
    answer: anyio.Event,
    now: float,
) -> None:
    """Send no more audio: probe, and wait for ``answer`` (set by the receiver on
    `ANSWERED`) until the machine's answer deadline; raises `SessionStalled` when none
    came."""
    speech_s = machine.liveness.unanswered_speech_s
    probe = machine.hold(now)
    if probe is not None:
        await send(probe)
    logger.info(
        "%s: no answer to %.1f s of speech; holding the audio for %g s",
        machine.label,
        speech_s,
        machine.liveness.policy.answer_wait_s,
    )
    with anyio.move_on_after(machine.answer_deadline - now):
        await answer.wait()
    stalled = machine.stalled()
    if stalled is not None:
        raise stalled
