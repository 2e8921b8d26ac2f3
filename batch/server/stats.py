"""Counters the local server keeps so tests (and the CLI) can see what happened.

Everything here is mutated on the server's event loop only, so no locking is needed;
readers in other threads may see a slightly stale snapshot, never a torn count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from batch.server.faults import FaultKind


@dataclass
class SessionRecord:
    """One accepted WebSocket session, filled in as it runs.

    ``outcome`` names how it ended (see `batch.server.stream.Outcome`). ``pace`` is
    audio seconds received per wall second between the first and last audio frame
    (1.0 = real time); None until two frames arrived at different times.
    """

    session_id: str
    session_index: int
    path: str
    query: dict[str, str]
    fault: FaultKind | None = None
    audio_s: float = 0.0
    first_audio_at: float | None = None
    last_audio_at: float | None = None
    max_audio_gap_s: float = 0.0  # the longest wait between two audio frames
    completed: bool = False
    outcome: str | None = None
    user_agent: str | None = None  # the client's User-Agent header
    final_words: list[str] = field(default_factory=list)  # every word sent in a final

    @property
    def pace(self) -> float | None:
        if self.first_audio_at is None or self.last_audio_at is None:
            return None
        wall_s = self.last_audio_at - self.first_audio_at
        return self.audio_s / wall_s if wall_s > 0 else None


@dataclass
class ServerStats:
    """Server-wide counters.

    ``refused`` counts handshakes refused before the upgrade by HTTP status (404, 401,
    400, 429, 5xx, injected or not); ``faults`` counts injected faults by kind.
    """

    sessions_opened: int = 0
    open_now: int = 0
    max_open: int = 0
    refused: Counter[int] = field(default_factory=Counter)
    faults: Counter[FaultKind] = field(default_factory=Counter)
    sessions: list[SessionRecord] = field(default_factory=list)

    def session_opened(self, record: SessionRecord, concurrent: int) -> None:
        """``concurrent``: sessions open now, this one included, not counting any whose
        close handshake has begun (their clients may already have moved on)."""
        self.sessions.append(record)
        self.sessions_opened += 1
        self.open_now += 1
        self.max_open = max(self.max_open, concurrent)

    def session_closed(self) -> None:
        self.open_now -= 1

    @property
    def sessions_completed(self) -> int:
        """Sessions that sent ``is_last`` (counted as it is sent, before the close)."""
        return sum(record.completed for record in self.sessions)

    @property
    def faults_total(self) -> int:
        return sum(self.faults.values())
