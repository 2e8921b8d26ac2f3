"""Long recordings cut at quiet points, streamed as pieces, stitched back exactly."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np

from batch.split import FRAME_S, choose_cuts
from tests.conftest import point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_track, write_format
from tests.tables import sql

RATE = 16000


def _bursts(duration_s: float, seed: int, hz: float = 440) -> list[Burst]:
    """Bursts of 0.2-0.4 s separated by 0.7-1.5 s of quiet, at irregular times."""
    rng = random.Random(seed)
    bursts, t = [], 0.5
    while t < duration_s - 1.0:
        length = rng.uniform(0.2, 0.4)
        bursts.append(Burst(round(t, 3), round(length, 3), hz))
        t += length + rng.uniform(0.7, 1.5)
    return bursts


def test_cuts_land_in_the_quietest_place_near_the_target() -> None:
    energy = np.ones(int(60 / FRAME_S))
    quiet_at_s = [9.0, 21.5, 29.0, 41.0]
    for second in quiet_at_s:
        start = int(second / FRAME_S)
        energy[start : start + 25] = 0.0  # 0.5 s of silence
    frame = int(RATE * FRAME_S)
    cuts = choose_cuts(energy, frame, 60 * RATE, target_s=10.0, window_s=3.0)
    assert cuts[0] == 0 and cuts[-1] == 60 * RATE
    inner = [c / RATE for c in cuts[1:-1]]
    assert len(inner) >= 3
    for cut in inner[:3]:
        assert any(q <= cut <= q + 0.5 for q in quiet_at_s), inner
    assert all(b > a for a, b in itertools.pairwise(cuts))


def test_long_file_streams_in_pieces_with_exact_times(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    duration = 120.0
    truth = _bursts(duration, seed=5)
    write_format(
        media / "board-meeting.flac", "flac_24", [tone_track(truth, duration, 44100)], 44100
    )
    short = [Burst(0.5, 0.3, 880)]
    write_format(media / "short.wav", "wav_s16", [tone_track(short, 3.0, RATE)], RATE)
    manifest = write_manifest(
        tmp_path,
        run={
            "concurrency": 4,
            "pace": 8.0,
            "split_long_files": True,
            "split_threshold_s": 30,
            "piece_target_s": 15,
            "split_window_s": 3,
        },
    )
    with server_in_thread() as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest))
        assert done.returncode == 0, done.stderr
        assert server.stats.max_open <= 4
        pieces_seen = server.stats.sessions_opened
    out = tmp_path / "out"
    rows = sql(
        out, "select source, pieces, duration_s, word_count from {transcripts} order by source"
    )
    (long_src, pieces, long_duration, count), (_, short_pieces, _, _) = rows
    assert Path(str(long_src)).name == "board-meeting.flac"
    assert int(str(pieces)) >= 6 and short_pieces == 1
    assert pieces_seen == int(str(pieces)) + 1
    assert abs(float(str(long_duration)) - duration) < 0.001
    assert count == len(truth)

    words = sql(
        out,
        "select w.start_s, w.end_s, w.piece, w.idx from {words} w"
        " join {transcripts} t using (item_id)"
        " where t.source like '%board-meeting.flac' order by w.idx",
    )
    assert [int(str(w[3])) for w in words] == list(range(len(truth)))
    for (start, end, _piece, _), burst in zip(words, truth, strict=True):
        assert abs(float(str(start)) - burst.start_s) <= 0.02, (start, burst)
        assert abs(float(str(end)) - (burst.start_s + burst.length_s)) <= 0.03, (end, burst)
    assert len({w[2] for w in words}) >= 6  # words came from many pieces


def test_split_channels_and_long_files_together(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    duration = 60.0
    left, right = _bursts(duration, seed=1, hz=440), _bursts(duration, seed=2, hz=880)
    tracks = [tone_track(left, duration, RATE), tone_track(right, duration, RATE)]
    write_format(media / "call.wav", "wav_s16", tracks, RATE)
    manifest = write_manifest(
        tmp_path,
        run={
            "concurrency": 4,
            "pace": 0,
            "channels": "split",
            "split_long_files": True,
            "split_threshold_s": 20,
            "piece_target_s": 12,
            "split_window_s": 3,
        },
    )
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    per_channel = sql(
        out,
        "select channel, count(*), count(distinct word), min(pieces)"
        " from {words} w join {transcripts} t using (item_id, channel)"
        " group by channel order by channel",
    )
    assert per_channel == [
        (0, len(left), 1, per_channel[0][3]),
        (1, len(right), 1, per_channel[1][3]),
    ]
    assert all(int(str(row[3])) >= 4 for row in per_channel)


def test_cuts_find_short_pauses_between_dense_sounds(tmp_path: Path) -> None:
    """0.2 s sounds 0.12 s apart: every 300 ms span holds sound, yet no cut may split one."""
    bursts = [Burst(round(0.5 + i * 0.32, 3), 0.2, 440) for i in range(100)]
    duration = 33.0
    media = tmp_path / "media"
    media.mkdir()
    write_format(media / "dense.wav", "wav_s16", [tone_track(bursts, duration, RATE)], RATE)
    manifest = write_manifest(
        tmp_path,
        run={
            "concurrency": 4,
            "pace": 0,
            "split_long_files": True,
            "split_threshold_s": 20,
            "piece_target_s": 8,
            "split_window_s": 2,
        },
    )
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    words = sql(out, "select start_s, piece from {words} order by idx")
    assert len({w[1] for w in words}) >= 3
    assert len(words) == len(bursts)
    for (start, _), burst in zip(words, bursts, strict=True):
        assert abs(float(str(start)) - burst.start_s) <= 0.02


def test_a_failed_piece_fails_the_item_and_counts_every_attempt(tmp_path: Path) -> None:
    from batch.server import FaultConfig

    media = tmp_path / "media"
    media.mkdir()
    bursts = _bursts(40.0, seed=3)
    write_format(media / "long.wav", "wav_s16", [tone_track(bursts, 40.0, RATE)], RATE)
    manifest = write_manifest(
        tmp_path,
        run={
            "concurrency": 3,
            "pace": 4.0,
            "max_attempts": 1,
            "split_long_files": True,
            "split_threshold_s": 20,
            "piece_target_s": 8,
            "split_window_s": 2,
        },
    )
    faults = FaultConfig(seed=1, drop_rate=1.0, fault_at_max_s=0.5)
    with server_in_thread(faults=faults) as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest))
        opened = server.stats.sessions_opened
    assert done.returncode == 1
    rows = sql(tmp_path / "out", "select status, error_kind, error, attempts from {transcripts}")
    assert len(rows) == 1
    status, kind, error, attempts = rows[0]
    assert (status, kind) == ("failed", "connection_lost")
    assert "piece " in str(error)
    assert attempts == opened >= 1  # pieces already streaming when one failed count too
    assert not list((tmp_path / "out" / "_staging").rglob("*.pcm"))  # cache cleaned up
