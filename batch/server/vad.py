"""Energy voice-activity segmentation of one session's audio stream.

Pure and synchronous: feed samples in, get closed `Segment`s out. The stream is cut
into 20 ms frames; a frame is speech when its RMS is at or above an absolute level
(-45 dBFS by default). A segment opens at the first speech frame (with a short
pre-roll so the recogniser hears the onset), closes after ``close_silence_s`` of
silence, and is force-cut at its quietest frame when it grows past ``max_segment_s``
so that one endless talker still gets finals. Silence between segments is dropped.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from batch.server.audio import Samples


def dbfs_to_rms(dbfs: float) -> float:
    return float(10.0 ** (dbfs / 20.0))


@dataclass(frozen=True)
class Segment:
    """A contiguous stretch of the session's audio; ``start_sample`` is session-relative."""

    index: int
    start_sample: int
    audio: Samples
    sample_rate: int

    @property
    def start_s(self) -> float:
        return self.start_sample / self.sample_rate

    @property
    def duration_s(self) -> float:
        return len(self.audio) / self.sample_rate


class Segmenter:
    """Splits a stream into speech segments; see the module docstring for the rules."""

    def __init__(
        self,
        sample_rate: int,
        *,
        threshold_dbfs: float = -45.0,
        frame_s: float = 0.02,
        close_silence_s: float = 0.6,
        max_segment_s: float = 25.0,
        pre_roll_s: float = 0.2,
    ) -> None:
        self.sample_rate = sample_rate
        self._frame = max(1, round(sample_rate * frame_s))
        self._threshold = dbfs_to_rms(threshold_dbfs)
        self._close_frames = max(1, round(close_silence_s / frame_s))
        self._max_frames = max(2, round(max_segment_s / frame_s))
        self._pre_roll: deque[Samples] = deque(maxlen=round(pre_roll_s / frame_s))
        self._carry = np.zeros(0, dtype=np.float32)
        self._framed = 0  # session samples already cut into frames
        self._next_index = 0
        # The open segment (empty lists when none is open).
        self._frames: list[Samples] = []
        self._rms: list[float] = []
        self._start = 0
        self._silent_run = 0

    @property
    def samples_received(self) -> int:
        return self._framed + len(self._carry)

    @property
    def is_open(self) -> bool:
        return bool(self._frames)

    @property
    def open_samples(self) -> int:
        """Length of the open segment so far (0 when none is open)."""
        return sum(len(frame) for frame in self._frames)

    def push(self, samples: Samples) -> list[Segment]:
        """Add samples; returns the segments this closed, oldest first."""
        buffer = np.concatenate((self._carry, samples)) if len(self._carry) else samples
        whole = len(buffer) - len(buffer) % self._frame
        self._carry = buffer[whole:]
        frames = buffer[:whole].reshape(-1, self._frame)
        levels = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
        closed: list[Segment] = []
        for frame, level in zip(frames, levels, strict=True):
            segment = self._add_frame(frame, float(level))
            if segment is not None:
                closed.append(segment)
        return closed

    def flush(self) -> list[Segment]:
        """Close the open segment, if any, including a trailing partial frame. The
        pre-roll goes too: audio after a flush (``finalize``) starts afresh, as a new
        session's would."""
        self._pre_roll.clear()
        if not self._frames:
            self._framed += len(self._carry)
            self._carry = np.zeros(0, dtype=np.float32)
            return []
        self._frames.append(self._carry)
        self._framed += len(self._carry)
        self._carry = np.zeros(0, dtype=np.float32)
        return [self._close(len(self._frames))]

    def snapshot(self) -> Segment | None:
        """The open segment so far (for partial results), or None."""
        if not self._frames:
            return None
        audio = np.concatenate(self._frames)
        return Segment(self._next_index, self._start, audio, self.sample_rate)

    def _add_frame(self, frame: Samples, level: float) -> Segment | None:
        position = self._framed
        self._framed += len(frame)
        speech = level >= self._threshold
        if not self._frames:
            if speech:
                self._start = position - len(self._pre_roll) * self._frame
                self._frames = [*self._pre_roll, frame]
                self._rms = [0.0] * len(self._pre_roll) + [level]
                self._pre_roll.clear()
                self._silent_run = 0
            else:
                self._pre_roll.append(frame)
            return None
        self._frames.append(frame)
        self._rms.append(level)
        self._silent_run = 0 if speech else self._silent_run + 1
        if self._silent_run >= self._close_frames:
            return self._close(len(self._frames))
        if len(self._frames) >= self._max_frames:
            return self._force_cut()
        return None

    def _force_cut(self) -> Segment:
        # Cut after the quietest frame of the second half, so neither piece is tiny.
        half = len(self._rms) // 2
        cut = half + int(np.argmin(self._rms[half:])) + 1
        return self._close(cut)

    def _close(self, n_frames: int) -> Segment:
        """Emit the first ``n_frames`` frames as a segment; the rest stays open."""
        audio = np.concatenate(self._frames[:n_frames])
        segment = Segment(self._next_index, self._start, audio, self.sample_rate)
        self._next_index += 1
        rest_frames, rest_rms = self._frames[n_frames:], self._rms[n_frames:]
        self._start += len(audio)
        self._frames, self._rms = rest_frames, rest_rms
        self._silent_run = 0
        if not any(level >= self._threshold for level in rest_rms):
            # Only silence is left: it becomes pre-roll, not a segment of its own.
            self._pre_roll.extend(rest_frames)
            self._frames, self._rms = [], []
            return segment
        for level in reversed(rest_rms):
            if level >= self._threshold:
                break
            self._silent_run += 1
        return segment
