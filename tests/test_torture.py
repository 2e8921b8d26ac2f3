"""Kill torture: many SIGKILLs at random moments (some in the middle of a commit), mixing
--force runs and failing sessions; afterwards every item has exactly one row."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.output import OutputReader
from batch.server import FaultConfig
from tests.conftest import TIME_UNIT_S, point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst
from tests.test_resume import _tone_files

KILLS = 30
ITEMS = 16


def _staged_batches(out: Path) -> list[Path]:
    staging = out / "_staging" / "test-job"
    if not staging.exists():
        return []
    return [p for p in staging.iterdir() if p.is_dir() and not p.name.startswith("cache-")]


def _kill_one(
    manifest: Path,
    out: Path,
    rng: random.Random,
    force: bool,
    staged: bool,
    whole_run_s: dict[bool, float],
) -> tuple[bool, bool]:
    """Start a run and SIGKILL it: at a random moment, or as soon as a batch is being
    committed. Returns whether it was killed (not finished first), and whether a commit
    was in progress at the kill. ``whole_run_s`` remembers how long an unkilled run of each
    kind took, so random moments fall inside a run on a fast machine and a slow one alike."""
    args = [sys.executable, "-m", "batch", "run", str(manifest), *(["--force"] if force else [])]
    started = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    in_commit = staged and rng.random() < 0.5
    # A run starts committing a second or two in (interpreter start, planning).
    if in_commit:
        wait_s = 6.0 * TIME_UNIT_S
    elif force in whole_run_s:
        wait_s = rng.uniform(0.3, 0.9) * whole_run_s[force]
    else:
        wait_s = rng.uniform(0.8, 3.5) * TIME_UNIT_S
    deadline = started + wait_s
    while time.monotonic() < deadline and process.poll() is None:
        if in_commit and _staged_batches(out):
            break
        time.sleep(0.002)
    committing = bool(_staged_batches(out))
    if process.poll() is not None:
        whole_run_s[force] = time.monotonic() - started
    process.send_signal(signal.SIGKILL)  # nothing, if it already finished
    process.wait(timeout=10 * TIME_UNIT_S)
    return process.returncode == -signal.SIGKILL, committing


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("fmt", "kills"), [("parquet", KILLS), ("delta", 8)])
def test_random_sigkills_leave_exactly_one_row_per_item(
    tmp_path: Path, fmt: str, kills: int
) -> None:
    """Parquet: 30 kills, half of them as soon as a batch is being staged. Delta (one
    commit per table, so a kill can fall between a batch's words and its transcripts):
    fewer, at random moments."""
    rng = random.Random(11)
    _tone_files(tmp_path / "media", ITEMS, duration_s=0.4, bursts=[Burst(0.05, 0.1, 440)])
    (tmp_path / "media" / "broken.wav").write_text("not audio")  # fails in every run
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": 4, "pace": 0, "max_attempts": 1},
        output={"path": "out", "commit_every_items": 1, "format": fmt},
    )
    out = tmp_path / "out"
    faults = FaultConfig(seed=5, error_rate=0.2, fault_at_max_s=0.2)  # some items fail
    landed = committing = 0
    whole_run_s: dict[bool, float] = {}
    with server_in_thread(faults=faults) as server:
        point_at(manifest, server.url)
        for attempt in range(4 * kills):  # bounded: a run may finish before its kill
            force = attempt % 3 == 0
            killed, in_commit = _kill_one(
                manifest, out, rng, force, staged=fmt == "parquet", whole_run_s=whole_run_s
            )
            landed += killed
            committing += killed and in_commit
            if landed == kills:
                break
        final = run_cli("run", str(manifest))
    assert landed == kills
    assert final.returncode == 1, final.stderr  # broken.wav, and sessions the server failed
    if fmt == "parquet":
        assert committing >= 3, f"only {committing} kills landed during a commit"

    transcripts = OutputReader(out).table("transcripts", "test-job").to_pylist()
    items = [r["item_id"] for r in transcripts]
    assert len(items) == len(set(items)) == ITEMS + 1  # exactly one row per item
    words = OutputReader(out).table("words", "test-job").to_pylist()
    keys = [(w["item_id"], w["idx"]) for w in words]
    assert len(keys) == len(set(keys))  # no duplicated words
    run_of = {r["item_id"]: r["run_id"] for r in transcripts if r["status"] == "ok"}
    assert all(run_of.get(w["item_id"]) == w["run_id"] for w in words)  # none orphaned
    assert sum(r["word_count"] for r in transcripts) == len(words)
    assert not [p for p in (out / "_staging").rglob("*") if p.is_file()]
