"""Wire audio to float32 mono samples: linear16, linear32, G.711 mu-law / A-law, and Opus.

PCM is pure numpy (no ``audioop``, which is deprecated). Frames may split a sample across
WebSocket messages, so the decoder carries the odd bytes over to the next call. Opus comes
as one packet per message (``opus``) or as an Ogg stream cut anywhere (``ogg_opus``); both
are decoded with FFmpeg's libopus through PyAV and resampled to the declared rate.
"""

from __future__ import annotations

from typing import Any, Protocol

import av
import numpy as np

from batch.pcm import ALAW_TABLE as ALAW_TABLE
from batch.pcm import MULAW_TABLE as MULAW_TABLE
from batch.pcm import Samples as Samples
from batch.pcm import decode_pcm as decode_pcm
from batch.pulse.protocol import PCM_SAMPLE_BYTES


class WireDecoder:
    """Stateful decoder for one session's binary frames in one PCM ``encoding``.

    Raises ``ValueError`` at construction for encodings it cannot decode (opus kinds).
    """

    def __init__(self, encoding: str) -> None:
        if encoding not in PCM_SAMPLE_BYTES:
            raise ValueError(f"encoding {encoding!r} is not supported by the local server")
        self.encoding = encoding
        self._width = PCM_SAMPLE_BYTES[encoding]
        self._carry = b""

    def decode(self, data: bytes) -> Samples:
        """Samples for every whole sample in ``data`` plus the bytes carried over."""
        buffer = self._carry + data
        whole = len(buffer) - len(buffer) % self._width
        self._carry = buffer[whole:]
        return decode_pcm(buffer[:whole], self.encoding)


class Decoder(Protocol):
    def decode(self, data: bytes) -> Samples: ...


class OpusDecoder:
    """One Opus packet per call, decoded and resampled to ``sample_rate``."""

    def __init__(self, sample_rate: int) -> None:
        codec: Any = av.CodecContext.create("libopus", "r")
        codec.sample_rate = sample_rate
        codec.layout = "mono"
        self._codec = codec
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)

    def decode(self, data: bytes) -> Samples:
        return self.decode_packets([data])

    def decode_packets(self, packets: list[bytes]) -> Samples:
        out: list[Samples] = []
        for packet in packets:
            for frame in self._codec.decode(av.Packet(packet)):
                frame.pts = None  # we count samples ourselves; gaps are not ours to fill
                out += [f.to_ndarray()[0] for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


class OggPackets:
    """Reassembles packets from an Ogg stream fed in arbitrary pieces (RFC 3533 lacing)."""

    def __init__(self) -> None:
        self._buffer = b""
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        packets: list[bytes] = []
        while True:
            if len(self._buffer) < 27:
                return packets
            if self._buffer[:4] != b"OggS":
                raise ValueError("ogg_opus stream is not Ogg (no OggS capture pattern)")
            count = self._buffer[26]
            header = 27 + count
            if len(self._buffer) < header:
                return packets
            lacing = self._buffer[27:header]
            end = header + sum(lacing)
            if len(self._buffer) < end:
                return packets
            body, position = self._buffer[header:end], 0
            for size in lacing:
                self._partial += body[position : position + size]
                position += size
                if size < 255:  # a lacing value under 255 ends a packet
                    packets.append(self._partial)
                    self._partial = b""
            self._buffer = self._buffer[end:]


class OggOpusDecoder:
    """An Ogg Opus stream: headers skipped, the encoder's pre-skip dropped."""

    def __init__(self, sample_rate: int) -> None:
        self._pages = OggPackets()
        self._opus = OpusDecoder(sample_rate)
        self._rate = sample_rate
        self._headers_left = 2  # OpusHead, OpusTags
        self._skip = 0

    def decode(self, data: bytes) -> Samples:
        audio: list[bytes] = []
        for packet in self._pages.feed(data):
            if self._headers_left:
                self._headers_left -= 1
                if packet.startswith(b"OpusHead") and len(packet) >= 12:
                    pre_skip_48k = int.from_bytes(packet[10:12], "little")
                    self._skip = round(pre_skip_48k * self._rate / 48000)
                continue
            audio.append(packet)
        samples = self._opus.decode_packets(audio)
        if self._skip and samples.size:
            cut = min(self._skip, samples.size)
            samples, self._skip = samples[cut:], self._skip - cut
        return samples


def make_wire_decoder(encoding: str, sample_rate: int) -> Decoder:
    """The decoder for a session's declared encoding and rate."""
    if encoding == "opus":
        return OpusDecoder(sample_rate)
    if encoding == "ogg_opus":
        return OggOpusDecoder(sample_rate)
    return WireDecoder(encoding)
