"""Session deadlines follow the audio actually sent, not the probe: an MP3 whose header
understates its length is streamed whole and stored with its decoded duration."""

from __future__ import annotations

from pathlib import Path

import anyio
import duckdb

from batch.decode import probe
from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.session import Timeouts
from tests.conftest import write_manifest
from tests.media import Burst, tone_track, write_mp3_probed_short
from tests.tables import parquet

RATE = 44100


def test_deadline_grows_with_the_audio_sent() -> None:
    fixed = Timeouts(session_deadline_s=10.0)
    assert fixed.grown_deadline_s(1000.0) == 10.0
    growing = Timeouts(session_deadline_s=10.0, deadline_per_audio_s=1.5, deadline_slack_s=2.0)
    assert growing.grown_deadline_s(1.0) == 10.0  # never below the probe's deadline
    assert growing.grown_deadline_s(100.0) == 152.0


def test_file_longer_than_its_header_is_not_timed_out(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    bursts = [Burst(start, 0.3, 440) for start in (0.5, 5.5, 10.5, 15.5)]
    body = tone_track(bursts, 20.0, RATE)
    mp3 = write_mp3_probed_short(media / "vbr.mp3", 1.0, body, RATE)
    probed = probe(mp3).duration_s
    assert probed is not None and probed < 4.0  # the header says a fraction of 21 s
    # Paced at 16x: 21 s of audio take 1.3 s to send (more on a loaded machine); the
    # probe's deadline is 3.8 s / 16 + 0.5 s, under 0.8 s.
    run = {"pace": 16.0, "session_deadline_factor": 1.0, "session_deadline_slack_s": 0.5,
           "max_attempts": 1}  # fmt: skip
    manifest = write_manifest(tmp_path, run=run)
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 1, result.report["failures"]
    assert result.report["attempts"] == 1  # no attempt timed out and was billed for nothing
    t = parquet(tmp_path / "out", "transcripts")
    w = parquet(tmp_path / "out", "words")
    ((duration,),) = duckdb.sql(f"select duration_s from {t}").fetchall()
    assert abs(duration - 21.0) < 0.2  # decoded, not probed
    starts = [s for (s,) in duckdb.sql(f"select start_s from {w} order by idx").fetchall()]
    assert len(starts) == 4 and starts[-1] > 16.0  # words long past the probed end
    billed_s = result.report["billing"]["billed_audio_minutes"] * 60
    assert abs(billed_s - duration) < 0.1  # billed what was decoded and sent
