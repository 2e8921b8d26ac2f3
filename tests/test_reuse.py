"""Session reuse: short files share a session through ``finalize`` and each still gets
exactly the rows its own session gives. The attribution is pure (tested without sockets);
the rest runs whole jobs in-process against the local server on its ``current`` path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from websockets.asyncio.client import connect

from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.pulse.protocol import Generation, PulseOptions, Transcription, Word
from batch.pulse.reuse import Span, reusable, settled, split_finals
from batch.server import FaultConfig, local_server
from batch.server.faults import FaultConfigError
from batch.session import Endpoint
from tests.conftest import TIME_UNIT_S, point_at, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.tables import sql

RATE = 16000

# --- attribution, pure ---------------------------------------------------------------


def _final(*times: tuple[float, float]) -> Transcription:
    words = tuple(Word(f"w{i}", a, b) for i, (a, b) in enumerate(times))
    return Transcription("s", " ".join(w.word for w in words), True, False, "en", words)


def test_each_final_goes_to_the_unit_holding_its_words_on_that_units_time_base() -> None:
    spans = [Span(0.0, 4.0), Span(4.0, 6.5), Span(6.5, 9.0)]
    finals = [_final((0.2, 0.5), (0.9, 1.2)), _final((4.25, 4.5)), _final((6.6, 7.0))]
    split = split_finals(finals, spans)
    assert [[(w.start_s, w.end_s) for f in part for w in f.words] for part in split] == [
        [(0.2, 0.5), (0.9, 1.2)],
        [(0.25, 0.5)],
        [(0.1, 0.5)],
    ]


def test_a_word_a_little_before_its_units_start_begins_at_zero_and_wordless_finals_follow() -> None:
    spans = [Span(0.0, 4.0), Span(4.0, 8.0)]
    wordless = Transcription("s", "hm", True, False, "en")
    split = split_finals([_final((3.98, 4.3)), wordless, _final((1.0, 1.2))], spans)
    assert [w.start_s for w in split[1][0].words] == [0.0]  # its middle is in the second
    assert split[1][1] is not None and split[1][1].transcript == "hm"  # with the one before
    assert [f.words[0].start_s for f in split[0]] == [1.0]


def test_units_are_known_complete_once_a_later_unit_answers_or_is_last_came() -> None:
    spans = [Span(0.0, 4.0), Span(4.0, 8.0), Span(8.0, 12.0)]
    finals = [_final((0.2, 0.5)), _final((4.2, 4.5))]
    assert settled(finals, spans, complete=False) == 1  # unit 1 may have more to come
    assert settled(finals, spans, complete=True) == 3
    assert settled([], spans, complete=False) == 0


def test_only_options_that_carry_nothing_over_and_endpoints_with_finalize_share() -> None:
    plain = PulseOptions()
    assert reusable(plain, Generation.CURRENT) and reusable(plain, Generation.UNIFIED)
    assert not reusable(plain, Generation.LEGACY)  # no finalize there
    for changed in (
        {"word_timestamps": False},
        {"full_transcript": True},
        {"diarize": True},
        {"redact_pii": True},
        {"language": "multi"},
        {"encoding": "ogg_opus"},
    ):
        assert not reusable(PulseOptions(**changed), Generation.CURRENT), changed


# --- whole jobs against the local server ---------------------------------------------


def _short_files(folder: Path) -> None:
    """Short files of differing lengths (some not a whole millisecond), one with speech
    to its very last sample and one silent. In listing order, the fourth starts 3.4005 s
    into a shared session."""
    folder.mkdir()
    shapes = [
        ([Burst(0.2, 0.15, 440), Burst(0.6, 0.15, 660)], 1.5),
        ([Burst(0.1, 0.3, 880)], 0.9),
        ([], 1.0005),  # the next file starts on exactly half a millisecond
        ([Burst(0.3, 0.15, 550), Burst(1.0, 0.2, 770)], 1.2003125),
        ([Burst(0.0, 0.2, 660), Burst(0.55, 0.15, 440)], 0.7),  # speech to the end
        ([Burst(0.4, 0.15, 330), Burst(1.4, 0.15, 990)], 2.0),
    ]
    for index, (bursts, length_s) in enumerate(shapes):
        track = tone_track(bursts, length_s, RATE)
        write_audio(folder / f"short-{index}.wav", [track], RATE)


def _rows(out: Path) -> dict[str, Any]:
    """Each table's rows, by file name (item ids differ between the two outputs)."""
    name = "regexp_extract(t.source, '[^/]+$')"
    join = "join {transcripts} t using (item_id)"
    return {
        "words": sql(
            out,
            f"select {name}, segment, idx, word, w.start_s, w.end_s from {{words}} w {join}"
            " order by 1, 3",
        ),
        "segments": sql(
            out,
            f"select {name}, segment, text, s.start_s, s.end_s from {{segments}} s {join}"
            " order by 1, 2",
        ),
        "items": sql(
            out,
            f"select {name}, status, transcript, language, duration_s from {{transcripts}} t"
            " order by 1",
        ),
    }


async def _run(folder: Path, url: str, **run: Any) -> dict[str, Any]:
    manifest = write_manifest(
        folder,
        pulse={"endpoint": "local", "local_engine": "synthetic", "protocol": "current"},
        run={"concurrency": 2, "order": "listing", **run},
    )
    point_at(manifest, url)
    await run_job(load_manifest(manifest), RunOptions())
    return _rows(folder / "out")


@pytest.mark.anyio
@pytest.mark.parametrize("concurrency", [1, 2])
async def test_reuse_gives_every_word_the_time_and_item_its_own_session_gives(
    tmp_path: Path, concurrency: int
) -> None:
    media = tmp_path / "media"
    _short_files(media)
    results = {}
    async with local_server(engine="synthetic") as server:
        for reuse in (False, True):
            folder = tmp_path / f"reuse-{reuse}"
            folder.mkdir()
            (folder / "media").symlink_to(media)
            opened = server.stats.sessions_opened
            results[reuse] = await _run(
                folder, server.current_url, reuse_sessions=reuse, concurrency=concurrency
            )
            results[f"sessions-{reuse}"] = server.stats.sessions_opened - opened
    assert results[True]["words"], "the files hold words"
    for table in ("words", "segments", "items"):
        assert results[True][table] == results[False][table], table
    assert results["sessions-False"] == 6
    assert results["sessions-True"] < 6  # a worker's session goes on to the next file
    assert server.stats.max_open <= concurrency  # never more open than run.concurrency


@pytest.mark.anyio
async def test_a_failure_mid_session_keeps_the_finished_units_and_retries_the_rest(
    tmp_path: Path,
) -> None:
    media = tmp_path / "media"
    _short_files(media)
    baseline, faulted = tmp_path / "baseline", tmp_path / "faulted"
    for folder in (baseline, faulted):
        folder.mkdir()
        (folder / "media").symlink_to(media)
    async with local_server(engine="synthetic") as server:
        expected = await _run(baseline, server.current_url, reuse_sessions=False)
    # One session for all six files; it is dropped after 4.15 s of audio, in the fourth.
    faults = FaultConfig(seed=3, drop_rate=1.0, fault_limit=1, fault_at_max_s=6.0)
    async with local_server(engine="synthetic", faults=faults) as server:
        got = await _run(faulted, server.current_url, concurrency=1, pace=4.0)
        first, *retried = server.stats.sessions
    assert got == expected  # every unit ok, every word where its own session puts it
    assert first.outcome == "drop" and retried
    # The files known complete before the drop keep that session's rows; only the rest
    # are streamed again (the pool's spare worker may stream one file on its own).
    kept = sql(
        faulted / "out",
        f"select sum(duration_s) from {{transcripts}} where session_id = '{first.session_id}'",
    )[0][0]
    assert kept and kept >= 1.0, "a file answered before the drop keeps its row"
    total_s = 1.5 + 0.9 + 1.0005 + 1.2003125 + 0.7 + 2.0
    assert sum(s.audio_s for s in retried) <= total_s - kept + 1e-3  # and an aligning sample


@pytest.mark.anyio
async def test_a_file_that_cannot_be_read_mid_session_fails_alone(tmp_path: Path) -> None:
    _short_files(tmp_path / "media")
    manifest = write_manifest(
        tmp_path,
        pulse={"endpoint": "local", "local_engine": "synthetic", "protocol": "current"},
        run={"concurrency": 1, "order": "listing", "pace": 2.5, "max_attempts": 2},
    )
    async with local_server(engine="synthetic") as server:
        point_at(manifest, server.current_url)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(run_job, load_manifest(manifest), RunOptions())
            for _ in range(round(1000 * TIME_UNIT_S)):  # planned, and the session open
                if server.stats.sessions:
                    break
                await anyio.sleep(0.01)
            (tmp_path / "media" / "short-4.wav").unlink()  # due 3.7 s or more into it
    items = _rows(tmp_path / "out")["items"]
    assert [(name, status) for name, status, *_ in items] == [
        (f"short-{i}.wav", "failed" if i == 4 else "ok") for i in range(6)
    ]
    # The others went on in the same session (the pool's spare worker holds one item
    # while it waits for the session slot: it streams that in a session of its own).
    assert server.stats.sessions_opened <= 2 and server.stats.max_open == 1
    sessions = dict(sql(tmp_path / "out", "select source, session_id from {transcripts}"))
    media = tmp_path / "media"
    assert sessions[str(media / "short-3.wav")] == sessions[str(media / "short-5.wav")]


@pytest.mark.anyio
async def test_the_local_servers_reply_latency_delays_the_upgrade_and_each_reply() -> None:
    with pytest.raises(FaultConfigError, match="reply_latency_s"):
        FaultConfig(reply_latency_s=-1)
    endpoint_options = PulseOptions()
    async with local_server(faults=FaultConfig(reply_latency_s=0.2)) as server:
        url = Endpoint(server.current_url, Generation.CURRENT).session_url(endpoint_options)
        began = anyio.current_time()
        async with connect(url) as ws:
            opened = anyio.current_time()
            await ws.send(json.dumps({"type": "close_stream"}))
            last = json.loads(await ws.recv())
            answered = anyio.current_time()
    assert opened - began >= 0.2 and answered - opened >= 0.2
    assert last["is_last"] is True
