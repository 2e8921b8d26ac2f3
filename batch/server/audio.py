"""Wire audio to float32 mono samples: linear16, linear32, and G.711 mu-law / A-law.

Pure numpy (no ``audioop``, which is deprecated). Frames may split a sample across
WebSocket messages, so the decoder carries the odd bytes over to the next call.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from batch.pulse.protocol import PCM_SAMPLE_BYTES

Samples = npt.NDArray[np.float32]

UNSUPPORTED_ENCODINGS: Final = ("opus", "ogg_opus")


def _mulaw_table() -> Samples:
    """ITU-T G.711 mu-law expansion of all 256 codes, scaled to [-1, 1)."""
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    linear = np.where(codes & 0x80, -magnitude, magnitude)
    return (linear / 32768.0).astype(np.float32)


def _alaw_table() -> Samples:
    """ITU-T G.711 A-law expansion of all 256 codes, scaled to [-1, 1)."""
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    # A-law's sign bit is set for positive samples (the opposite of two's complement).
    linear = np.where(codes & 0x80, magnitude, -magnitude)
    return (linear / 32768.0).astype(np.float32)


MULAW_TABLE: Final = _mulaw_table()
ALAW_TABLE: Final = _alaw_table()


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


def decode_pcm(data: bytes, encoding: str) -> Samples:
    """Decode whole samples of a PCM wire encoding to float32 in [-1, 1)."""
    if encoding == "linear16":
        return (np.frombuffer(data, dtype="<i2") / 32768.0).astype(np.float32)
    if encoding == "linear32":
        return (np.frombuffer(data, dtype="<i4") / 2147483648.0).astype(np.float32)
    codes = np.frombuffer(data, dtype=np.uint8)
    if encoding == "mulaw":
        return MULAW_TABLE[codes]
    if encoding == "alaw":
        return ALAW_TABLE[codes]
    raise ValueError(f"encoding {encoding!r} is not supported by the local server")
