"""Client CPU of a job run: the local server in one child process, ``pulse-batch run`` in
another, the client's CPU read from its own rusage (``wait4``), so the server's is never
counted. Marginal CPU per audio hour is the difference of two runs that differ only in the
recordings' length, so start-up, planning and per-item costs cancel out.

Also a script, for profiling by hand::

    python -m tests.bench.client_cpu 64 20 60     # sessions, short s, long s
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import write_manifest
from tests.media import long_audio

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Usage:
    """One client run: its CPU (user, system), wall time and audio, from its report."""

    user_s: float
    system_s: float
    wall_s: float
    audio_s: float
    max_open: int

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.system_s


@contextmanager
def server_process(*flags: str) -> Iterator[str]:
    """The local server (synthetic engine) in a child process; yields its session URL."""
    server = subprocess.Popen(
        [sys.executable, "-m", "batch", "serve", "--engine", "synthetic", "--port", "0",
         "--log-level", "WARNING", *flags],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert server.stdout is not None
        url = next(line for line in server.stdout if "ws://" in line).split()[-1].strip()
        if not url.endswith("get_text"):
            url = url.rstrip("/") + "/api/v1/pulse/get_text"
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def run_client(folder: Path, url: str, sessions: int, seconds: float, **run: Any) -> Usage:
    """``sessions`` copies of a ``seconds`` recording, all streamed at once at real time
    by ``pulse-batch run`` in a child process; its own CPU, from ``wait4``."""
    media = folder / "media"
    media.mkdir(parents=True)
    clip = long_audio(media / "0.flac", seconds)
    for i in range(1, sessions):
        shutil.copyfile(clip, media / f"{i}.flac")
    manifest = write_manifest(folder, run={"concurrency": sessions, "pace": 1.0, **run})
    manifest.write_text(manifest.read_text().replace("endpoint: local", f"endpoint: {url}"))
    client = subprocess.Popen(
        [sys.executable, "-m", "batch", "run", str(manifest)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    stdout, _ = client.communicate(timeout=seconds * 4 + 120)
    assert client.returncode == 0, stdout
    user_s, system_s = _reaped_usage()
    report = json.loads(Path(stdout.split("report: ")[1].split()[0]).read_text())
    return Usage(
        user_s, system_s, report["wall_s"], report["audio_s"], report["pool"]["max_open_sessions"]
    )


_last_children = [0.0, 0.0]


def _reaped_usage() -> tuple[float, float]:
    """CPU of the children reaped since the last call: the client (``communicate`` reaps
    it; the server child still runs, so is not counted)."""
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    user, system = now.ru_utime - _last_children[0], now.ru_stime - _last_children[1]
    _last_children[:] = [now.ru_utime, now.ru_stime]
    return user, system


def marginal(sessions: int, short_s: float, long_s: float, **run: Any) -> dict[str, float]:
    """Marginal client CPU per audio hour at ``sessions`` sessions paced at real time."""
    _reaped_usage()  # from here
    with tempfile.TemporaryDirectory() as tmp, server_process() as url:
        short = run_client(Path(tmp) / "short", url, sessions, short_s, **run)
        long = run_client(Path(tmp) / "long", url, sessions, long_s, **run)
    audio_h = (long.audio_s - short.audio_s) / 3600
    extra_wall = long.wall_s - short.wall_s
    return {
        "cpu_s_per_audio_h": (long.cpu_s - short.cpu_s) / audio_h,
        "system_share": (long.system_s - short.system_s) / max(long.cpu_s - short.cpu_s, 1e-9),
        "share_of_core": (long.cpu_s - short.cpu_s) / extra_wall,
        "max_open": float(min(short.max_open, long.max_open)),
        "long_wall_s": long.wall_s,
        "short_cpu_s": short.cpu_s,
        "long_cpu_s": long.cpu_s,
    }


def _pcm(folder: Path, seconds: float) -> Path:
    """The recording `run_client` streams, decoded once to raw wire audio."""
    from batch.decode import DecodedAudio, WireFormat

    path = folder / f"{seconds:g}.pcm"
    clip = long_audio(folder / f"{seconds:g}.flac", seconds)
    path.write_bytes(b"".join(DecodedAudio(clip, WireFormat("linear16", 16000))))
    return path


def bare_marginal(sessions: int, short_s: float, long_s: float) -> dict[str, float]:
    """The same figures for `tests.bench.bare_client` (the baseline), same server, same
    audio."""
    usage = {}
    with tempfile.TemporaryDirectory() as tmp, server_process() as url:
        for seconds in (short_s, long_s):
            pcm = _pcm(Path(tmp), seconds)
            command = [sys.executable, "-m", "tests.bench.bare_client", url, str(sessions)]
            _reaped_usage()
            began = time.monotonic()
            subprocess.run([*command, str(pcm)], check=True, cwd=ROOT, timeout=seconds * 4 + 60)
            usage[seconds] = (*_reaped_usage(), time.monotonic() - began)
    (u0, s0, w0), (u1, s1, w1) = usage[short_s], usage[long_s]
    cpu_s = (u1 + s1) - (u0 + s0)
    return {
        "cpu_s_per_audio_h": cpu_s / (sessions * (long_s - short_s) / 3600),
        "system_share": (s1 - s0) / max(cpu_s, 1e-9),
        "share_of_core": cpu_s / (w1 - w0),
    }


if __name__ == "__main__":
    n, a, b = (int(x) for x in sys.argv[1:4])
    print(json.dumps({"pulse-batch": marginal(n, a, b), "bare": bare_marginal(n, a, b)}, indent=2))
