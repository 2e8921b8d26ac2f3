"""How much one session's service may send: a budget that grows with the audio sent.

A service that answers a 3 s file with gigabytes of finals, or floods partials, must not
exhaust the client's memory or a core, nor produce a transcript no table can hold. Each
session may receive at most ``chars_slack + chars_per_audio_s x audio sent`` characters
of text frames (partials, events and finals alike; each frame is at most 4 MB, refused
beyond) and ``messages_slack + messages_per_audio_s x audio sent`` messages. A cumulative
``full_transcript`` (the whole transcript so far, on every final) counts only what it adds,
since only the latest is kept. Past either budget, the session ends as a protocol failure
of its item, which retries as usual.

The defaults are far above what a real service sends (finals with word times take a few
hundred characters per second of speech; partials a few per second) and keep what one
session holds to a few tens of MB per ten minutes of audio. Pure: the session counts and
asks; `ReplyMeter.take` answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEFAULT_CHARS_PER_AUDIO_S: Final = 20_000.0
DEFAULT_MESSAGES_PER_AUDIO_S: Final = 50.0
# Room before much audio was sent: the first partials, a long final for a short file.
CHARS_SLACK: Final = 1_000_000
MESSAGES_SLACK: Final = 1_000


@dataclass(frozen=True)
class ReplyBounds:
    """A session's budget for what the service sends (see the module docstring)."""

    chars_per_audio_s: float = DEFAULT_CHARS_PER_AUDIO_S
    messages_per_audio_s: float = DEFAULT_MESSAGES_PER_AUDIO_S
    chars_slack: int = CHARS_SLACK
    messages_slack: int = MESSAGES_SLACK

    def max_chars(self, audio_sent_s: float) -> float:
        return self.chars_slack + self.chars_per_audio_s * max(0.0, audio_sent_s)

    def max_messages(self, audio_sent_s: float) -> float:
        return self.messages_slack + self.messages_per_audio_s * max(0.0, audio_sent_s)


class ReplyMeter:
    """What one session has received so far, against its `ReplyBounds`."""

    def __init__(self, bounds: ReplyBounds) -> None:
        self.bounds = bounds
        self.chars = 0
        self.messages = 0

    def take(self, chars: int, audio_sent_s: float) -> str | None:
        """Count one message of ``chars`` characters, received once ``audio_sent_s`` of
        audio was sent; says which budget it overran (a sentence for the error), or None."""
        self.chars += chars
        self.messages += 1
        bounds = self.bounds
        if self.chars > bounds.max_chars(audio_sent_s):
            return (
                f"the service sent {self.chars:,} characters for {audio_sent_s:.1f} s of "
                f"audio, more than the session's budget ({bounds.chars_slack:,} + "
                f"{bounds.chars_per_audio_s:g} per audio second; "
                "run.max_reply_chars_per_audio_s)"
            )
        if self.messages > bounds.max_messages(audio_sent_s):
            return (
                f"the service sent {self.messages:,} messages for {audio_sent_s:.1f} s of "
                f"audio, more than the session's budget ({bounds.messages_slack:,} + "
                f"{bounds.messages_per_audio_s:g} per audio second; "
                "run.max_replies_per_audio_s)"
            )
        return None


DEFAULT_BOUNDS: Final = ReplyBounds()
