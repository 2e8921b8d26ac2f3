"""Audio counted as it is sent: a session's source tells the progress display how far it
has read every half second or so, so the bar and its ETA move while a long file streams."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Final, Protocol

# At most this often per session: the count runs in the read loop, which must stay cheap.
REPORT_EVERY_S: Final = 0.5


class _Source(Protocol):
    def __iter__(self) -> Iterator[bytes]: ...

    @property
    def position_s(self) -> float: ...

    @property
    def duration_s(self) -> float: ...


class CountedAudio:
    """``audio``, whose reader reports the seconds read since its last report to ``report``
    (from the thread that reads; read ahead of the wire by the session's few batches).
    `settle` ends the count: what was reported is kept (the rest added) or taken back."""

    def __init__(
        self,
        audio: _Source,
        report: Callable[[float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._audio = audio
        self._report = report
        self._clock = clock
        self._lock = threading.Lock()  # a late read must not count after `settle`
        self._counted_s = 0.0
        self._reported_at = clock()
        self._settled = False

    @property
    def position_s(self) -> float:
        return self._audio.position_s

    @property
    def duration_s(self) -> float:
        return self._audio.duration_s

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._audio)
        try:
            for chunk in chunks:
                now = self._clock()
                if now - self._reported_at >= REPORT_EVERY_S:
                    self._reported_at = now
                    self._count(self._audio.position_s)
                yield chunk
        finally:
            close = getattr(chunks, "close", None)  # a generator: runs its `with` exits
            if close is not None:
                close()

    def _count(self, position_s: float) -> None:
        with self._lock:
            delta_s = position_s - self._counted_s
            if self._settled or delta_s <= 0:
                return
            self._counted_s = position_s
            self._report(delta_s)

    def settle(self, kept: bool) -> None:
        """The session is over: ``kept`` (it worked) counts all its audio; else what was
        counted is taken back (a retry sends it again)."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
            delta_s = self._audio.duration_s - self._counted_s if kept else -self._counted_s
            if delta_s:
                self._report(delta_s)
