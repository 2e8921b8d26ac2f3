"""Read a session's audio ahead in a worker thread, so blocking reads stay off the event loop.

A decoder pulls bytes from a local disk, a cache file or object storage; any of them can
block (a slow S3 range read, a stalled NFS mount). Done on the event loop, that one read
would stall the pacing, keepalives and timeouts of every other session of the job. Here the
`AudioSource` is iterated in a worker thread, a batch of chunks at a time, into a bounded
queue the sender drains: at most ``BATCHES_AHEAD`` batches (a few seconds of audio) are
held, so memory stays flat whatever the file's length, and each chunk carries the audio
position reached with it, so pacing is as exact as when the sender read the source itself.

One worker thread reads the whole source (`pump`), and the event loop is woken only when
the sender waits for a batch: a sender that keeps ahead (the usual case, paced) takes each
batch from the queue without a thread hop (one per batch cost a wake of the loop each).

Errors the source raises (`batch.errors.InputError` and its subclasses) reach the sender
unchanged. When the session ends early (cancelled), a read in progress is abandoned, not
waited for: the worker closes the source when that read returns.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterator
from typing import Final, Protocol

import anyio
import anyio.to_thread

# A batch is this much audio (or this many chunks): one thread hop per second of audio
# (each wakes the event loop and a worker; at 0.5 s they were a fifth of a paced
# session's CPU), little held.
BATCH_AUDIO_S: Final = 1.0
BATCH_MAX_CHUNKS: Final = 64
# Batches decoded ahead of the sender: enough that a paced sender never waits on a healthy
# store (a second of audio), few enough that a session holds at most three seconds (with
# the batch being read and the one being sent). Audio read ahead is marked for liveness
# when it is read (`batch.speech_gauge`): more ahead would count more unmeasured audio.
BATCHES_AHEAD: Final = 1

# One chunk of wire audio and the audio position (seconds) once it is sent.
Batch = list[tuple[bytes, float]]


class AudioSource(Protocol):
    """What a session streams: wire-ready chunks, and how much audio the chunks yielded so
    far hold (for pacing). Iterated in a worker thread: reads may block."""

    def __iter__(self) -> Iterator[bytes]: ...

    @property
    def position_s(self) -> float: ...


class ReadAhead:
    """One pass over an `AudioSource` in a worker thread: `pump` (a task) fills a bounded
    queue, the sender takes batches with `next`; `close` when the session is over, however
    it ended."""

    def __init__(self, source: AudioSource) -> None:
        self._source = source
        self._chunks: Iterator[bytes] | None = None
        self._lock = threading.Lock()
        self._reading = False
        self._closed = False
        # Each session reads in its own thread: a stalled store holds that thread only,
        # never a slot of anyio's shared pool that other sessions' reads need.
        self._limiter = anyio.CapacityLimiter(1)
        # The queue between the reader and the sender, and the sender's wait when it is empty.
        self._queue_lock = threading.Condition()
        self._ready: deque[Batch] = deque()
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

    async def pump(self) -> None:
        """Read the source in a worker thread until it ends (or `close`), never holding
        more than ``BATCHES_AHEAD`` batches the sender has not taken. Raises what the
        source raised; cancelled, the read in progress is abandoned (see `close`)."""
        self._loop = asyncio.get_running_loop()
        await anyio.to_thread.run_sync(
            self._read_all, limiter=self._limiter, abandon_on_cancel=True
        )

    def _read_all(self) -> None:  # the worker thread
        queue = self._queue_lock
        while True:
            with queue:
                while len(self._ready) >= BATCHES_AHEAD and not self._closed:
                    queue.wait()
                if self._closed:
                    return
            batch = self.next_batch()
            with queue:
                self._ready.append(batch)
                waiter, self._waiter = self._waiter, None
            if waiter is not None and self._loop is not None:  # the sender waits: wake it
                self._loop.call_soon_threadsafe(_wake, waiter)
            if not batch:
                return

    async def next(self) -> Batch:
        """The next batch the worker read (empty at the end), waiting if there is none yet.
        Taking one lets the worker read another."""
        queue = self._queue_lock
        while True:
            with queue:
                if self._ready:
                    batch = self._ready.popleft()
                    queue.notify()
                    return batch
                self._waiter = waiter = asyncio.get_running_loop().create_future()
            await waiter

    def close(self) -> None:
        """Release the source (its file or connection): now, or when a read in progress
        returns; the worker stops. Safe to call more than once, from any thread."""
        with self._lock:
            self._closed = True
            reading = self._reading
        with self._queue_lock:
            self._waiter = None  # no wake for a sender that is gone (its loop may be too)
            self._queue_lock.notify_all()
        if not reading:
            self._close_source()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():  # cancelled when the sender was
        waiter.set_result(None)
