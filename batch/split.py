"""Long recordings: cut at quiet points into pieces that stream on parallel sessions.

One decoding pass writes the item's wire-ready audio to a cache file and measures its
energy; `choose_cuts` (pure) picks the quietest moment near each target length; each piece
then streams as its own session straight from the cache (exact sample offsets, no second
decode). `stitch` puts the pieces' rows back into the original file's time base, computing
each piece's offset from its first sample, so nothing accumulates rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batch.collect import Collected, collect_finals, join_segments
from batch.decode import DecodedAudio, WireFormat
from batch.pulse.protocol import PCM_SAMPLE_BYTES, Transcription

FRAME_S = 0.02  # energy is measured on 20 ms frames
QUIET_SPAN_S = 0.3  # a cut aims at the middle of the quietest 300 ms


class EnergyMeter:
    """Mean square per frame of a stream of integer sample blocks."""

    def __init__(self, frame_samples: int, full_scale: float) -> None:
        self.frame = frame_samples
        self.full_scale = full_scale
        self._carry = np.zeros(0, dtype=np.float64)
        self._frames: list[np.ndarray] = []

    def feed(self, block: np.ndarray) -> None:
        samples = np.concatenate([self._carry, block.astype(np.float64) / self.full_scale])
        whole = samples.size - samples.size % self.frame
        if whole:
            self._frames.append((samples[:whole].reshape(-1, self.frame) ** 2).mean(axis=1))
        self._carry = samples[whole:]

    def energies(self) -> np.ndarray:
        tail = [np.array([(self._carry**2).mean()])] if self._carry.size else []
        return np.concatenate([*self._frames, *tail]) if self._frames or tail else np.zeros(0)


def choose_cuts(
    energy: np.ndarray, frame_samples: int, total_samples: int, target_s: float, window_s: float
) -> list[int]:
    """Sample offsets ``[0, c1, ..., total]``: each cut at the quietest point within
    ``window_s`` of ``target_s`` after the previous one. Pure."""
    frames_per_s = 1 / FRAME_S
    target = max(1, int(target_s * frames_per_s))
    window = max(1, min(int(window_s * frames_per_s), target // 2))
    span = max(1, int(QUIET_SPAN_S * frames_per_s))
    smoothed = np.convolve(energy, np.ones(span) / span, mode="same") if energy.size else energy
    cuts, position = [0], 0
    while energy.size - position > target + window:
        low, high = position + target - window, position + target + window
        quietest = low + int(np.argmin(smoothed[low:high]))
        cuts.append(quietest * frame_samples)
        position = quietest
    cuts.append(total_samples)
    return cuts


@dataclass(frozen=True)
class CachedAudio:
    """An item's wire bytes on disk and where to cut them."""

    path: Path
    bytes_per_sample: int
    cuts: list[int]  # sample offsets, first 0, last the total

    @property
    def total_samples(self) -> int:
        return self.cuts[-1]

    def pieces(self) -> list[tuple[int, int]]:
        return list(zip(self.cuts[:-1], self.cuts[1:], strict=True))


def cache_and_cut(
    audio: DecodedAudio, cache_path: Path, *, target_s: float, window_s: float
) -> CachedAudio:
    """Decode once into ``cache_path`` while measuring energy; raises `InputError`."""
    wire = audio.wire
    full_scale = 2**31 if wire.encoding == "linear32" else 2**15
    meter = EnergyMeter(max(1, int(wire.sample_rate * FRAME_S)), full_scale)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with cache_path.open("wb") as cache:
        for block in audio.wire_blocks(observe=meter.feed):
            cache.write(block)
    cuts = choose_cuts(meter.energies(), meter.frame, audio.samples, target_s, window_s)
    return CachedAudio(cache_path, PCM_SAMPLE_BYTES[wire.encoding], cuts)


class CachedSlice:
    """Wire chunks of samples ``[start, end)`` of a cache file, read as they are sent."""

    def __init__(self, cached: CachedAudio, start: int, end: int, wire: WireFormat) -> None:
        self.cached = cached
        self.start = start
        self.end = end
        self.wire = wire

    @property
    def samples(self) -> int:
        return self.end - self.start

    @property
    def duration_s(self) -> float:
        return self.samples / self.wire.sample_rate

    def __iter__(self) -> Iterator[bytes]:
        width = self.cached.bytes_per_sample
        left = self.samples * width
        chunk = self.wire.chunk_bytes
        with self.cached.path.open("rb") as source:
            source.seek(self.start * width)
            while left > 0:
                data = source.read(min(chunk, left))
                if not data:
                    return
                left -= len(data)
                yield data


@dataclass(frozen=True)
class PieceResult:
    index: int
    start_sample: int
    finals: Sequence[Transcription]


def stitch(pieces: Sequence[PieceResult], sample_rate: int) -> Collected:
    """One item's rows from its pieces, in the original file's time base."""
    out = Collected()
    texts: list[str] = []
    segments = 0
    for piece in sorted(pieces, key=lambda p: p.index):
        part = collect_finals(piece.finals, offset_s=piece.start_sample / sample_rate)
        texts.append(part.transcript)
        out.language = part.language or out.language
        out.words += [_renumbered(w, len(out.words), piece.index, segments) for w in part.words]
        out.utterances += [
            {**u, "idx": len(out.utterances) + n, "piece": piece.index}
            for n, u in enumerate(part.utterances)
        ]
        segments += len(piece.finals)
    out.transcript = join_segments(texts)
    return out


def _renumbered(word: dict[str, Any], base: int, piece: int, segments: int) -> dict[str, Any]:
    return {
        **word,
        "idx": base + word["idx"],
        "segment": segments + word["segment"],
        "piece": piece,
    }
