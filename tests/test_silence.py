"""Skipping silence end to end: two-channel calls made from the demo clips, streamed with
and without `run.skip_silence` against the local server; the spend cap stops a run and the
rerun finishes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.server import LocalServer
from tests.calls import Call, demo_voices, hold_music, make_call
from tests.conftest import run_cli, server_in_thread, write_manifest
from tests.media import DEMO_CLIPS, Burst, tone_track, write_audio
from tests.tables import sql

RATE = 16000
WITHIN_S = 0.02 + 1e-9  # 20 ms (whisper's own time step), with float rounding


def _run(folder: Path, server: LocalServer, run: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """One job in-process against ``server``; returns its report."""
    manifest = write_manifest(
        folder,
        pulse={"endpoint": server.url},
        run={"concurrency": 2, "pace": 0, "channels": "split", **run},
        **sections,
    )
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    return result.report


def _words(out: Path) -> list[tuple[Any, ...]]:
    """Words by channel and time, each as the word alone: a piece that ends at a cut may
    end its sentence there, so whisper's punctuation and case on it are no difference."""
    rows = sql(
        out,
        "select t.channel, w.word, w.start_s, w.end_s, w.time_adjusted"
        " from {words} w join {transcripts} t using (item_id) order by t.channel, w.start_s",
    )
    return [(row[0], _bare(row[1]), *row[2:]) for row in rows]


def _bare(word: str) -> str:
    return "".join(c for c in word if c.isalnum() or c == "'").lower()


def _transcripts(out: Path) -> list[tuple[Any, ...]]:
    return sql(
        out,
        "select channel, status, duration_s, streamed_s, word_count "
        "from {transcripts} "
        "order by channel",
    )


def _received_s(server: LocalServer) -> float:
    return sum(record.audio_s for record in server.stats.sessions)


def _plain_and_skipped(
    tmp_path: Path, engine: str, call: Call, run: dict[str, Any] | None = None
) -> tuple[Path, Path, float, float]:
    """The call's folder run plain and skipped (with ``run`` added): outputs and audio each
    server received."""
    received = []
    outs = []
    for name, skip in (("plain", False), ("skipped", True)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "media").symlink_to(call.path.parent)
        with server_in_thread(engine) as server:
            report = _run(folder, server, {"skip_silence": True, **(run or {})} if skip else {})
            assert report["status"] == "completed", report
            assert report["items"]["ok"] == report["items"]["total"]
            received.append(_received_s(server))
        outs.append(folder / "out")
    return outs[0], outs[1], received[0], received[1]


@pytest.fixture(scope="session")
def call(tmp_path_factory: pytest.TempPathFactory) -> Call:
    folder = tmp_path_factory.mktemp("calls") / "media"
    folder.mkdir()
    return make_call(folder / "call.wav", demo_voices(), turns=6, seed=3, music_s=6.0)


def _outside_music(call: Call, channel: int, start_s: float) -> bool:
    # The server opens a segment 0.2 s before a sound: whisper's guesses on music start there.
    return channel != 0 or not any(a - 0.3 <= start_s <= b + 0.3 for a, b in call.music)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "in_pieces"])
def test_skipping_keeps_every_sound_at_its_time_and_streams_far_less(
    tmp_path: Path, call: Call, split: bool
) -> None:
    """The synthetic engine names each burst of sound (a whole turn here, by its pitch):
    the turns come back at the same times, the hold music's notes are gone, and the
    server hears about a third of the call."""
    # About 11.5 s of each channel is streamed: two pieces, cut in a shortened pause.
    run = {"split_long_files": True, "split_threshold_s": 10, "piece_target_s": 6} if split else {}
    plain, skipped, plain_s, skipped_s = _plain_and_skipped(tmp_path, "synthetic", call, run)
    assert skipped_s < 0.45 * plain_s, (skipped_s, plain_s)
    expected = [w for w in _words(plain) if _outside_music(call, w[0], float(w[2]))]
    got = _words(skipped)
    assert len(_words(plain)) > len(expected) == len(call.turns)
    assert [w[:2] for w in got] == [w[:2] for w in expected]
    for (_, _, start, end, adjusted), (_, _, e_start, e_end, _) in zip(got, expected, strict=True):
        assert not adjusted
        assert abs(start - e_start) <= WITHIN_S and abs(end - e_end) <= WITHIN_S, (start, e_start)
    rows = _transcripts(skipped)
    for channel, status, duration_s, streamed_s, _ in rows:
        assert status == "ok"
        assert abs(duration_s - call.duration_s) < 0.01
        assert streamed_s < 0.45 * duration_s
        # The clips' own quiet lead-ins and tails go too; their sound all stays (above).
        assert streamed_s > 0.7 * call.speech_s(channel)
    if split:
        pieces = sql(skipped, "select min(pieces) from {transcripts}")
        assert pieces[0][0] == 2


@pytest.mark.whisper
def test_whisper_hears_the_same_words_at_the_same_times(tmp_path: Path, call: Call) -> None:
    plain, skipped, plain_s, skipped_s = _plain_and_skipped(tmp_path, "whisper", call)
    assert skipped_s < 0.45 * plain_s
    expected = [w[:4] for w in _words(plain) if _outside_music(call, w[0], float(w[2]))]
    got = [w[:4] for w in _words(skipped)]
    assert [w[:2] for w in got] == [w[:2] for w in expected]
    assert len(got) >= 30
    for (_, word, start, end), (_, _, e_start, e_end) in zip(got, expected, strict=True):
        assert abs(start - e_start) <= WITHIN_S and abs(end - e_end) <= WITHIN_S, (
            word,
            start,
            e_start,
        )


@pytest.mark.whisper
def test_a_file_that_is_all_speech_loses_nothing(tmp_path: Path) -> None:
    media = tmp_path / "calls"
    media.mkdir()
    voices = demo_voices()
    speech = np.concatenate([audio for _, audio in voices])
    write_audio(media / "talk.wav", [speech], RATE)
    call = Call(media / "talk.wav", speech.size / RATE)
    plain, skipped, plain_s, skipped_s = _plain_and_skipped(tmp_path, "whisper", call)
    assert [w[:2] for w in _words(skipped)] == [w[:2] for w in _words(plain)]
    assert len(_words(plain)) >= 20
    for (_, _, start, end, _), (_, _, e_start, e_end, _) in zip(
        _words(skipped), _words(plain), strict=True
    ):
        assert abs(start - e_start) <= WITHIN_S and abs(end - e_end) <= WITHIN_S
    # Only the clips' own quiet lead-in and tail may go.
    assert skipped_s > 0.9 * plain_s


def test_a_file_with_no_speech_costs_no_session(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(RATE * 20) * 0.001).astype(np.float32)
    music = noise.copy()
    music[RATE * 5 : RATE * 13] += hold_music(8.0, random.Random(1))
    write_audio(media / "hold.wav", [music, noise], RATE)
    with server_in_thread("synthetic") as server:
        report = _run(tmp_path, server, {"skip_silence": True})
        assert server.stats.sessions_opened == 0
    assert report["items"]["ok"] == 2
    assert report["billing"]["billed_audio_minutes"] == 0
    assert report["billing"]["billed_audio_minutes_without_skipping"] == pytest.approx(
        40 / 60, abs=1e-3
    )
    assert report["audio"]["skipped_s"] == pytest.approx(40, abs=0.01)
    rows = _transcripts(tmp_path / "out")
    assert [(r[1], r[3], r[4]) for r in rows] == [("ok", 0.0, 0), ("ok", 0.0, 0)]


def test_dry_run_says_which_items_need_no_session_and_whether_the_cap_holds(
    tmp_path: Path,
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_audio(media / "quiet.wav", [np.zeros(RATE * 10, dtype=np.float32)], RATE)
    shutil.copyfile(DEMO_CLIPS / "cancel.wav", media / "speech.wav")  # 3.9 s of speech
    for skip, cap, fits in ((True, 0.01, False), (True, None, None), (False, 1.0, True)):
        run: dict[str, Any] = {"skip_silence": skip}
        if cap is not None:
            run["max_billed_minutes"] = cap
        manifest = write_manifest(tmp_path, run=run)
        done = run_cli("run", str(manifest), "--dry-run", "--json")
        assert done.returncode == 0, done.stderr
        plan = json.loads(done.stdout)
        assert plan["fits_cap"] is fits
        by_name = {Path(p["source"]).name: p for p in plan["plan"]}
        assert sum(p["streamed_s"] for p in plan["plan"]) == pytest.approx(
            plan["streamed_s"], abs=0.01
        )
        if skip:  # the detector hears nothing in the quiet file: no session for it
            assert by_name["quiet.wav"]["streamed_s"] == 0
            assert by_name["quiet.wav"]["action"].startswith("no speech")
        else:  # streamed whole: each item streams its duration
            assert by_name["quiet.wav"]["streamed_s"] == pytest.approx(10.0, abs=0.01)
            assert by_name["quiet.wav"]["action"] == "stream"
        assert by_name["speech.wav"]["action"] == "stream"
        assert by_name["speech.wav"]["streamed_s"] > 2.0


def test_dry_run_estimates_the_saving_without_a_session(tmp_path: Path, call: Call) -> None:
    (tmp_path / "media").symlink_to(call.path.parent)
    manifest = write_manifest(
        tmp_path,
        run={"channels": "split", "skip_silence": True},
        output={"path": "out", "price_per_minute": 0.01, "currency": "EUR"},
    )
    done = run_cli("run", str(manifest), "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["audio_s"] == pytest.approx(2 * call.duration_s, abs=0.1)
    assert plan["streamed_s"] < 0.45 * plan["audio_s"]
    assert plan["skipped_s"] == pytest.approx(plan["audio_s"] - plan["streamed_s"], abs=0.01)
    assert plan["estimated_cost"] < 0.45 * plan["estimated_cost_without_skipping"]
    assert plan["currency"] == "EUR"
    assert all(p["streamed_s"] > 0.7 * call.speech_s(p["channel"]) for p in plan["plan"])
    assert not (tmp_path / "out").exists()


def test_spend_cap_stops_the_run_and_the_rerun_finishes(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for n in range(5):
        bursts = [Burst(1.0 + 2 * i, 0.3, 440 + 110 * n) for i in range(4)]
        write_audio(media / f"call{n}.wav", [tone_track(bursts, 10.0, RATE)], RATE)
    manifest = write_manifest(
        tmp_path,
        run={"concurrency": 2, "pace": 0, "max_billed_minutes": 0.45},  # 27 s: two files
        output={"path": "out", "price_per_minute": 0.5, "currency": "EUR"},
    )
    first = run_cli("run", str(manifest))
    assert first.returncode == 7, first.stderr
    assert "spend cap of 0.45 billed minutes reached" in first.stderr
    summary = next(line for line in first.stderr.splitlines() if "left for the next run" in line)
    assert summary.count("spend cap") == 1 and "3 item(s)" in summary
    report = json.loads((tmp_path / "out/_reports/test-job/latest.json").read_text())
    assert report["status"] == "capped"
    assert report["items"]["ok"] == 2 and report["items"]["not_run"] == 3
    assert report["left"] == {"items": 3, "audio_s": pytest.approx(30.0, abs=0.1)}
    assert report["billing"]["billed_audio_minutes"] <= 0.45
    assert report["billing"]["currency"] == "EUR"
    markdown = (tmp_path / "out/_reports/test-job/latest.md").read_text()
    assert f"estimated cost {report['billing']['estimated_cost']} EUR" in markdown
    # A cost cap works the same way: 0.2 EUR at 0.5 EUR a minute is 24 s, two more files.
    second = run_cli("run", str(manifest), "--max-cost", "0.2")
    assert second.returncode == 7, second.stderr
    manifest.write_text(manifest.read_text().replace("max_billed_minutes: 0.45", ""))
    third = run_cli("run", str(manifest))
    assert third.returncode == 0, third.stderr
    sources = sql(tmp_path / "out", "select source from {transcripts} where status = 'ok'")
    assert sorted(Path(str(s[0])).name for s in sources) == [f"call{n}.wav" for n in range(5)]


def test_a_cost_cap_without_a_price_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    write_audio(tmp_path / "media/a.wav", [np.zeros(RATE, dtype=np.float32)], RATE)
    manifest = write_manifest(tmp_path)
    done = run_cli("run", str(manifest), "--max-cost", "5")
    assert done.returncode == 2
    assert "price_per_minute" in done.stderr
    # Without a price, the report states minutes only: a cost of 0 would read as free.
    assert run_cli("run", str(manifest)).returncode == 0
    markdown = (tmp_path / "out/_reports/test-job/latest.md").read_text()
    assert "Billed audio: " in markdown and "estimated cost" not in markdown
