"""A small job with retries, a refusal and failures, run in this process against the local
server with faults: what the observability tests (timeline, HTML, metrics, logs) look at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from batch.job import JobResult, RunOptions, run_job
from batch.manifest import load_manifest
from batch.server import FaultConfig
from tests.conftest import point_at, server_in_thread, write_manifest
from tests.media import Burst, tone_files

ITEMS = 6
BURSTS = [Burst(0.2, 0.15, 440), Burst(0.6, 0.15, 660)]
# Drops and 429s on the first sessions; two attempts each, so some items fail for good.
FAULTS = FaultConfig(seed=5, drop_rate=0.5, refuse_429_rate=0.3, retry_after_s=0.05,
                     fault_limit=7, fault_at_max_s=0.5)  # fmt: skip


def faulty_manifest(folder: Path, **run: Any) -> Path:
    """``ITEMS`` tone files and one empty file (a failure without a session)."""
    tone_files(folder / "media", ITEMS, BURSTS, 1.0)
    (folder / "media" / "empty.wav").write_bytes(b"")
    settings = {"concurrency": 3, "max_attempts": 2, "backoff_initial_s": 0.05,
                "backoff_max_s": 0.2, "final_timeout_s": 1.0, **run}  # fmt: skip
    return write_manifest(folder, run=settings, output={"price_per_minute": 0.01})


def faulty_run(folder: Path, opts: RunOptions | None = None) -> tuple[JobResult, Any]:
    """Run the faulty job in this process; its result and the server's counters."""
    manifest = faulty_manifest(folder)
    with server_in_thread(faults=FAULTS) as server:
        point_at(manifest, server.url)
        result = anyio.run(run_job, load_manifest(manifest), opts or RunOptions())
        return result, server.stats
