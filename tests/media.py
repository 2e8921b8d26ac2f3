"""Make real media files for tests with PyAV: tone bursts at known times, in any container.

Every test fixture is generated here (or is one of the project's own demo clips), so the
suite needs nothing outside the repository.
"""

from __future__ import annotations

import io
import re
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

DEMO_CLIPS = Path(__file__).resolve().parent.parent / "jobs" / "demo" / "clips"
SPEECH = {
    "callback.flac": "please call me back tomorrow morning about the invoice",
    "support.mp3": "thank you for calling customer support",
    "cancel.wav": "i would like to cancel my subscription",
}


def spoken_words(text: str) -> list[str]:
    """The words of ``text``, lower case, without punctuation."""
    return re.findall(r"[a-z']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's length: how far a transcript of a
    demo clip is from what the clip says."""
    ref, hyp = spoken_words(reference), spoken_words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(1, len(ref))


@dataclass(frozen=True)
class Burst:
    start_s: float
    length_s: float
    hz: float


def tone_track(bursts: Sequence[Burst], duration_s: float, rate: int) -> np.ndarray:
    """float32 mono: silence with sine bursts (10 ms fades so edges are clean)."""
    track = np.zeros(round(duration_s * rate), dtype=np.float32)
    fade = int(0.01 * rate)
    for burst in bursts:
        start = round(burst.start_s * rate)
        n = round(burst.length_s * rate)
        t = np.arange(n) / rate
        tone = 0.5 * np.sin(2 * np.pi * burst.hz * t)
        envelope = np.ones(n)
        envelope[:fade] = np.linspace(0, 1, fade)
        envelope[-fade:] = np.linspace(1, 0, fade)
        track[start : start + n] += (tone * envelope).astype(np.float32)
    return track


# (container format, codec, sample format, extension)
FORMATS = {
    "wav_s16": ("wav", "pcm_s16le", "s16", "wav"),
    "wav_u8": ("wav", "pcm_u8", "u8", "wav"),
    "wav_s24": ("wav", "pcm_s24le", "s32", "wav"),
    "wav_s32": ("wav", "pcm_s32le", "s32", "wav"),
    "wav_f32": ("wav", "pcm_f32le", "flt", "wav"),
    "wav_mulaw": ("wav", "pcm_mulaw", "s16", "wav"),
    "wav_alaw": ("wav", "pcm_alaw", "s16", "wav"),
    "aiff": ("aiff", "pcm_s16be", "s16", "aiff"),
    "flac_24": ("flac", "flac", "s32", "flac"),
    "mp3": ("mp3", "libmp3lame", "fltp", "mp3"),
    "m4a_aac": ("ipod", "aac", "fltp", "m4a"),
    "ogg_opus": ("ogg", "libopus", "s16", "ogg"),
    "webm_opus": ("webm", "libopus", "s16", "webm"),
}
LOSSY = {"mp3", "m4a_aac", "ogg_opus", "webm_opus", "mp4_video", "mkv_video", "mov_video"}


def write_audio(
    path: Path,
    channels: Sequence[np.ndarray],
    rate: int,
    *,
    container: str = "wav",
    codec: str = "pcm_s16le",
    sample_format: str = "s16",
) -> Path:
    """Encode float32 channel arrays (equal length) into ``path`` with PyAV."""
    layout = {1: "mono", 2: "stereo"}[len(channels)]
    planar = np.stack(channels).astype(np.float32)
    codec_rate = 48000 if codec == "libopus" else rate
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=codec_rate, layout=layout)
        stream.codec_context.format = sample_format
        _encode_whole(out, stream, planar, rate, sample_format, layout)
    return path


def tone_files(
    folder: Path,
    count: int,
    bursts: Sequence[Burst],
    duration_s: float,
    name: str = "item-{}.wav",
    rate: int = 16000,
) -> list[Path]:
    """``count`` mono WAV files of one tone track in ``folder`` (made if missing), named
    ``name.format(i)``: encoded once, copied."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name.format(i) for i in range(count)]
    if paths:
        write_audio(paths[0], [tone_track(bursts, duration_s, rate)], rate)
        data = paths[0].read_bytes()
        for path in paths[1:]:
            path.write_bytes(data)
    return paths


# Three short tones: a call whose three words the synthetic engine names.
CALL_BURSTS = [Burst(0.2, 0.15, 440), Burst(0.6, 0.15, 660), Burst(1.0, 0.15, 880)]


def tone_calls(
    folder: Path, count: int, duration_s: float = 1.4, bursts: Sequence[Burst] = CALL_BURSTS
) -> list[Path]:
    """``count`` calls ``call-0000.wav``... of ``bursts`` (three words by default)."""
    return tone_files(folder, count, bursts, duration_s, "call-{:04d}.wav")


def write_wav_channels(path: Path, channels: Sequence[np.ndarray], rate: int) -> Path:
    """A 16-bit WAV of any channel count (no channel mask, as multitrack recorders write)."""
    pcm = (np.stack(channels, axis=1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(len(channels))
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return path


def _encode_whole(
    out: Any, stream: Any, planar: np.ndarray, rate: int, sample_format: str, layout: str
) -> None:
    """Resample float32 planar audio for ``stream``'s encoder, encode it all and flush."""
    resampler = av.AudioResampler(format=sample_format, layout=layout, rate=stream.rate)
    frame = av.AudioFrame.from_ndarray(planar, format="fltp", layout=layout)
    frame.sample_rate = rate
    frame.pts = 0
    frame.time_base = Fraction(1, rate)
    for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
        for packet in stream.encode(chunk):
            out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)


def write_format(path: Path, kind: str, channels: Sequence[np.ndarray], rate: int) -> Path:
    container, codec, sample_format, _ = FORMATS[kind]
    return write_audio(
        path, channels, rate, container=container, codec=codec, sample_format=sample_format
    )


def write_video(
    path: Path, audio: np.ndarray | None, rate: int, container: str, duration_s: float = 2.0
) -> Path:
    """A small video (a few grey frames) with an AAC audio track (none if ``audio`` is None)."""
    duration_s = audio.size / rate if audio is not None else duration_s
    with av.open(str(path), "w", format=container) as out:
        video = out.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        sound = out.add_stream("aac", rate=rate, layout="mono") if audio is not None else None
        for i in range(int(duration_s * 10)):
            image = av.VideoFrame.from_ndarray(
                np.full((48, 64, 3), 128, dtype=np.uint8), format="rgb24"
            )
            image.pts = i
            for packet in video.encode(image):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio is not None and sound is not None:
            _encode_whole(out, sound, audio.reshape(1, -1), rate, "fltp", "mono")
    return path


def onsets_s(pcm16: bytes, rate: int, threshold: float = 0.05) -> list[float]:
    """Starts of bursts in mono s16 audio: the first 5 ms window over the threshold after
    at least 100 ms of quiet."""
    samples = np.frombuffer(pcm16, dtype=np.int16).astype(np.float32) / 32768
    window = int(0.005 * rate)
    usable = samples[: samples.size - samples.size % window].reshape(-1, window)
    loud = np.sqrt((usable**2).mean(axis=1)) > threshold
    found, quiet = [], 1_000
    for index, is_loud in enumerate(loud):
        if is_loud and quiet * window >= 0.1 * rate:
            found.append(index * window / rate)
        quiet = 0 if is_loud else quiet + 1
    return found


def write_mp3_probed_short(path: Path, head_s: float, body: np.ndarray, rate: int) -> Path:
    """An MP3 whose header understates its length, as a VBR file without a Xing header
    does: ``head_s`` of silence at 320 kb/s, then ``body`` (mono float32) at 32 kb/s, no
    Xing/Info frame and no ID3 tag. FFmpeg estimates the length from the first frame's
    bitrate and the file size, so it probes at a fraction of the real duration."""

    def segment(samples: np.ndarray, bit_rate: int) -> bytes:
        buffer = io.BytesIO()
        options = {"write_xing": "0", "id3v2_version": "0", "write_id3v1": "0"}
        with av.open(buffer, "w", format="mp3", options=options) as out:
            stream = out.add_stream("libmp3lame", rate=rate, layout="mono")
            stream.bit_rate = bit_rate
            pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)[None, :]
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = rate
            for packet in [*stream.encode(frame), *stream.encode(None)]:
                out.mux(packet)
        return buffer.getvalue()

    silence = np.zeros(int(head_s * rate), dtype=np.float32)
    path.write_bytes(segment(silence, 320_000) + segment(body, 32_000))
    return path


def long_audio(path: Path, seconds: float, rate: int = 16000, codec: str = "flac") -> Path:
    """A long file written a second at a time (never all in memory): a burst every 2 s."""
    second = tone_track([Burst(0.2, 0.5, 440)], 1.0, rate)
    quiet = np.zeros(rate, dtype=np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        fmt = "s16" if codec == "flac" else "fltp"
        stream.codec_context.format = fmt
        resampler = av.AudioResampler(format=fmt, layout="mono", rate=rate)
        for i in range(int(seconds)):
            frame = av.AudioFrame.from_ndarray(
                (second if i % 2 == 0 else quiet).reshape(1, -1), format="flt", layout="mono"
            )
            frame.sample_rate, frame.pts, frame.time_base = rate, i * rate, Fraction(1, rate)
            for chunk in resampler.resample(frame):
                for packet in stream.encode(chunk):
                    out.mux(packet)
        for chunk in resampler.resample(None):
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path
