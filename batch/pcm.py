"""PCM wire audio to float32 samples in [-1, 1): linear16, linear32, G.711 mu-law and A-law.

Pure numpy (no ``audioop``, which is deprecated). Shared by the local server, which decodes
what clients send, and the client's speech gauge, which measures what it sends.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.float32]


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
    raise ValueError(f"encoding {encoding!r} is not PCM")
