"""A run's spend cap: no session starts once it could take the billed audio past the cap.

Pure bookkeeping, no I/O. Every session attempt (retries included) asks `SpendCap.admit`
for the audio it is about to stream; the seconds are *reserved* while the session runs and
*settled* to what was actually sent when it ends, so concurrent sessions can never together
overshoot the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from batch.errors import SpendCapReached


@dataclass
class SpendCap:
    """``limit_s`` billed audio seconds for the run (None: no cap)."""

    limit_s: float | None = None
    spent_s: float = 0.0
    reserved_s: float = 0.0
    reached: bool = False

    @classmethod
    def from_limits(
        cls, max_billed_minutes: float | None, max_cost: float | None, price_per_minute: float
    ) -> SpendCap:
        """The tighter of a minutes cap and a cost cap (cost needs a price per minute)."""
        limits = []
        if max_billed_minutes is not None:
            limits.append(max_billed_minutes * 60)
        if max_cost is not None:
            if price_per_minute <= 0:
                raise ValueError("a cost cap needs output.price_per_minute above 0")
            limits.append(max_cost / price_per_minute * 60)
        return cls(min(limits) if limits else None)

    def admit(self, audio_s: float) -> None:
        """Reserve ``audio_s`` for a session about to start; raises `SpendCapReached`
        (and stays reached) when it does not fit beside what is spent and reserved."""
        if self.limit_s is not None and (
            self.reached or self.spent_s + self.reserved_s + audio_s > self.limit_s + 1e-9
        ):
            self.reached = True
            left = max(0.0, self.limit_s - self.spent_s - self.reserved_s)
            raise SpendCapReached(
                f"spend cap of {self.limit_s / 60:g} billed minutes reached: the next session"
                f" needs {audio_s / 60:.2f} min, {left / 60:.2f} min left"
            )
        self.reserved_s += audio_s

    def settle(self, reserved_s: float, sent_s: float) -> None:
        """A session admitted for ``reserved_s`` ended having sent ``sent_s``."""
        self.reserved_s = max(0.0, self.reserved_s - reserved_s)
        self.spent_s += sent_s
