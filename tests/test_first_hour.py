"""The first hour with the tool: what a new user sees when things are slightly off."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import anyio
import pytest
import typer.main
from rich.console import Console

from batch.cli import app
from batch.console import ConsoleObserver
from batch.job import Observer, RunOptions, run_job
from batch.manifest import load_manifest
from batch.model import Item
from batch.pulse.protocol import PulseOptions
from tests.conftest import point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_track, write_audio

RATE = 16000


def _media(folder: Path, count: int, seconds: float = 1.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    track = tone_track([Burst(0.2, 0.2, 440)], seconds, RATE)
    for i in range(count):
        write_audio(folder / f"c{i}.wav", [track], RATE)


def test_validate_lists_what_each_input_resolves_to(tmp_path: Path) -> None:
    _media(tmp_path / "media", 5)
    (tmp_path / "list.csv").write_text("path,team\nmedia/c0.wav,sales\nmedia/c1.wav,support\n")
    manifest = write_manifest(
        tmp_path,
        inputs=[{"glob": "media/*.wav"}, {"list": "list.csv"}, {"path": "nowhere.wav"}],
    )
    done = run_cli("validate", str(manifest))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "inputs[0] glob 'media/*.wav': 5 file(s)" in out
    assert f"{tmp_path / 'media' / 'c0.wav'}" in out and "... and 2 more" in out
    assert "inputs[1] list 'list.csv': 2 file(s)" in out
    assert "inputs[2] path 'nowhere.wav': 1 file(s)" in out
    assert "bad: " in out and "nowhere.wav" in out


def test_log_lines_and_report_name_the_failure_kind_and_message(tmp_path: Path) -> None:
    _media(tmp_path / "media", 1)
    (tmp_path / "media" / "broken.wav").write_text("not audio")
    manifest = write_manifest(tmp_path)
    done = run_cli("run", str(manifest))
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if " failed " in line]
    assert len(failed) == 1
    assert re.search(r"failed \S+broken\.wav: not_media: \S+broken\.wav: ", failed[0]), failed
    markdown = (tmp_path / "out" / "_reports" / "test-job" / "latest.md").read_text()
    assert "| not_media |" in markdown and "broken.wav" in markdown


def test_a_rerun_with_nothing_to_do_says_so_and_keeps_the_report(tmp_path: Path) -> None:
    _media(tmp_path / "media", 2)
    manifest = write_manifest(tmp_path)
    assert run_cli("run", str(manifest)).returncode == 0
    reports = tmp_path / "out" / "_reports" / "test-job"
    before = (reports / "latest.md").read_text()
    runs_before = sorted(p.name for p in reports.iterdir())
    again = run_cli("run", str(manifest))
    assert again.returncode == 0, again.stderr
    assert "nothing to do: all 2 item(s) of job test-job are already done" in again.stdout
    assert f"latest report (unchanged): {reports / 'latest.md'}" in again.stdout
    assert (reports / "latest.md").read_text() == before
    assert sorted(p.name for p in reports.iterdir()) == runs_before
    assert "None" not in before
    assert again.stdout.strip().splitlines()[-1].startswith("pulse-batch: job=test-job")


def test_report_names_its_job_and_lists_the_others(tmp_path: Path) -> None:
    _media(tmp_path / "media", 1)
    first = write_manifest(tmp_path, job="alpha")
    assert run_cli("run", str(first)).returncode == 0
    second = write_manifest(tmp_path, job="beta")
    assert run_cli("run", str(second)).returncode == 0
    out = str(tmp_path / "out")
    shown = run_cli("report", out)
    assert shown.returncode == 0
    assert "holds 2 jobs: alpha, beta; showing the one run most recently (pick one with --job)" in (
        shown.stderr
    )
    assert "job beta, run " in shown.stderr and "# pulse-batch report: beta" in shown.stdout
    picked = run_cli("report", out, "--job", "alpha")
    assert "# pulse-batch report: alpha" in picked.stdout and "holds" not in picked.stderr
    missing = run_cli("report", out, "--job", "gamma")
    assert missing.returncode == 2 and "(jobs here: alpha, beta)" in missing.stderr


def test_401_from_a_loopback_server_says_the_key_variable_is_unset(tmp_path: Path) -> None:
    _media(tmp_path / "media", 1)
    manifest = write_manifest(tmp_path, pulse={"api_key_env": "MY_PULSE_KEY"})
    env = {k: v for k, v in os.environ.items() if k != "MY_PULSE_KEY"}
    with server_in_thread("synthetic", api_key="the-right-key") as server:
        point_at(manifest, server.url)
        os.environ.pop("MY_PULSE_KEY", None)
        done = run_cli("run", str(manifest), env=env)
    assert done.returncode == 3
    assert "HTTP 401" in done.stderr
    assert "environment variable MY_PULSE_KEY is not set; export it" in done.stderr


def test_a_quoted_number_gets_a_clear_message(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, run={"concurrency": "4"})
    done = run_cli("validate", str(manifest))
    assert done.returncode == 2
    assert 'run.concurrency: "4" is quoted text; write 4 without quotes' in done.stderr


@pytest.mark.parametrize("command", ["", *sorted(typer.main.get_command(app).commands)])
def test_help_reads_cleanly(command: str) -> None:
    done = run_cli(*([command] if command else []), "--help")
    assert done.returncode == 0, done.stderr
    assert "<bool>" not in done.stdout
    assert not re.search(r"\{[a-z_]+\}", done.stdout), done.stdout
    assert "Usage: " in done.stdout


class _Recorder(Observer):
    def __init__(self) -> None:
        self.failures: list[str | None] = []
        self.pieces: list[tuple[int, int | None]] = []

    def item_done(self, item: Item, ok: bool, audio_s: float, failure: str | None = None) -> None:
        self.failures.append(failure)

    def pieces_done(self, item: Item, done: int, total: int | None) -> None:
        self.pieces.append((done, total))


def test_observer_hears_failures_and_a_long_items_pieces(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    bursts = [Burst(0.5 + 1.0 * i, 0.3, 440) for i in range(20)]
    write_audio(tmp_path / "media" / "long.wav", [tone_track(bursts, 21.0, RATE)], RATE)
    (tmp_path / "media" / "bad.wav").write_text("nope")
    manifest = write_manifest(
        tmp_path,
        run={
            "split_long_files": True,
            "split_threshold_s": 10,
            "piece_target_s": 5,
            "split_window_s": 1,
        },
    )
    recorder = _Recorder()
    result = anyio.run(run_job, load_manifest(manifest), RunOptions(), recorder)
    assert result.report["items"]["ok"] == 1
    assert [f for f in recorder.failures if f] == [
        next(f for f in recorder.failures if f and f.startswith("not_media: "))
    ]
    done = [d for d, _ in recorder.pieces]
    assert done == sorted(done) and done[-1] >= 3
    assert recorder.pieces[-1][1] == done[-1]  # the last piece knows the total


def test_live_display_names_failures_and_shows_pieces() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=160)
    observer = ConsoleObserver(live=True, console=console)
    options = PulseOptions(language="en")
    long_item = Item("id-long", "/calls/meeting.wav", None, None, options)
    bad_item = Item("id-bad", "/calls/broken.wav", None, None, options)
    observer.planned(2, 1500.0, 0)
    observer.pieces_done(long_item, 2, 5)
    observer.item_done(bad_item, False, 0.0, "not_media: /calls/broken.wav: not audio")
    observer.pieces_done(long_item, 3, 5)
    assert observer.progress is not None
    observer.progress.refresh()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buffer.getvalue())  # colours off
    observer.close()
    assert "failed /calls/broken.wav: not_media: /calls/broken.wav: not audio" in shown
    assert "meeting.wav" in shown and "3/5 pieces" in shown
    observer.item_done(long_item, True, 1500.0)
    assert observer.pieces == {}
