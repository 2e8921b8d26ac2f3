"""Is what a file's header says about its audio possible? Pure checks on probed numbers.

A header can lie: a WAV saying 1 Hz probes as 32,000 s of "audio" that would be resampled
into hours of noise and billed. Two checks run at probe time, so such a file is a failed
row at plan time rather than hours of streaming:

- a sample rate below `MIN_SAMPLE_RATE_HZ` carries no speech (telephone audio is 8 kHz):
  ``not_media``;
- a duration the file's size cannot hold, even at `MIN_BYTES_PER_S` (below any speech codec,
  Codec2 at 450 bit/s or Opus with silence suppressed included): ``decode_error``.
"""

from __future__ import annotations

from typing import Final

from batch.errors import InputError

MIN_SAMPLE_RATE_HZ: Final = 2000
MIN_BYTES_PER_S: Final = 8
# Containers round; a tiny file may say a second or so more than its bytes hold.
_DURATION_SLACK_S: Final = 5.0


def check(path: str, sample_rate: int, duration_s: float | None, size_bytes: int | None) -> None:
    """Raise `InputError` when the probed ``sample_rate`` or ``duration_s`` cannot be real
    audio of a file of ``size_bytes`` (None: size unknown, not checked). A rate of 0 means
    the container did not say; decoding decides then."""
    if 0 < sample_rate < MIN_SAMPLE_RATE_HZ:
        raise InputError(
            "not_media",
            path,
            f"says its sample rate is {sample_rate} Hz, below the {MIN_SAMPLE_RATE_HZ} Hz "
            "speech needs; the header is wrong or this is not speech audio (re-encode it)",
        )
    if duration_s is None or size_bytes is None:
        return
    most_s = size_bytes / MIN_BYTES_PER_S + _DURATION_SLACK_S
    if duration_s > most_s:
        raise InputError(
            "decode_error",
            path,
            f"says it holds {duration_s:,.0f} s of audio, more than its {size_bytes:,} bytes "
            f"can hold (at most {most_s:,.0f} s at {MIN_BYTES_PER_S} bytes a second); the "
            "header is wrong: re-encode the file",
        )
