"""Kill torture: SIGKILLs at chosen moments (some in the middle of a commit), mixing --force
runs and failing sessions; afterwards every item has exactly one row.

The default suite kills a few times at moments chosen to cover each case: in a commit of a
first run, of a --force run (rows superseded) and of a rerun (failed rows replaced), and
mid-stream. A commit is seen as it starts: Parquet's redo-log batch appearing in
``_staging``, or Delta's first table of a batch (its transcripts are committed last, so the
kill falls between a batch's tables). The long forms (30 and 8 kills, half in a commit of a
--force run, half at random moments) are marked ``slow`` (`make test-all`)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.output import OutputReader
from batch.server import FaultConfig, LocalServer
from tests.conftest import TIME_UNIT_S, point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_files

ITEMS = 16
COMMIT = "commit"  # a kill as soon as a batch is being committed
STREAMING = "streaming"  # a kill at a random moment once the run's sessions are open
RANDOM = "random"  # a kill at a random moment of the run


def _commit_marks(out: Path, fmt: str) -> set[Path]:
    """What a batch being committed leaves, as it starts: Parquet's staged redo-log batches;
    Delta's versions of its first table (``segments``; ``transcripts`` come last)."""
    if fmt == "delta":
        versions = (out / "segments" / "_delta_log").glob("*.json")
        return {p for p in versions if int(p.stem) > 0}  # version 0: the table's creation
    staging = out / "_staging" / "test-job"
    if not staging.exists():
        return set()
    return {p for p in staging.iterdir() if p.is_dir() and not p.name.startswith("cache-")}


def _kill_one(
    manifest: Path, out: Path, fmt: str, server: LocalServer, rng: random.Random,
    force: bool, moment: str, whole_run_s: dict[bool, float],
) -> tuple[bool, bool]:  # fmt: skip
    """Start a run and SIGKILL it: as soon as a batch of its own is being committed, at a
    random moment once its first session opened, or at a random moment. Returns whether it
    was killed (not finished first), and whether one of its commits had begun at the kill.
    ``whole_run_s`` remembers how long an unkilled run of each kind took, so random moments
    fall inside a run on a fast machine and a slow one alike."""
    args = [sys.executable, "-m", "batch", "run", str(manifest), *(["--force"] if force else [])]
    before = _commit_marks(out, fmt)  # a killed run's leftovers are no commit of this one
    opened = server.stats.sessions_opened
    started = time.monotonic()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # A run starts committing a second or two in (interpreter start, planning).
    if moment == RANDOM:
        wait_s = (
            rng.uniform(0.3, 0.9) * whole_run_s[force]
            if force in whole_run_s
            else rng.uniform(0.8, 3.5) * TIME_UNIT_S
        )
    else:
        wait_s = 10.0 * TIME_UNIT_S
    deadline = started + wait_s
    while time.monotonic() < deadline and process.poll() is None:
        if moment == COMMIT and _commit_marks(out, fmt) - before:
            break
        if moment == STREAMING and server.stats.sessions_opened > opened:
            deadline = min(deadline, time.monotonic() + rng.uniform(0.0, 0.4))
            moment = RANDOM  # from now on, only the clock
        time.sleep(0.002)
    committing = bool(_commit_marks(out, fmt) - before)
    if process.poll() is not None:
        whole_run_s[force] = time.monotonic() - started
    process.send_signal(signal.SIGKILL)  # nothing, if it already finished
    process.wait(timeout=10 * TIME_UNIT_S)
    return process.returncode == -signal.SIGKILL, committing


# (--force, moment) per run, in order: commits of a first run, of a --force run (which
# rewrites files to drop superseded rows) and of a rerun replacing failed rows; then a
# --force run (it redoes every item, so it is long enough to be caught) mid-stream.
CHOSEN = {
    "parquet": [(False, COMMIT), (True, COMMIT), (False, COMMIT), (True, STREAMING)],
    "delta": [(False, COMMIT), (True, STREAMING)],
    "reuse": [(False, COMMIT), (True, STREAMING)],  # Parquet: commits as above
}


def _schedule(fmt: str, form: str, reuse: bool) -> list[tuple[bool, str]]:
    """The chosen kills, or the long form: 30 (Parquet) or 8 (Delta), every other run
    --force and killed in a commit (it redoes every item, so it always commits; a plain
    rerun may have nothing left to commit), the others at random moments."""
    if form == "chosen":
        return CHOSEN["reuse" if reuse else fmt]
    kills = 30 if fmt == "parquet" else 8
    return [(True, COMMIT) if n % 2 == 0 else (False, RANDOM) for n in range(kills)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("fmt", "form", "reuse"),
    [
        ("parquet", "chosen", False),
        ("delta", "chosen", False),
        pytest.param("parquet", "chosen", True, id="parquet-chosen-reused-sessions"),
        # The long forms; in the default suite, the chosen forms above hold each guarantee.
        pytest.param("parquet", "random", False, marks=pytest.mark.slow),
        pytest.param("delta", "random", False, marks=pytest.mark.slow),
        pytest.param("parquet", "random", True, marks=pytest.mark.slow),
    ],
)
def test_sigkills_leave_exactly_one_row_per_item(
    tmp_path: Path, fmt: str, form: str, reuse: bool
) -> None:
    """Parquet: kills in commits (one redo-log batch each) and mid-run. Delta (one commit
    per table): kills between a batch's tables and mid-run. ``reuse``: on an endpoint with
    finalize, so short files share sessions and a fault fails every unit of its session
    not yet known complete."""
    rng = random.Random(11)
    tone_files(tmp_path / "media", ITEMS, [Burst(0.05, 0.1, 440)], 0.4, "call-{:04d}.wav")
    (tmp_path / "media" / "broken.wav").write_text("not audio")  # fails in every run
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": 4, "pace": 0, "max_attempts": 1},
        output={"path": "out", "commit_every_items": 1, "format": fmt},
    )
    out = tmp_path / "out"
    faults = FaultConfig(seed=5, error_rate=0.2, fault_at_max_s=0.2)  # some items fail
    schedule = _schedule(fmt, form, reuse)
    landed = committing = 0
    whole_run_s: dict[bool, float] = {}
    with server_in_thread(faults=faults) as server:
        point_at(manifest, server.current_url if reuse else server.url)  # finalize: reuse
        for force, moment in schedule:
            for _ in range(4):  # bounded: a run, or its commit, may end before the kill
                killed, in_commit = _kill_one(
                    manifest, out, fmt, server, rng, force, moment, whole_run_s
                )
                if killed and (in_commit or moment != COMMIT):
                    break
            landed += killed
            committing += killed and in_commit
        final = run_cli("run", str(manifest))
    assert landed == len(schedule), f"only {landed} of {len(schedule)} kills landed"
    assert final.returncode == 1, final.stderr  # broken.wav, and sessions the server failed
    wanted = sum(moment == COMMIT for _, moment in schedule)
    assert committing >= wanted, f"only {committing} of {wanted} kills landed during a commit"

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
