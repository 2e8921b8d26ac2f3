"""Remake the demo's payment clip (Ogg Opus) with espeak-ng (installed by `make install` where it can).

The clip is committed, so `make run` never needs espeak. It holds a card number (a Luhn-valid
test number, read digit by digit as callers do), a security code and a spoken amount:
redaction and numerals at work. Run: `.venv/bin/python jobs/demo/make_clips.py`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import av
import numpy as np

TEXT = (
    "My credit card number is 4 9 2 9, 3 8 1 2, 5 6 0 7, 2 3 1 9. "
    "The security code is 7 2 5. I paid twenty five thousand dollars."
)
RATE = 16000


def main() -> None:
    target = Path(__file__).resolve().parent / "clips" / "payment.ogg"
    wav = target.with_suffix(".tmp.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(wav), TEXT], check=True)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
    # Opus wants whole 20 ms frames of float samples.
    with av.open(str(wav)) as source:
        frames = [f for frame in source.decode(audio=0) for f in resampler.resample(frame)]
    frames += resampler.resample(None)
    samples = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    wav.unlink()
    with av.open(str(target), "w", format="ogg") as out:
        stream = out.add_stream("libopus", rate=RATE, layout="mono")
        stream.bit_rate = 24000  # speech stays clear; the clip stays small
        step = RATE // 50
        packets = []
        for start in range(0, len(samples), step):
            block = samples[start : start + step]
            block = np.pad(block, (0, step - len(block)))
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts = RATE, start
            packets += stream.encode(frame)
        for packet in [*packets, *stream.encode(None)]:
            out.mux(packet)
    print(f"wrote {target} ({len(samples) / RATE:.1f} s)")


if __name__ == "__main__":
    main()
