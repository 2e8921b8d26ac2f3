"""Two-channel contact-centre calls made from real speech, for the skip-silence tests and
benchmarks: two parties speaking in turns (each channel quiet while the other talks), hold
music (a melody of tones) on the agent's line, and a noise floor under everything.

The speech is the project's own demo clips (tests) or espeak-ng voices (benchmarks); the
mixing is numpy and the file is written with PyAV.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from tests.media import DEMO_CLIPS, SPEECH, write_audio

RATE = 16000
NOISE_DBFS = -60.0  # a line's hiss, under the local server's -45 dBFS speech level
MUSIC_DBFS = -18.0


@dataclass(frozen=True)
class Turn:
    channel: int
    start_s: float
    text: str
    length_s: float


@dataclass
class Call:
    path: Path
    duration_s: float
    turns: list[Turn] = field(default_factory=list)
    music: list[tuple[float, float]] = field(default_factory=list)  # (start_s, end_s), ch 0

    def speech_s(self, channel: int) -> float:
        return sum(t.length_s for t in self.turns if t.channel == channel)


def load_clip(path: Path, rate: int = RATE) -> np.ndarray:
    """A media file as float32 mono at ``rate`` (PyAV decode and resample)."""
    with av.open(str(path)) as container:
        resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        frames = [
            out.to_ndarray()[0]
            for frame in container.decode(audio=0)
            for out in resampler.resample(frame)
        ]
        frames += [out.to_ndarray()[0] for out in resampler.resample(None)]
    return np.concatenate(frames).astype(np.float32)


def demo_voices() -> list[tuple[str, np.ndarray]]:
    """The demo clips with what they say."""
    return [(text, load_clip(DEMO_CLIPS / name)) for name, text in SPEECH.items()]


def espeak_voice(text: str, voice: str, folder: Path, rate: int = RATE) -> np.ndarray:
    """``text`` spoken by espeak-ng's ``voice`` (a Debian package; `make bench` adds it)."""
    folder.mkdir(parents=True, exist_ok=True)
    wav = folder / f"{abs(hash((text, voice)))}.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True, timeout=60
    )
    return load_clip(wav, rate)


def _dbfs(level: float) -> float:
    return float(10 ** (level / 20))


def hold_music(length_s: float, rng: random.Random, rate: int = RATE) -> np.ndarray:
    """Chords of sine tones, half a second or a second each: music, not speech. (A lone
    melody line of sines with harmonics can sound vowel-like enough for the detector to
    keep a moment of it; chords, like real hold music, do not.)"""
    chords = [(262, 330, 392), (294, 370, 440), (330, 415, 494), (349, 440, 523), (392, 494, 587)]
    out = np.zeros(round(length_s * rate), dtype=np.float32)
    position = 0
    while position < out.size:
        n = min(out.size - position, round(rng.choice([0.5, 1.0]) * rate))
        t = np.arange(n) / rate
        chord = sum(np.sin(2 * np.pi * hz * t) for hz in rng.choice(chords)) / 3
        envelope = np.minimum(1.0, np.minimum(t, (n - 1) / rate - t) / 0.05)
        out[position : position + n] = chord * envelope
        position += n
    return (out * _dbfs(MUSIC_DBFS)).astype(np.float32)


def make_call(
    path: Path,
    voices: Sequence[tuple[str, np.ndarray]],
    *,
    turns: int,
    seed: int,
    pause_s: tuple[float, float] = (0.8, 2.5),
    music_s: float = 0.0,
    rate: int = RATE,
) -> Call:
    """A stereo call (channel 0 the agent, 1 the customer) of ``turns`` turns taken in
    order from ``voices``, pauses drawn from ``pause_s``, and ``music_s`` of hold music
    on the agent's channel after the first turns. Written as 16-bit WAV at ``rate``."""
    rng = random.Random(seed)
    pieces: list[tuple[int, float, np.ndarray]] = []
    call = Call(path, 0.0)
    t = rng.uniform(*pause_s)
    for index in range(turns):
        text, audio = voices[index % len(voices)]
        channel = index % 2
        pieces.append((channel, t, audio))
        call.turns.append(Turn(channel, round(t, 3), text, audio.size / rate))
        t += audio.size / rate + rng.uniform(*pause_s)
        if index == 1 and music_s > 0:
            pieces.append((0, t, hold_music(music_s, rng, rate)))
            call.music.append((round(t, 3), round(t + music_s, 3)))
            t += music_s + rng.uniform(*pause_s)
    call.duration_s = round(t, 3)
    noise = np.random.default_rng(seed)
    tracks = [
        (noise.standard_normal(round(t * rate)) * _dbfs(NOISE_DBFS)).astype(np.float32)
        for _ in range(2)
    ]
    for channel, start_s, audio in pieces:
        start = round(start_s * rate)
        tracks[channel][start : start + audio.size] += audio
    write_audio(path, [np.clip(track, -1, 1) for track in tracks], rate)
    return call
