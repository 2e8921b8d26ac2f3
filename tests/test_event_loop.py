"""Nothing blocks the event loop: a finished item's reference read (here a FIFO that holds
the reader for a second, as a slow store would) runs in a worker thread while another
session streams on, its chunks arriving at the server as paced."""

from __future__ import annotations

import csv
import errno
import os
import threading
import time
from pathlib import Path

import anyio

from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.server import LocalServer
from tests.conftest import TIME_UNIT_S, point_at, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.tables import by_source

RATE = 16000
SLOW_READ_S = 1.0 * TIME_UNIT_S


def _serve_slowly(fifo: Path, text: str, opened: list[float]) -> threading.Thread:
    """Write ``text`` into ``fifo`` ``SLOW_READ_S`` after a reader opens it (the read
    blocks that long); gives up after 30 s without a reader."""

    def serve() -> None:
        deadline = time.monotonic() + 30 * TIME_UNIT_S
        while True:
            try:
                handle = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails until a reader
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    return
                time.sleep(0.005)
        opened.append(time.monotonic())
        time.sleep(SLOW_READ_S)
        os.set_blocking(handle, True)
        os.write(handle, text.encode())
        os.close(handle)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_slow_reference_read_does_not_delay_another_sessions_chunks(
    tmp_path: Path, synthetic_server: LocalServer
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_audio(media / "short.wav", [tone_track([Burst(0.05, 0.2, 440)], 0.4, RATE)], RATE)
    long_s = 3.0 + 2 * SLOW_READ_S  # still streaming (pace 2) through the whole slow read
    bursts = [Burst(t, 0.3, 660) for t in range(int(long_s))]
    write_audio(media / "long.wav", [tone_track(bursts, long_s, RATE)], RATE)
    fifo = tmp_path / "short-reference.txt"
    os.mkfifo(fifo)
    with (tmp_path / "list.csv").open("w", newline="") as handle:
        rows = csv.writer(handle)
        rows.writerow(["path", "reference_path"])
        rows.writerow(["media/short.wav", str(fifo)])
        rows.writerow(["media/long.wav", ""])
    manifest = write_manifest(
        tmp_path, inputs=[{"list": "list.csv"}], run={"concurrency": 2, "pace": 2.0}
    )
    point_at(manifest, synthetic_server.url)
    opened: list[float] = []
    writer = _serve_slowly(fifo, "tone440", opened)

    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    writer.join(timeout=5)

    assert result.report["items"]["ok"] == 2, result.report
    scored = by_source(tmp_path / "out", "reference, wer", name_only=True)
    assert scored["short.wav"][0] == "tone440" and scored["short.wav"][1] is not None
    (long,) = [s for s in synthetic_server.stats.sessions if s.audio_s > 2.0]
    assert long.first_audio_at is not None and long.last_audio_at is not None
    # The read was held while the long session streamed (the server's clock is ours).
    assert opened and long.first_audio_at < opened[0]
    assert opened[0] + SLOW_READ_S < long.last_audio_at
    # Chunks of 128 ms at pace 2 are due every 64 ms; the read held for a second.
    assert long.max_audio_gap_s < SLOW_READ_S / 2, long.max_audio_gap_s
