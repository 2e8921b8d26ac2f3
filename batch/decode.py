"""Decode any media file with PyAV into the exact bytes a Pulse session expects.

Streaming throughout: frames are decoded, resampled and cut into wire chunks as they go, so
memory does not grow with the file's length. A URL input is decoded straight from the file
object `batch.storage` opens (range reads, no download first). PyAV, OS and storage errors
are translated into `InputError` with a kind a person can act on.

Timing: the first decoded frame's timestamp is honoured against the container's start, so
a sound at 3.10 s in playback is at 3.10 s of the audio we send (encoder delay and edit
lists are applied by FFmpeg; a stream that starts late is padded with silence).
"""

from __future__ import annotations

import logging
import os
import wave
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final, NoReturn

import av
import numpy as np

from batch import plausible, storage
from batch.chunker import Chunker
from batch.errors import InputError
from batch.pulse.protocol import OPUS_ENCODINGS, OPUS_FRAME_S, PCM_SAMPLE_BYTES

logger = logging.getLogger(__name__)

# Packed (interleaved) sample formats: PyAV 18 reads past the end of a planar frame of
# 8 or more channels (a segfault), so one channel is sliced out of interleaved samples.
_SAMPLE_FORMAT: Final = {
    "linear16": "s16",
    "linear32": "s32",
    "mulaw": "s16",
    "alaw": "s16",
    "opus": "s16",
    "ogg_opus": "s16",
}
# FFmpeg's resampler only mixes layouts it knows: above this many channels (17-23 and
# 25 or more have no standard layout) the mix is a plain mean of the channels, done here.
_SWR_MIX_MAX_CHANNELS: Final = 16
_G711_CODEC: Final = {"mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}
_RESAMPLE_BLOCK_S: Final = 0.5


@dataclass(frozen=True)
class ProbeInfo:
    """What a cheap look at the container says about one file."""

    path: str
    format_name: str
    duration_s: float | None
    stream_index: int
    codec: str
    sample_rate: int
    channels: int
    layout: str
    audio_streams: int
    video_streams: int


@dataclass(frozen=True)
class WireFormat:
    """What goes on the wire: mono ``encoding`` at ``sample_rate``, in chunks."""

    encoding: str
    sample_rate: int
    chunk_bytes: int = 4096

    @property
    def bytes_per_second(self) -> int:
        """For PCM encodings only (Opus is compressed: its rate varies)."""
        return self.sample_rate * PCM_SAMPLE_BYTES[self.encoding]

    @property
    def is_opus(self) -> bool:
        return self.encoding in OPUS_ENCODINGS

    @classmethod
    def with_chunk_ms(cls, encoding: str, sample_rate: int, chunk_ms: int) -> WireFormat:
        per_ms = sample_rate * PCM_SAMPLE_BYTES[encoding] / 1000
        sample_bytes = PCM_SAMPLE_BYTES[encoding]
        chunk = max(sample_bytes, int(per_ms * chunk_ms) // sample_bytes * sample_bytes)
        return cls(encoding, sample_rate, chunk)


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InputError("not_found", path, "file not found; check the path") from None
    except PermissionError:
        raise InputError("permission", path, "permission denied; check file access") from None
    if path.is_dir():
        raise InputError("not_media", path, "is a directory, not a media file")
    if not os.access(path, os.R_OK):
        raise InputError("permission", path, "permission denied; check file access")
    if size == 0:
        raise InputError("empty", path, "file is empty (0 bytes)")


# What PyAV reads: a local path, or a seekable file object for a URL.
Media = str | Any


@contextmanager
def _opened(
    location: str, storage_options: Mapping[str, Any] | None = None
) -> Iterator[tuple[Any, Media]]:
    """The open container and what it reads from; raises `InputError`."""
    if not storage.is_url(location):
        _check_file(Path(location))
        with _container(location, location) as container:
            yield container, location
        return
    with (
        storage.open_input(location, storage_options or {}) as handle,
        _container(handle, location) as container,
    ):
        yield container, handle


def _container(media: Media, location: str) -> Any:
    try:
        return av.open(media, metadata_errors="ignore")
    except PermissionError:
        raise InputError("permission", location, "permission denied; check file access") from None
    except (av.error.InvalidDataError, av.error.FFmpegError, UnicodeDecodeError) as exc:
        raise InputError(
            "not_media", location, f"not a readable audio or video file ({exc.__class__.__name__})"
        ) from exc
    except Exception as exc:  # a storage read failing under PyAV
        _raise_read_failure(location, exc)


def _raise_read_failure(location: str, exc: Exception) -> NoReturn:
    """A read that failed under PyAV: for a URL any error is the store's (an SDK raises its
    own types: botocore's and aiohttp's are not OSErrors), translated into the item error
    tree; for a local path only an OSError is, and anything else is ours: raised as is."""
    if storage.is_url(location) or isinstance(exc, OSError):
        raise storage.read_failure(location, exc) from exc
    raise exc


def _audio_stream(container: Any, path: str, stream_index: int | None) -> Any:
    streams = list(container.streams.audio)
    if not streams:
        raise InputError("no_audio", path, "has no audio stream")
    if stream_index is None:
        # FFmpeg's notion of the default stream (disposition), else the first.
        default = [s for s in streams if s.disposition & av.stream.Disposition.default]
        return (default or streams)[0]
    if stream_index >= len(streams):
        raise InputError(
            "no_audio", path, f"has {len(streams)} audio stream(s); stream_index {stream_index}"
        )
    return streams[stream_index]


def _duration_s(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration / av.time_base)
    return None


def probe(
    path: Path | str,
    stream_index: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ProbeInfo:
    """Read container metadata only (for a URL: a few ranges near the start); raises
    `InputError` for files we cannot use, or whose header cannot be true (`plausible`)."""
    source = str(path)
    with _opened(source, storage_options) as (container, media):
        stream = _audio_stream(container, source, stream_index)
        ctx = stream.codec_context
        info = ProbeInfo(
            path=source,
            format_name=str(container.format.name),
            duration_s=_duration_s(container, stream),
            stream_index=list(container.streams.audio).index(stream),
            codec=str(ctx.name),
            sample_rate=int(ctx.sample_rate or 0),
            channels=int(ctx.channels or 0),
            layout=str(ctx.layout.name) if ctx.layout else "unknown",
            audio_streams=len(container.streams.audio),
            video_streams=len(container.streams.video),
        )
    size = os.path.getsize(source) if isinstance(media, str) else getattr(media, "size", None)
    plausible.check(source, info.sample_rate, info.duration_s, size)
    return info


class _G711:
    """mulaw/alaw via FFmpeg's own encoders, fed s16 mono."""

    def __init__(self, encoding: str, sample_rate: int) -> None:
        ctx: Any = av.CodecContext.create(_G711_CODEC[encoding], "w")
        ctx.sample_rate = sample_rate
        ctx.layout = "mono"
        ctx.format = "s16"
        self._ctx = ctx
        self._rate = sample_rate

    def encode(self, pcm16: np.ndarray) -> bytes:
        frame = av.AudioFrame.from_ndarray(pcm16.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._rate
        return b"".join(bytes(p) for p in self._ctx.encode(frame))


def _s16_frame(samples: np.ndarray, rate: int) -> Any:
    frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


class _ByteSink:
    """A write-only file for PyAV's muxer: hands over what was written since last asked."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._parts = b"".join(self._parts), []
        return data


class _OpusEncoder:
    """libopus through PyAV: raw packets, or muxed into Ogg pages as they fill."""

    def __init__(self, rate: int, *, ogg: bool) -> None:
        self.frames = 0
        self._rate = rate
        self._sink = _ByteSink()
        self._container: Any = None
        if ogg:
            self._container = av.open(
                self._sink, "w", format="ogg", options={"page_duration": "100000"}
            )
            stream = self._container.add_stream("libopus", rate=rate, layout="mono")
            stream.codec_context.format = "s16"
            self._codec: Any = stream
        else:
            codec: Any = av.CodecContext.create("libopus", "w")
            codec.sample_rate, codec.layout, codec.format = rate, "mono", "s16"
            self._codec = codec

    def encode(self, frame: Any) -> Iterator[bytes]:
        if frame is not None:
            frame.pts = self.frames * int(self._rate * OPUS_FRAME_S)
            frame.time_base = Fraction(1, self._rate)
            self.frames += 1
        packets = self._codec.encode(frame)
        if self._container is None:
            yield from (bytes(p) for p in packets)
            return
        for packet in packets:
            self._container.mux(packet)
        data = self._sink.take()
        if data:
            yield data

    def flush(self) -> Iterator[bytes]:
        yield from self.encode(None)
        if self._container is not None:
            self._container.close()
            data = self._sink.take()
            if data:
                yield data


class DecodedAudio:
    """Iterates wire chunks of one channel selection of one file; counts what it produced.

    ``channel`` None mixes all channels down to mono; an int picks that channel.
    ``samples`` after iteration is the exact number of samples sent (the stored duration).
    """

    def __init__(
        self,
        path: Path | str,
        wire: WireFormat,
        *,
        channel: int | None = None,
        stream_index: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = str(path)  # a local path or a URL
        self.storage_options = storage_options or {}
        self.wire = wire
        self.channel = channel
        self.stream_index = stream_index
        self.samples = 0
        self.position_s = 0.0  # audio seconds in the chunks yielded so far (for pacing)

    @property
    def duration_s(self) -> float:
        return self.samples / self.wire.sample_rate

    def __iter__(self) -> Iterator[bytes]:
        self.position_s = 0.0
        if self.wire.is_opus:
            yield from self._opus_chunks()
            return
        chunker = Chunker(self.wire.chunk_bytes)
        per_second = self.wire.bytes_per_second
        sent = 0
        for pcm in self.wire_blocks():
            for chunk in chunker.feed(pcm):
                sent += len(chunk)
                self.position_s = sent / per_second
                yield chunk
        for chunk in chunker.rest():
            self.position_s = self.duration_s
            yield chunk

    def _opus_chunks(self) -> Iterator[bytes]:
        """20 ms Opus frames: one packet per message, or an Ogg stream in ~100 ms pages."""
        rate = self.wire.sample_rate
        size = int(rate * OPUS_FRAME_S)
        encoder = _OpusEncoder(rate, ogg=self.wire.encoding == "ogg_opus")
        fifo = av.AudioFifo()
        self.samples = 0
        for block in self._sample_blocks():
            self.samples += block.size
            fifo.write(_s16_frame(block, rate))
            while fifo.samples >= size:
                yield from encoder.encode(fifo.read(size))
                self.position_s = encoder.frames * OPUS_FRAME_S
        if fifo.samples:
            rest: Any = fifo.read()
            tail = rest.to_ndarray()[0]
            padded = np.concatenate([tail, np.zeros(size - tail.size, dtype=np.int16)])
            yield from encoder.encode(_s16_frame(padded, rate))
        yield from encoder.flush()
        self.position_s = self.duration_s

    def wire_blocks(self, observe: Callable[[np.ndarray], None] | None = None) -> Iterator[bytes]:
        """Encoded blocks of any size; ``observe`` sees each block's integer samples first."""
        self.samples = 0
        wire = self.wire
        g711 = _G711(wire.encoding, wire.sample_rate) if wire.encoding in _G711_CODEC else None
        for block in self._sample_blocks():
            self.samples += block.shape[-1]
            if observe is not None:
                observe(block)
            yield g711.encode(block) if g711 else block.tobytes()

    def _sample_blocks(self) -> Iterator[np.ndarray]:
        """Mono sample arrays at the wire rate in the wire's integer format."""
        path = self.path
        with _opened(path, self.storage_options) as (container, media):
            stream = _audio_stream(container, path, self.stream_index)
            channels = stream.codec_context.channels or 1
            if self.channel is not None and self.channel >= channels:
                raise InputError(
                    "no_audio", path, f"has {channels} channel(s); channel {self.channel} asked"
                )
            pick: int | None = self.channel
            if pick is None and channels > _SWR_MIX_MAX_CHANNELS:
                pick = _MEAN
            layout = "mono" if pick is None else None
            fmt = _SAMPLE_FORMAT[self.wire.encoding]
            resampler = av.AudioResampler(
                format=fmt,
                layout=layout,
                rate=self.wire.sample_rate,
                frame_size=max(1, int(self.wire.sample_rate * _RESAMPLE_BLOCK_S)),
            )
            playback_zero = (container.start_time or 0) / av.time_base
            first = direct = True
            rate = self.wire.sample_rate
            drop = 0  # priming samples before playback zero, at the wire rate
            decoded_s = 0.0
            try:
                for frame in container.decode(stream):
                    if first:
                        first = False
                        offset = round(
                            ((frame.time or 0.0) - playback_zero) * self.wire.sample_rate
                        )
                        if offset > 0:  # the stream starts late: pad so times match playback
                            yield np.zeros(
                                offset, dtype=np.int32 if fmt.startswith("s32") else np.int16
                            )
                        drop = max(0, -offset)
                    decoded_s += frame.samples / (frame.sample_rate or 1)
                    # Frames already as the wire wants them skip the resampler (a fifth of
                    # decoding's CPU), until one is not: from then on all go through it.
                    direct = direct and layout == "mono" and _as_wire(frame, fmt, rate)
                    for out in (frame,) if direct else resampler.resample(frame):
                        samples = _channel(out, pick)
                        if drop:
                            cut = min(drop, samples.size)
                            samples, drop = samples[cut:], drop - cut
                        if samples.size:
                            yield samples
                for out in resampler.resample(None):
                    yield _channel(out, pick)
            except av.error.FFmpegError as exc:
                raise InputError(
                    "decode_error",
                    path,
                    f"corrupt audio after {decoded_s:.2f} s; the item fails rather than store a"
                    f" partial transcript ({exc.__class__.__name__})",
                ) from exc
            except Exception as exc:  # the storage under a URL failed mid-read
                _raise_read_failure(path, exc)
            if first:
                raise InputError("no_audio", path, "audio stream holds no decodable samples")
            try:
                _check_complete(path, media, container, stream, decoded_s)
            except InputError:
                raise
            except Exception as exc:  # re-reading a URL's header failed
                _raise_read_failure(path, exc)


# A stream that decodes to less than its header declares was cut short (an interrupted copy
# or upload). Only the stream's own duration is trusted: container estimates from bitrate
# (mp3 without a header) can be off by more than this.
_TRUNCATED_SHARE = 0.9
_TRUNCATED_MIN_S = 0.5


def _declared_s(media: Media, container: Any, stream: Any) -> float | None:
    """The length the file's own header states, if it states one we can trust."""
    if container.format.name == "wav":
        # FFmpeg sizes a WAV by the file; the RIFF header still says what was meant.
        if not isinstance(media, str):
            media.seek(0)  # a URL's file object: the header is one more range read
        try:
            with wave.open(media) as header:
                frames, rate = header.getnframes(), header.getframerate()
                data_bytes = frames * header.getsampwidth() * header.getnchannels()
        except (wave.Error, EOFError, OSError):
            return None  # not plain PCM (float, extensible): trust FFmpeg
        # Recorders that stream to disk write 0 or 0xFFFFFFFF and never come back to fix it.
        if data_bytes == 0 or data_bytes >= 0xFFFFFFFF - 64 or rate <= 0:
            return None
        return float(frames / rate)
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _check_complete(path: str, media: Media, container: Any, stream: Any, decoded_s: float) -> None:
    declared_s = _declared_s(media, container, stream)
    if declared_s is None:
        return
    if decoded_s < declared_s * _TRUNCATED_SHARE and declared_s - decoded_s > _TRUNCATED_MIN_S:
        raise InputError(
            "decode_error",
            path,
            f"decoded {decoded_s:.2f} s of the {declared_s:.2f} s its header declares; the file"
            " looks truncated, so the item fails rather than store a partial transcript",
        )


_MEAN: Final = -1  # a pick that means: the mean of every channel


def _as_wire(frame: Any, fmt: str, rate: int) -> bool:
    """Whether ``frame`` is mono samples in ``fmt`` at ``rate``: what the resampler makes."""
    return bool(
        frame.format.name == fmt and frame.sample_rate == rate and frame.layout.nb_channels == 1
    )


def _channel(frame: Any, pick: int | None) -> np.ndarray:
    """One mono row of a packed frame: already mono (None), one channel, or the mean."""
    data: np.ndarray = frame.to_ndarray()[0]
    if pick is None:
        return data
    interleaved = data.reshape(-1, frame.layout.nb_channels)
    if pick == _MEAN:
        mean: np.ndarray = np.rint(interleaved.mean(axis=1, dtype=np.float64))
        return mean.astype(data.dtype)
    return np.ascontiguousarray(interleaved[:, pick])
