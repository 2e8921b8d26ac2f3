"""What one session may take, from the run's options: its named waits and its reply budget.

Pure: a `RunConfig` and the audio an attempt streams in, `Timeouts` and `ReplyBounds` out.
"""

from __future__ import annotations

from batch.manifest import RunConfig
from batch.pulse.bounds import ReplyBounds
from batch.pulse.liveness import LivenessPolicy
from batch.session import Timeouts

# An attempt whose audio length is unknown before it streams gets a deadline for this much.
UNKNOWN_AUDIO_S = 6 * 3600.0


def session_timeouts(run: RunConfig, duration_s: float | None) -> Timeouts:
    """The waits of a session streaming ``duration_s`` of audio (None: not known)."""
    audio_s = duration_s if duration_s is not None else UNKNOWN_AUDIO_S
    deadline = audio_s / (run.pace or 1.0) * run.session_deadline_factor
    return Timeouts(
        run.connect_timeout_s,
        run.final_timeout_s,
        deadline + run.session_deadline_slack_s,
        # The probe may understate the audio: the deadline follows what is really sent.
        deadline_per_audio_s=run.session_deadline_factor / (run.pace or 1.0),
        deadline_slack_s=run.session_deadline_slack_s,
        write_timeout_s=run.write_timeout_s,
        # The probe is answered like the end signal is: the same wait (batch.pulse.liveness).
        liveness=LivenessPolicy(run.stall_after_speech_s, answer_wait_s=run.final_timeout_s),
    )


def reply_bounds(run: RunConfig) -> ReplyBounds:
    """What a session's service may send, per second of audio sent."""
    return ReplyBounds(run.max_reply_chars_per_audio_s, run.max_replies_per_audio_s)
