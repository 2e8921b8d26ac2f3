"""Benchmark (`make bench`): short files with session reuse, as a ratio to their bound.

96 four-second files, C=8, pace 4, 150 ms of reply latency (the local server's
``reply_latency_s``, on the upgrade and every message): the bound is the audio over
C x pace (12 s). The baseline, one session per file (``run.reuse_sessions: false``), is
measured in the same run. ``PULSE_BATCH_BENCH_REUSE_FILES`` scales the workload down.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.server import FaultConfig, local_server
from tests.bench.results import publish
from tests.conftest import point_at, write_manifest
from tests.media import Burst, tone_files

pytestmark = [pytest.mark.bench, pytest.mark.anyio]
RESULTS: dict[str, Any] = {}

FILES = int(os.environ.get("PULSE_BATCH_BENCH_REUSE_FILES", "96"))
FILE_S = 4.0
CONCURRENCY = 8
PACE = 4.0
LATENCY_S = 0.15


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    publish(RESULTS, "reuse", "pulse-batch bench: session reuse")


async def _makespan(tmp: Path, media: Path, reuse: bool) -> tuple[float, int, int]:
    """The run's wall seconds, the sessions it opened, and the most open at once."""
    folder = tmp / f"reuse-{reuse}"
    folder.mkdir()
    (folder / "media").symlink_to(media)
    manifest = write_manifest(
        folder,
        pulse={"endpoint": "local", "local_engine": "synthetic", "protocol": "current"},
        run={"concurrency": CONCURRENCY, "pace": PACE, "reuse_sessions": reuse},
    )
    faults = FaultConfig(reply_latency_s=LATENCY_S)
    async with local_server(engine="synthetic", faults=faults) as server:
        point_at(manifest, server.current_url)
        result = await run_job(load_manifest(manifest), RunOptions())
        opened, most = server.stats.sessions_opened, server.stats.max_open
    assert result.report["items"]["ok"] == FILES
    return float(result.report["wall_s"]), opened, most


async def test_short_files_makespan_with_session_reuse(tmp_path: Path) -> None:
    # Four words a file, the last one close to the end (the final wait is real).
    bursts = [Burst(0.3, 0.4, 440), Burst(1.3, 0.4, 660), Burst(2.3, 0.4, 550),
              Burst(3.3, 0.5, 770)]  # fmt: skip
    media = tmp_path / "media"
    tone_files(media, FILES, bursts, FILE_S, "short-{:03d}.wav")
    bound = FILES * FILE_S / (CONCURRENCY * PACE)
    reused, reused_sessions, reused_open = await _makespan(tmp_path, media, True)
    single, single_sessions, _ = await _makespan(tmp_path, media, False)
    heading = f"{FILES} files of {FILE_S:g} s, C={CONCURRENCY}, pace {PACE:g}, 150 ms latency"
    RESULTS[heading] = {
        "bound s": round(bound, 2),
        "reused sessions s": round(reused, 2),
        "ratio to bound (reuse)": round(reused / bound, 3),
        "one session per file s": round(single, 2),
        "ratio to bound (one per file)": round(single / bound, 3),
        "sessions opened (reuse / one per file)": f"{reused_sessions} / {single_sessions}",
        "most sessions open (reuse)": reused_open,
    }  # fmt: skip
    assert reused_open <= CONCURRENCY
    assert reused / bound <= 1.15
