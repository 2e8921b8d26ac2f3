"""Long recordings: cut at quiet points into pieces that stream on parallel sessions.

One decoding pass writes the item's wire-ready audio to a cache file and measures its
energy; `choose_cuts` (pure) picks the quietest moment near each target length; each piece
then streams as its own session straight from the cache (exact sample offsets, no second
decode). `stitch` puts the pieces' rows back into the original file's time base, computing
each piece's offset from its first sample, so nothing accumulates rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import numpy as np

from batch.chunker import Chunker
from batch.collect import Collected, collect_finals, first_seen, join_segments
from batch.decode import DecodedAudio, WireFormat
from batch.errors import OutputError
from batch.pulse.protocol import PCM_SAMPLE_BYTES, Transcription
from batch.timemap import TimeMap

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

    def take(self, *, final: bool = False) -> np.ndarray:
        """Frames measured since the last call (with the partial last frame if final)."""
        parts = self._frames
        if final and self._carry.size:
            parts = [*parts, np.array([(self._carry**2).mean()])]
            self._carry = np.zeros(0)
        self._frames = []
        return np.concatenate(parts) if parts else np.zeros(0)


class Cutter:
    """Chooses cut points as energy arrives, so early pieces can stream while the rest of
    the file is still being decoded. Pure: energies in, sample offsets out.

    Each cut is the middle of the quietest ``QUIET_SPAN_S`` within ``window_s`` of
    ``target_s`` after the previous cut.
    """

    def __init__(
        self, frame_samples: int, target_s: float, window_s: float, pieces: int | None = None
    ) -> None:
        frames_per_s = 1 / FRAME_S
        self.frame_samples = frame_samples
        self.exact_target = target_s * frames_per_s
        self.target = max(1, int(self.exact_target))
        self.window = max(1, min(int(window_s * frames_per_s), self.target // 2))
        self.span = max(1, int(QUIET_SPAN_S * frames_per_s))
        self.pieces = pieces  # a set count: cut k aims at k x target from the start
        self._energy = np.zeros(1024)
        self._count = 0
        self._cuts = 0
        self._position = 0  # frame of the last cut

    def feed(self, energies: np.ndarray) -> list[int]:
        """New cuts (sample offsets) that the energy so far settles."""
        needed = self._count + energies.size
        if needed > self._energy.size:
            grown = np.zeros(max(needed, 2 * self._energy.size))
            grown[: self._count] = self._energy[: self._count]
            self._energy = grown
        self._energy[self._count : needed] = energies
        self._count = needed
        cuts = []
        while (cut := self._next_cut(final=False)) is not None:
            cuts.append(cut)
        return cuts

    def finish(self) -> list[int]:
        """The cuts left once all the energy is in (the total is not included)."""
        cuts = []
        while (cut := self._next_cut(final=True)) is not None:
            cuts.append(cut)
        return cuts

    def _aim(self) -> int | None:
        """The frame the next cut aims at; None when no cut is left to make."""
        if self.pieces is None:
            return self._position + self.target
        if self._cuts >= self.pieces - 1:
            return None
        # Aiming at k x target (not target after the last cut) keeps the pieces from
        # drifting, so the last one is as long as the others, never a lone extra piece.
        return max(round((self._cuts + 1) * self.exact_target), self._position + self.window + 1)

    def _next_cut(self, *, final: bool) -> int | None:
        aim = self._aim()
        if aim is None or self._count <= aim + self.window:
            return None
        low = aim - self.window
        high = aim + self.window
        half = self.span // 2
        if not final and self._count < high + half:
            return None  # the smoothing around the window needs a little more audio
        start = max(0, low - half)
        around = self._energy[start : min(self._count, high + half)]
        smoothed = np.convolve(around, np.ones(self.span) / self.span, mode="same")
        frames = np.arange(low, high)
        # The quietest span; among equally quiet ones the nearest the target length.
        nearest = np.abs(frames - aim) * 1e-12
        middle = low + int(np.argmin(smoothed[low - start : high - start] + nearest))
        # Then the quietest single frame inside that span, so a short pause between two
        # sounds is found even when every 300 ms span holds some sound.
        lo, hi = max(self._position + 1, middle - half), min(self._count, middle + half + 1)
        inside = np.arange(lo, hi)
        quietest = lo + int(np.argmin(self._energy[lo:hi] + np.abs(inside - middle) * 1e-12))
        self._position = quietest
        self._cuts += 1
        return quietest * self.frame_samples + self.frame_samples // 2  # mid-frame


def choose_cuts(
    energy: np.ndarray,
    frame_samples: int,
    total_samples: int,
    target_s: float,
    window_s: float,
    pieces: int | None = None,
) -> list[int]:
    """Sample offsets ``[0, c1, ..., total]`` for a whole energy curve at once. Pure."""
    cutter = Cutter(frame_samples, target_s, window_s, pieces)
    cuts = [0, *cutter.feed(energy), *cutter.finish()]
    return [*(c for c in cuts if c < total_samples), total_samples]


def piece_count(duration_s: float, target_s: float, sessions: int) -> int:
    """How many pieces to cut a recording into so they fill ``sessions`` free sessions in
    whole rounds (5 pieces on 4 sessions run the last one alone; 8 shorter ones do not),
    as long as pieces stay at least half ``target_s`` long. Pure."""
    least = max(1, math.ceil(duration_s / target_s))
    sessions = max(1, sessions)
    rounded = math.ceil(least / sessions) * sessions
    if duration_s / rounded >= target_s / 2:
        return rounded
    return max(least, min(sessions, int(duration_s // (target_s / 2))))


def stream_energy(energy: np.ndarray, frame_samples: int, timemap: TimeMap) -> np.ndarray:
    """The energy per frame of what ``timemap`` streams (its gaps are silent), from the
    source's energy per frame: where to cut the stream of a recording with silence
    skipped. Pure."""
    parts = []
    for segment in timemap.segments():
        if isinstance(segment, int):
            parts.append(np.zeros(segment // frame_samples))
        else:
            start, length = segment
            first = start // frame_samples
            parts.append(energy[first : first + length // frame_samples])
    return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(frozen=True)
class CachedAudio:
    """An item's wire bytes on disk and where to cut them."""

    path: Path
    cuts: list[int]  # sample offsets, first 0, last the total

    @property
    def total_samples(self) -> int:
        return self.cuts[-1]

    def pieces(self) -> list[tuple[int, int]]:
        return list(zip(self.cuts[:-1], self.cuts[1:], strict=True))


def full_scale(wire: WireFormat) -> float:
    """The largest magnitude of the integer samples decoding yields for ``wire``."""
    return float(2**31 if wire.encoding == "linear32" else 2**15)


def frame_samples(wire: WireFormat) -> int:
    return max(1, int(wire.sample_rate * FRAME_S))


def cache_audio(
    audio: DecodedAudio, cache_path: Path, observers: Sequence[Callable[[np.ndarray], None]]
) -> int:
    """Decode the whole item into ``cache_path`` (wire bytes), showing each block of
    integer samples to every observer; returns the samples written. Raises `InputError`."""

    def observe(block: np.ndarray) -> None:
        for observer in observers:
            observer(block)

    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with cache_path.open("wb") as cache:
        for block in audio.wire_blocks(observe=observe):
            cache.write(block)
    return audio.samples


def cache_and_cut(
    audio: DecodedAudio,
    cache_path: Path,
    *,
    target_s: float,
    window_s: float,
    pieces: int | None = None,
    on_piece: Callable[[int, int], None] = lambda start, end: None,
) -> CachedAudio:
    """Decode once into ``cache_path`` while measuring energy; calls ``on_piece(start, end)``
    as soon as each piece is settled and on disk. Raises `InputError`, and `OutputError`
    when the cache cannot be written."""
    wire = audio.wire
    meter = EnergyMeter(frame_samples(wire), full_scale(wire))
    cutter = Cutter(meter.frame, target_s, window_s, pieces)
    cuts = [0]
    with cache_io(cache_path, "write the audio cache"):
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache = cache_path.open("wb", buffering=0)  # an error at its write, not at close
    with cache:
        for block in audio.wire_blocks(observe=meter.feed):
            with cache_io(cache_path, "write the audio cache"):
                cache.write(block)
            settled = cutter.feed(meter.take())
            for cut in settled:  # unbuffered: a piece's bytes are in the file as it streams
                on_piece(cuts[-1], cut)
                cuts.append(cut)
    cutter.feed(meter.take(final=True))
    for cut in [*cutter.finish(), audio.samples]:
        if cut > cuts[-1]:
            on_piece(cuts[-1], cut)
            cuts.append(cut)
    return CachedAudio(cache_path, cuts)


@contextmanager
def cache_io(path: Path, operation: str) -> Iterator[None]:
    """An OS error on the run's audio cache (in the output's scratch folder: disk full, the
    folder removed) as what it is, an `OutputError` (exit 5), never a lost connection."""
    try:
        yield
    except OSError as exc:
        raise OutputError(path, operation, exc.strerror or exc.__class__.__name__) from exc


# One sample of silence in each PCM wire encoding (G.711 codes zero as these bytes).
_SILENCE: Final = {"linear16": b"\0\0", "linear32": b"\0\0\0\0", "mulaw": b"\xff", "alaw": b"\xd5"}


class CachedSlice:
    """Wire chunks of what a `TimeMap` streams from a cache file: its spans read as they
    are sent, its gaps as silence."""

    def __init__(self, path: Path, timemap: TimeMap, wire: WireFormat) -> None:
        self.path = path
        self.timemap = timemap
        self.wire = wire
        self.position_s = 0.0

    @property
    def samples(self) -> int:
        return self.timemap.streamed

    @property
    def duration_s(self) -> float:
        return self.timemap.streamed_s

    def __iter__(self) -> Iterator[bytes]:
        width = PCM_SAMPLE_BYTES[self.wire.encoding]
        per_second = width * self.wire.sample_rate
        chunker = Chunker(self.wire.chunk_bytes)
        sent = 0
        self.position_s = 0.0  # a retry streams the slice again from its start
        with cache_io(self.path, "read the audio cache"), self.path.open("rb") as source:
            for part in self._parts(source, width):
                for chunk in chunker.feed(part):
                    sent += len(chunk)
                    self.position_s = sent / per_second
                    yield chunk
        for chunk in chunker.rest():
            sent += len(chunk)
            self.position_s = sent / per_second
            yield chunk

    def _parts(self, source: BinaryIO, width: int) -> Iterator[bytes]:
        block = max(width, self.wire.chunk_bytes * 16)
        for segment in self.timemap.segments():
            if isinstance(segment, int):
                yield _SILENCE[self.wire.encoding] * segment
                continue
            start, length = segment
            source.seek(start * width)
            left = length * width
            while left > 0:
                data = source.read(min(block, left))
                if not data:
                    return  # the cache is shorter than the map: send what there is
                left -= len(data)
                yield data


@dataclass(frozen=True)
class PieceResult:
    index: int
    timemap: TimeMap
    finals: Sequence[Transcription]
    languages: Sequence[str] = ()
    full_transcript: str | None = None


def stitch(pieces: Sequence[PieceResult]) -> Collected:
    """One item's rows from its pieces, in the original file's time base."""
    out = Collected()
    texts: list[str] = []
    full_texts: list[str] = []
    segments = 0
    for piece in sorted(pieces, key=lambda p: p.index):
        part = collect_finals(
            piece.finals,
            timemap=piece.timemap,
            languages=piece.languages,
            full_transcript=piece.full_transcript,
        )
        texts.append(part.transcript)
        out.language = part.language or out.language
        out.languages = first_seen(out.languages, part.languages)
        out.redacted_entities += part.redacted_entities
        if part.full_transcript is not None:
            full_texts.append(part.full_transcript)
        out.segments += [
            {**s, "segment": segments + s["segment"], "piece": piece.index} for s in part.segments
        ]
        out.words += [_renumbered(w, len(out.words), piece.index, segments) for w in part.words]
        out.utterances += [
            {**u, "idx": len(out.utterances) + n, "piece": piece.index}
            for n, u in enumerate(part.utterances)
        ]
        segments += len(piece.finals)
    out.transcript = join_segments(texts)
    # Each piece's session knows only its own text: the whole is the pieces', in order.
    out.full_transcript = join_segments(full_texts) if full_texts else None
    return out


def _renumbered(word: dict[str, Any], base: int, piece: int, segments: int) -> dict[str, Any]:
    return {
        **word,
        "idx": base + word["idx"],
        "segment": segments + word["segment"],
        "piece": piece,
    }
