"""The CLI end to end against a real local server: speech in, Parquet out, exit codes.
(The demo job, `make run`, is run and checked by tests/test_readme.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import point_at, run_cli, server_in_thread, write_manifest
from tests.media import DEMO_CLIPS, SPEECH, word_error_rate
from tests.tables import sql

pytestmark = pytest.mark.whisper


def test_mixed_job_good_speech_corrupt_and_missing(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for name in SPEECH:
        shutil.copy(DEMO_CLIPS / name, media / name)
    (media / "corrupt.mp3").write_bytes(b"ID3 this is not really audio at all " * 50)
    manifest = write_manifest(
        tmp_path,
        inputs=[{"glob": "media/*"}, {"path": "missing/call-17.wav"}],
        run={"concurrency": 2, "pace": 4.0},
        pulse={"sentence_timestamps": True},
    )
    with server_in_thread("whisper") as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest), env={"SMALLEST_API_KEY": "test-key-e2e"})
        assert server.stats.max_open <= 2
        assert server.stats.sessions_opened == 3  # bad inputs cost no session

    assert done.returncode == 1, done.stderr
    out = tmp_path / "out"
    rows = sql(out, "select source, status, error_kind, transcript, duration_s from {transcripts}")
    by_name = {Path(str(r[0])).name: r for r in rows}
    assert set(by_name) == {*SPEECH, "corrupt.mp3", "call-17.wav"}
    for name, reference in SPEECH.items():
        _, status, kind, transcript, _ = by_name[name]
        assert status == "ok" and kind is None
        assert word_error_rate(reference, str(transcript)) <= 0.1, transcript
    assert by_name["corrupt.mp3"][1:3] == ("failed", "not_media")
    assert by_name["call-17.wav"][1:3] == ("failed", "not_found")

    outside = sql(
        out,
        "select count(*) from {words} w join {transcripts} t using (item_id)"
        " where w.start_s < 0 or w.end_s > t.duration_s + 0.01 or w.start_s > w.end_s",
    )
    assert outside == [(0,)]
    in_order = sql(
        out,
        "select item_id, list(start_s order by idx) = list(start_s order by start_s)"
        " from {words} group by item_id",
    )
    assert all(ok for _, ok in in_order) and len(in_order) == 3
    assert sql(out, "select count(distinct item_id) from {utterances}") == [(3,)]

    summary = done.stdout.strip().splitlines()[-1]
    assert "ok=3 failed=2" in summary
    report_path = Path(done.stdout.split("report: ")[1].split()[0])
    report = json.loads(report_path.read_text())
    assert report["items"]["ok"] == 3 and report["failures_by_kind"] == {
        "not_media": 1,
        "not_found": 1,
    }
    assert report_path.with_suffix(".md").exists()
    # The key never lands in anything the run wrote or printed.
    written = [p for p in out.rglob("*") if p.is_file()]
    assert all(b"test-key-e2e" not in p.read_bytes() for p in written)
    assert "test-key-e2e" not in done.stdout + done.stderr
