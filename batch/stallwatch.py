"""The session's liveness check at work: feeds `Liveness`, holds the audio, probes, gives up.

`batch.pulse.liveness` decides (pure); `batch.speech_gauge` measures speech off the event
loop; this thin shell joins them to one session's sender: `wrap` the audio source, `send`
each chunk through it, and call `answered` with every transcription.
When the verdict is to hold, no more audio is sent: the probe goes out (``finalize`` where
the endpoint has it) and the sender waits ``answer_wait_s`` for an answer before raising
`SessionStalled`, so a silent service is fed a bounded amount of speech, never the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import anyio

from batch.errors import SessionStalled
from batch.pulse.liveness import DEFAULT_POLICY as DEFAULT_POLICY
from batch.pulse.liveness import Liveness, Verdict, probe_message
from batch.pulse.liveness import LivenessPolicy as LivenessPolicy
from batch.pulse.protocol import Generation, PulseOptions, Transcription, finalize_message
from batch.readahead import AudioSource
from batch.speech_gauge import SpeechGauge

logger = logging.getLogger(__name__)


class StallWatch:
    """One session's liveness: see the module docstring."""

    def __init__(
        self,
        policy: LivenessPolicy,
        generation: Generation,
        options: PulseOptions,
        label: str = "a session",
    ) -> None:
        self.liveness = Liveness(policy)
        self.probe = probe_message(generation)
        self._options = options
        self._label = label
        self._gauge: SpeechGauge | None = None
        self._answer = anyio.Event()
        self._position_s = 0.0
        self._probed = False

    def wrap(self, audio: AudioSource) -> AudioSource:
        """``audio`` measured for speech as it is read (itself when liveness is off)."""
        if not self.liveness.policy.enabled:
            return audio
        options = self._options
        gauge = SpeechGauge(audio, options.encoding, options.sample_rate, self._watching)
        if not gauge.measurable and self.probe is None:
            # Opus on an endpoint with no probe: silence would read as speech, and a healthy
            # service that answers only speech could be taken for a stalled one.
            return audio
        self._gauge = gauge
        return gauge

    @property
    def holding(self) -> bool:
        """Send no more audio until the service answers (`send` holds, then probes)."""
        return self.liveness.verdict is Verdict.HOLD

    def _watching(self) -> bool:  # read from the reader thread: a plain attribute read
        return self.liveness.watching

    async def send(
        self, send: Callable[[str | bytes], Awaitable[None]], chunk: bytes, position_s: float
    ) -> None:
        """Send ``chunk`` (``position_s``: the audio sent with it) once it may be sent;
        raises `SessionStalled` when the service is silent and it may not. An empty chunk
        ends a unit in a reused session (`batch.reuse`): ``finalize``, the session kept."""
        if not chunk:
            await send(finalize_message())
            return
        if self.liveness.verdict is Verdict.HOLD:  # checked here: no coroutine per chunk
            await self._hold(send)
        await send(chunk)
        self.fed(position_s)

    def fed(self, position_s: float) -> None:
        """A chunk was sent; ``position_s`` is the audio sent so far."""
        if self._gauge is not None:
            self.liveness.fed(position_s - self._position_s, self._gauge.take())
            self._position_s = position_s

    def answered(self, message: Transcription) -> None:
        """A transcription came. Words answer; so does any final once probed (a live
        service flushes an empty buffer into an empty final). Empty messages otherwise
        do not: a service that sends them to speech transcribes nothing."""
        if message.transcript or message.words or (message.is_final and self._probed):
            self._probed = False
            self.liveness.answered()
            self._answer.set()

    async def _hold(self, send: Callable[[str | bytes], Awaitable[None]]) -> None:
        """Probe and wait for an answer; raises `SessionStalled` when none comes."""
        speech_s = self.liveness.unanswered_speech_s
        audio_s = self.liveness.unanswered_audio_s
        wait_s = self.liveness.policy.answer_wait_s
        self._answer = anyio.Event()
        if self.probe is not None:
            self._probed = True
            await send(self.probe)
        logger.info(
            "%s: no answer to %.1f s of speech; holding the audio for %g s",
            self._label,
            speech_s,
            wait_s,
        )
        with anyio.move_on_after(wait_s):
            await self._answer.wait()
        if self.liveness.verdict is Verdict.HOLD:
            raise SessionStalled(speech_s, audio_s, wait_s, probed=self.probe is not None)
