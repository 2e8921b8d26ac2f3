"""The progress display while a run is live: audio counted as it is sent, log lines above
the bar, and the dry run's summary."""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest
from rich.console import Console

from batch.console import ConsoleObserver, setup_logging
from batch.dryrun import wall_time_s
from batch.job import Observer, RunOptions, run_job
from batch.manifest import load_manifest
from batch.model import Item
from batch.pulse.protocol import PulseOptions
from batch.report import RunStats
from tests.conftest import point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_track, write_audio

RATE = 16000


class _Sent(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[str, float, float]] = []  # (what, when, seconds)
        self.lock = threading.Lock()

    def audio_sent(self, item: Item, seconds: float) -> None:
        with self.lock:
            self.events.append(("sent", time.monotonic(), seconds))

    def item_done(self, item: Item, ok: bool, audio_s: float, failure: str | None = None) -> None:
        with self.lock:
            self.events.append(("done", time.monotonic(), audio_s))


@pytest.mark.parametrize("reuse", [False, True], ids=["one-session-each", "reused-sessions"])
def test_audio_is_counted_while_a_long_file_streams_a_few_times_a_second(
    tmp_path: Path, reuse: bool
) -> None:
    (tmp_path / "media").mkdir()
    track = tone_track([Burst(0.5, 3.0, 440)], 12.0, RATE)
    write_audio(tmp_path / "media" / "long.wav", [track], RATE)
    # Paced at 6x: 2 s of streaming, reported about every half second.
    manifest = write_manifest(tmp_path, run={"pace": 6.0})
    recorder = _Sent()
    with server_in_thread() as server:
        # The server's current path has finalize: files share sessions there (batch.reuse).
        point_at(manifest, server.current_url if reuse else server.url)
        result = anyio.run(run_job, load_manifest(manifest), RunOptions(), recorder)
    assert result.report["items"]["ok"] == 1
    sent = [(when, s) for what, when, s in recorder.events if what == "sent"]
    ((_, done_at, _),) = [e for e in recorder.events if e[0] == "done"]
    before = [s for when, s in sent if when < done_at]
    assert len(before) >= 2, recorder.events  # the bar moved during the session
    assert 0 < before[0] < 12.0  # a part of the file, not all of it at the end
    reported_at = [when for when, _ in sent[:-1]]  # the last: when the session ended
    gaps = [later - earlier for earlier, later in itertools.pairwise(reported_at)]
    assert all(gap >= 0.45 for gap in gaps), gaps  # throttled: not a call per chunk
    total_s = sum(s for _, s in sent)
    if reuse:  # a shared session's file is counted as read; item_done brings the rest
        assert 0 < total_s <= 12.05
    else:  # the session's end counts the rest: all of it, once
        assert total_s == pytest.approx(12.0, abs=0.05)


def test_the_bar_counts_audio_in_flight_and_a_failed_attempt_is_taken_back() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=160)
    observer = ConsoleObserver(live=True, console=console)
    item = Item("id-long", "/calls/meeting.wav", None, None, PulseOptions(language="en"))
    observer.planned(1, 600.0, 0)
    assert observer.progress is not None
    try:
        observer.audio_sent(item, 120.0)
        assert observer.progress.tasks[0].completed == 120.0
        observer.audio_sent(item, -120.0)  # the attempt failed: its retry sends it again
        observer.audio_sent(item, 30.0)
        assert observer.progress.tasks[0].completed == 30.0
        observer.item_done(item, True, 600.0)
        assert observer.progress.tasks[0].completed == 600.0
        observer.audio_sent(item, -30.0)  # it had shared a session that failed later
        assert observer.progress.tasks[0].completed == 600.0
    finally:
        observer.close()


def test_log_lines_print_above_the_live_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    setup_logging(verbose=False, secret_env=None)
    console = Console(file=buffer, force_terminal=True, width=160)
    observer = ConsoleObserver(live=True, console=console)
    item = Item("id-long", "/calls/meeting.wav", None, None, PulseOptions(language="en"))
    observer.planned(1, 600.0, 0)
    try:
        observer.audio_sent(item, 60.0)
        assert observer.progress is not None
        observer.progress.refresh()
        logging.getLogger("batch.pool").warning("retrying meeting.wav in 0.5 s")
        observer.progress.refresh()
    finally:
        observer.close()
        logging.getLogger().handlers.clear()
    lines = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue()).replace("\r", "\n")
    (line,) = [x for x in lines.splitlines() if "retrying meeting.wav" in x]
    assert "transcribing" not in line and "━" not in line, repr(line)


def _clips(folder: Path, seconds: float) -> None:
    folder.mkdir()
    track = tone_track([Burst(0.2, 0.2, 440)], seconds, RATE)
    for name in ("a.wav", "b.wav", "c.wav"):
        write_audio(folder / name, [track], RATE)
    (folder / "bad.wav").write_text("not audio")


def test_dry_run_prints_a_summary_with_time_and_cost_only_with_a_price(tmp_path: Path) -> None:
    _clips(tmp_path / "media", 30.0)
    # Three 30 s items on two sessions at real time: two rounds, about a minute.
    manifest = write_manifest(tmp_path, run={"concurrency": 2, "pace": 1.0})
    done = run_cli("run", str(manifest), "--dry-run")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "items: 4 in all: 3 to stream, 0 already ok (skipped), 1 known bad" in text
    assert "audio: 90.0 s to stream (1.50 billed minutes)" in text
    assert "time:  about 0:01:00 streaming at run.pace 1x on run.concurrency 2" in text
    assert "cost:  no price set (output.price_per_minute)" in text
    assert "stream: " in text and "a.wav (30.0 s)" in text and "fail: " in text
    assert not (tmp_path / "out").exists()

    priced = write_manifest(
        tmp_path,
        run={"concurrency": 4, "pace": 0},
        output={"path": "out", "price_per_minute": 0.02, "currency": "EUR"},
    )
    text = run_cli("run", str(priced), "--dry-run").stdout
    assert "cost:  about 0.03 EUR at 0.02 EUR per billed minute" in text
    assert "time:  no estimate: unpaced (run.pace 0)" in text
    plan = json.loads(run_cli("run", str(priced), "--dry-run", "--json").stdout)
    assert plan["estimated_cost"] == 0.03 and plan["estimated_wall_s"] is None


def test_wall_time_cuts_long_items_into_pieces_as_the_run_would(tmp_path: Path) -> None:
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": 4, "pace": 2.0, "split_long_files": True,
             "split_threshold_s": 600, "piece_target_s": 300},
    )  # fmt: skip
    run = load_manifest(manifest).manifest.run
    stats = RunStats("j", "r", datetime.now(UTC), concurrency=4, pace=2.0, endpoint="local")
    # 700 s: four pieces of 175 s, one per session; the 100 s item after the first of them.
    assert wall_time_s([700.0, 100.0], run, stats) == (175 + 100) / 2
    assert wall_time_s([0.0], run, stats) == 0.0  # no speech: no session
