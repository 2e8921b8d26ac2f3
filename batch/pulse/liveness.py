"""Is the service still answering? A pure verdict from the audio fed and the answers heard.

A session that keeps reading audio and says nothing ("a live socket that transcribes
nothing") would otherwise be fed the whole recording before a deadline notices. The
service answers speech only, so silence and hold music earn no answer and must not count:
what counts is *speech* fed since the last answer, as a detector measures it (see
`batch.speech_gauge`). Measuring costs CPU, so the pump measures only once ``watch_after_s``
of audio went unanswered; audio not measured counts in full, as if it were speech, which
errs toward noticing a stall, never toward feeding one more.

Once ``unanswered_speech_s`` of speech went unanswered, the verdict is `Verdict.HOLD`: the
pump stops feeding, sends the probe when the endpoint has one (``finalize`` flushes what
the service holds into a final, so a live service answers even mid-utterance), and waits
``answer_wait_s`` for any answer; none, and the session is stalled. No sockets here: audio
seconds and answers in, a verdict out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum

from batch.pulse.protocol import Generation

# Bound on speech fed to a silent service (the ceiling is 15 s).
DEFAULT_UNANSWERED_SPEECH_S = 15.0
DEFAULT_WATCH_AFTER_S = 3.0
DEFAULT_ANSWER_WAIT_S = 15.0


@dataclass(frozen=True)
class LivenessPolicy:
    """How much unanswered speech a session may be fed, and how long it then waits.

    ``unanswered_speech_s`` 0 turns liveness off (only the session's deadlines apply).
    """

    unanswered_speech_s: float = DEFAULT_UNANSWERED_SPEECH_S
    watch_after_s: float = DEFAULT_WATCH_AFTER_S
    answer_wait_s: float = DEFAULT_ANSWER_WAIT_S

    @property
    def enabled(self) -> bool:
        return self.unanswered_speech_s > 0


DEFAULT_POLICY = LivenessPolicy()


class Verdict(Enum):
    FEED = "feed"  # go on sending audio
    HOLD = "hold"  # send no more: probe, and wait ``answer_wait_s`` for an answer


def probe_message(generation: Generation) -> str | None:
    """The message that makes a live service answer now, on the endpoints that have one:
    ``finalize`` (newer paths) flushes the current turn into a final, session kept open."""
    if generation is Generation.LEGACY:
        return None
    return json.dumps({"type": "finalize"})


class Liveness:
    """Audio fed and answers heard in, `Verdict` out. Pure; times are audio seconds.

    `fed` takes each chunk's audio seconds and the speech the detector heard in it (None:
    not measured, counted in full). `answered` takes an answer: words, partial or final
    (`batch.pulse.machine` says which messages are answers).
    """

    def __init__(self, policy: LivenessPolicy = LivenessPolicy()) -> None:
        self.policy = policy
        self.unanswered_audio_s = 0.0
        self.unanswered_speech_s = 0.0
        self.answers = 0

    @property
    def watching(self) -> bool:
        """Measure speech now: enough audio went unanswered that it may matter."""
        return self.policy.enabled and self.unanswered_audio_s >= self.policy.watch_after_s

    def fed(self, audio_s: float, speech_s: float | None) -> None:
        self.unanswered_audio_s += audio_s
        self.unanswered_speech_s += audio_s if speech_s is None else min(speech_s, audio_s)

    def answered(self) -> None:
        self.answers += 1
        self.unanswered_audio_s = 0.0
        self.unanswered_speech_s = 0.0

    @property
    def verdict(self) -> Verdict:
        limit = self.policy.unanswered_speech_s
        if self.policy.enabled and self.unanswered_speech_s >= limit:
            return Verdict.HOLD
        return Verdict.FEED
