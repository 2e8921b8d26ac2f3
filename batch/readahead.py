"""Read a session's audio ahead in a worker thread, so blocking reads stay off the event loop.

A decoder pulls bytes from a local disk, a cache file or object storage; any of them can
block (a slow S3 range read, a stalled NFS mount). Done on the event loop, that one read
would stall the pacing, keepalives and timeouts of every other session of the job. Here the
`AudioSource` is read in a worker thread, a batch of chunks at a time, into a bounded
queue the sender drains: at most ``BATCHES_AHEAD`` batches (a few seconds of audio) are
held, so memory stays flat whatever the file's length, and each chunk carries the audio
position reached with it, so pacing is as exact as when the sender read the source itself.

The worker threads are shared (`_Readers`): sessions paced at real time ask for a batch a
second each and a read takes about a millisecond, so one reader serves many sessions in
turn. A thread per session cost more in context switches than decoding itself (each
release of the GIL in the decoder handed it to another of 64 threads). A sender kept
waiting `READER_STALL_S` has one more reader started, so a read stalled on a slow store
holds up other sessions' reads no longer than that. The event loop is woken only when
the sender waits for a batch; a paced sender keeps a batch ahead.

Errors the source raises (`batch.errors.InputError` and its subclasses) reach the sender
unchanged, raised by `ReadAhead.next`. When the session ends early (cancelled), a read in
progress is abandoned, not waited for: its reader closes the source when the read returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Final, Protocol

# A batch is this much audio (or this many chunks): one read per second of audio, little
# held.
BATCH_AUDIO_S: Final = 1.0
BATCH_MAX_CHUNKS: Final = 64
# Batches decoded ahead of the sender: enough that a paced sender never waits on a healthy
# store (a second of audio), few enough that a session holds at most three seconds (with
# the batch being read and the one being sent). Audio read ahead is marked for liveness
# when it is read (`batch.speech_gauge`): more ahead would count more unmeasured audio.
BATCHES_AHEAD: Final = 1
# A reader idle this long ends (a later batch starts a new one).
READER_IDLE_S: Final = 10.0
# A sender waiting this long for its batch has one more reader started (reads may be stuck).
READER_STALL_S: Final = 0.1

# One chunk of wire audio and the audio position (seconds) once it is sent.
Batch = list[tuple[bytes, float]]


class AudioSource(Protocol):
    """What a session streams: wire-ready chunks, and how much audio the chunks yielded so
    far hold (for pacing). Iterated in a worker thread: reads may block."""

    def __iter__(self) -> Iterator[bytes]: ...

    @property
    def position_s(self) -> float: ...


class _Readers:
    """Shared reader threads. `ask` queues a session's next read; while a reader is busy
    the read waits its turn (sessions that started together ask together: one reader takes
    them in turn, in milliseconds, rather than several contending for the GIL), else the
    reader that went idle last takes it. A sender that has waited `READER_STALL_S` for its
    batch calls `spare`: one more reader works, so a read stalled on a slow store (or more
    reads than one reader keeps up with, unpaced) holds up other sessions no longer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._asked: deque[ReadAhead] = deque()
        self._idle: list[threading.Lock] = []  # each idle reader waits on its own lock
        self._readers = 0
        self._started_at = -math.inf

    def ask(self, reader: ReadAhead) -> None:
        with self._lock:
            self._asked.append(reader)
            busy = self._readers - len(self._idle)
            parked = self._idle.pop() if self._idle and not busy else None
            start = self._readers == 0
        if parked is not None:
            parked.release()
        elif start:
            self._start()

    def spare(self) -> None:
        """Reads wait (one may be stalled, or there are more than one reader keeps up
        with): wake an idle reader, or start one more (at most one a `READER_STALL_S`,
        however many senders wait)."""
        with self._lock:
            if not self._asked:
                return
            parked = self._idle.pop() if self._idle else None
            if parked is None and time.monotonic() - self._started_at < READER_STALL_S:
                return
        if parked is not None:
            parked.release()
        else:
            self._start()

    def _start(self) -> None:
        with self._lock:
            self._readers += 1
            self._started_at = time.monotonic()
        threading.Thread(target=self._serve, name="pulse-batch-reader", daemon=True).start()

    def _serve(self) -> None:
        parked = threading.Lock()
        parked.acquire()
        while True:
            with self._lock:
                reader = self._asked.popleft() if self._asked else None
                if reader is None:
                    self._idle.append(parked)
            if reader is not None:
                reader.fill()
            elif not parked.acquire(timeout=READER_IDLE_S):
                with self._lock:
                    if parked in self._idle:  # not handed work while timing out: end
                        self._idle.remove(parked)
                        self._readers -= 1
                        return
                parked.acquire()  # handed work as it timed out: the release is coming


_READERS = _Readers()


class ReadAhead:
    """One pass over an `AudioSource` by the shared readers: the sender takes batches with
    `next` (each taken lets the next be read); `close` when the session is over, however
    it ended."""

    def __init__(self, source: AudioSource) -> None:
        self._source = source
        self._chunks: Iterator[bytes] | None = None
        self._lock = threading.Lock()
        self._reading = False
        self._closed = False
        # The queue between the readers and the sender; the sender's wait when it is empty.
        self._queue_lock = threading.Lock()
        self._ready: deque[Batch] = deque()
        self._error: BaseException | None = None  # what the source raised, after the batches
        self._asked = False  # a read is queued or under way
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def next_batch(self) -> Batch:
        """The next chunks (empty at the end). Runs in a worker thread; blocks on reads."""
        with self._lock:
            if self._closed:
                return []
            self._reading = True
        try:
            if self._chunks is None:
                self._chunks = iter(self._source)
            batch: Batch = []
            for chunk in self._chunks:
                batch.append((chunk, self._source.position_s))
                held_s = batch[-1][1] - batch[0][1]
                if len(batch) >= BATCH_MAX_CHUNKS or held_s >= BATCH_AUDIO_S:
                    break
            return batch
        finally:
            with self._lock:
                self._reading = False
                if self._closed:  # the session ended during this read: clean up here
                    self._close_source()

    def _close_source(self) -> None:
        chunks, self._chunks = self._chunks, None
        close = getattr(chunks, "close", None)  # a generator: runs its `with` exits
        if close is not None:
            close()

    def fill(self) -> None:
        """Read one batch (a reader thread; blocks on reads) and hand it to the sender."""
        error: BaseException | None = None
        try:
            batch = self.next_batch()
        except BaseException as exc:  # raised to the sender, after the batches before it
            batch, error = [], exc
        with self._queue_lock:
            self._ready.append(batch)
            self._error = error
            self._asked = False
            waiter, self._waiter = self._waiter, None
        if waiter is not None and self._loop is not None:  # the sender waits: wake it
            with contextlib.suppress(RuntimeError):  # its loop closed: no one to wake
                self._loop.call_soon_threadsafe(_wake, waiter)

    async def next(self) -> Batch:
        """The next batch read (empty at the end), waiting if there is none yet; raises
        what the source raised. Taking one lets the next be read."""
        queue = self._queue_lock
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        while True:
            with queue:
                if self._ready:
                    batch = self._ready.popleft()
                    if not batch and self._error is not None:
                        raise self._error
                    ask = bool(batch) and self._ask()
                    break
                waiter = self._waiter = self._loop.create_future()
                ask = self._ask()
            if ask:
                _READERS.ask(self)
            spare = self._loop.call_later(READER_STALL_S, _READERS.spare)
            try:
                await waiter
            finally:
                spare.cancel()
        if ask:
            _READERS.ask(self)
        return batch

    def _ask(self) -> bool:
        """Whether to ask for a read now (the queue lock held): none under way, room."""
        if self._asked or self._closed or len(self._ready) >= BATCHES_AHEAD:
            return False
        self._asked = True
        return True

    def close(self) -> None:
        """Release the source (its file or connection): now, or when a read in progress
        returns. Safe to call more than once, from any thread."""
        with self._lock:
            self._closed = True
            reading = self._reading
        with self._queue_lock:
            self._waiter = None  # no wake for a sender that is gone (its loop may be too)
        if not reading:
            self._close_source()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # cancelled when the sender was
        waiter.set_result(None)
