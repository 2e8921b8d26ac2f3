"""Liveness while streaming: a session fed speech that answers nothing is stalled within a
bounded amount of speech, aborted and retried; silence, hold music and pauses never trip it
against a healthy service that answers speech only; a job whose every session stalls stops
with exit 6. The verdict is pure (tested without sockets); the rest runs against the local
server with its silent fault (`FaultConfig.stall_after_s`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from batch.errors import ServiceStalling, SessionStalled, classify, error_kind
from batch.job import RunOptions, exit_code, run_job
from batch.manifest import load_manifest
from batch.pulse.liveness import Liveness, LivenessPolicy, Verdict, probe_message
from batch.pulse.protocol import Generation, Word
from batch.server import FaultConfig, local_server
from batch.server.engines import SyntheticEngine
from batch.server.faults import FaultKind, draw_fault
from batch.speech_gauge import SpeechGauge
from tests.calls import RATE, demo_voices, hold_music, make_call
from tests.conftest import TIME_UNIT_S, point_at, write_manifest
from tests.media import write_audio

# --- the verdict, pure -----------------------------------------------------------


def test_unanswered_speech_holds_at_the_bound_and_an_answer_resets_it() -> None:
    live = Liveness(LivenessPolicy(unanswered_speech_s=15.0, watch_after_s=3.0))
    assert not live.watching
    for _ in range(29):  # 14.5 s of speech in half seconds
        live.fed(0.5, 0.5)
    assert live.verdict is Verdict.FEED and live.watching
    live.fed(0.5, 0.5)
    assert live.verdict is Verdict.HOLD
    live.answered()
    assert live.verdict is Verdict.FEED and not live.watching
    assert live.unanswered_speech_s == 0.0


def test_silence_and_music_never_hold_and_unmeasured_audio_counts_in_full() -> None:
    live = Liveness(LivenessPolicy(unanswered_speech_s=15.0, watch_after_s=3.0))
    live.fed(3.0, None)  # not measured: counted as if speech
    assert live.unanswered_speech_s == 3.0 and live.watching
    for _ in range(3600):  # an hour of measured non-speech
        live.fed(1.0, 0.0)
    assert live.verdict is Verdict.FEED and live.unanswered_speech_s == 3.0
    live.fed(1.0, 5.0)  # a detector cannot hear more speech than the audio holds
    assert live.unanswered_speech_s == 4.0


def test_liveness_off_never_holds() -> None:
    live = Liveness(LivenessPolicy(unanswered_speech_s=0.0))
    live.fed(10_000.0, None)
    assert live.verdict is Verdict.FEED and not live.watching


def test_the_probe_is_finalize_where_the_endpoint_has_it() -> None:
    assert probe_message(Generation.LEGACY) is None
    assert probe_message(Generation.CURRENT) == '{"type": "finalize"}'
    assert probe_message(Generation.UNIFIED) == '{"type": "finalize"}'


def test_stalled_is_a_retryable_error_kind() -> None:
    stalled = SessionStalled(15.2, 18.0, 30.0, probed=True)
    assert error_kind(stalled) == "stalled" and classify(stalled).retry
    assert "finalize probe" in str(stalled) and "stall_after_speech_s" in str(stalled)
    assert not classify(ServiceStalling(3, stalled)).retry


def test_the_silent_fault_is_drawn_for_sessions_the_rates_leave_alone() -> None:
    draw = draw_fault(FaultConfig(stall_after_s=4.0), 0)
    assert draw is not None and (draw.kind, draw.trigger_s) == (FaultKind.SILENT, 4.0)
    assert draw_fault(FaultConfig(), 0) is None


# --- the speech measure, on real audio --------------------------------------------


def _pcm(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


class _Chunks:
    """An `AudioSource` of 128 ms linear16 chunks."""

    def __init__(self, samples: np.ndarray) -> None:
        self._data = _pcm(samples)
        self.position_s = 0.0

    def __iter__(self) -> Iterator[bytes]:
        step = 2 * RATE * 128 // 1000
        for start in range(0, len(self._data), step):
            chunk = self._data[start : start + step]
            self.position_s += len(chunk) / 2 / RATE
            yield chunk


def _speech_heard(samples: np.ndarray, watching: bool = True) -> list[float | None]:
    gauge = SpeechGauge(_Chunks(samples), "linear16", RATE, lambda: watching)
    marks = []
    for _ in gauge:
        marks.append(gauge.take())
    return marks


def test_the_gauge_hears_speech_and_not_music_or_silence() -> None:
    speech = np.concatenate([audio for _, audio in demo_voices()])
    heard = sum(m or 0.0 for m in _speech_heard(speech))
    assert heard > 0.5 * speech.size / RATE
    assert sum(m or 0.0 for m in _speech_heard(hold_music(20.0, random.Random(1)))) == 0.0
    noise = (np.random.default_rng(0).standard_normal(RATE * 10) * 0.001).astype(np.float32)
    assert sum(m or 0.0 for m in _speech_heard(noise)) == 0.0
    assert set(_speech_heard(speech, watching=False)) == {None}  # not asked: not measured


# --- against the local server ----------------------------------------------------


def _speech_file(folder: Path, name: str, seconds: float) -> np.ndarray:
    """A mono recording of the demo clips, back to back, for about ``seconds``."""
    folder.mkdir(parents=True, exist_ok=True)
    clips = [audio for _, audio in demo_voices()]
    pause = np.zeros(RATE // 4, dtype=np.float32)
    parts: list[np.ndarray] = []
    while sum(p.size for p in parts) < seconds * RATE:
        parts += [clips[len(parts) // 2 % len(clips)], pause]
    track = np.concatenate(parts)
    write_audio(folder / name, [track], RATE)
    return track


class _Mute(SyntheticEngine):
    """A healthy service that hears no speech at all: with no partials (served with a
    huge ``partial_interval_s``), it sends only empty finals, for finalize and the end."""

    def recognize(
        self, audio: Any, sample_rate: int, hotwords: str | None = None, final: bool = True
    ) -> list[Word]:
        return []


def _rows(out: Path) -> list[tuple[Any, ...]]:
    t = f"read_parquet('{out}/transcripts/**/*.parquet', hive_partitioning=true)"
    query = f"select source, status, error_kind, attempts, transcript from {t} order by source"
    return duckdb.sql(query).fetchall()


# How long a held session waits for an answer (``final_timeout_s``): where every session
# stalls, none ever comes, so the wait is kept short; a live service answers well within it.
STALLED_WAIT_S = 0.5 * TIME_UNIT_S
LIVE_WAIT_S = 2.0 * TIME_UNIT_S


def _manifest(tmp_path: Path, url: str, **run: Any) -> Path:
    settings = {"concurrency": 1, "pace": 0, "max_attempts": 3, "backoff_initial_s": 0.05,
                "final_timeout_s": LIVE_WAIT_S, **run}  # fmt: skip
    manifest = write_manifest(tmp_path, run=settings)
    point_at(manifest, url)
    return manifest


@pytest.mark.anyio
@pytest.mark.parametrize("generation", [Generation.LEGACY, Generation.CURRENT])
async def test_a_mid_stream_stall_is_noticed_within_the_bound_and_retried(
    tmp_path: Path, generation: Generation
) -> None:
    track = _speech_file(tmp_path / "media", "talk.wav", 60.0)
    faults = FaultConfig(stall_after_s=4.0, fault_limit=1)
    async with local_server(engine="synthetic", faults=faults) as server:
        manifest = _manifest(
            tmp_path, server.url_for(generation), final_timeout_s=1.0 * TIME_UNIT_S
        )
        result = await run_job(load_manifest(manifest), RunOptions())
        await server.wait_idle()
    [(_, status, kind, attempts, transcript)] = _rows(tmp_path / "out")
    assert (status, kind, attempts) == ("ok", None, 2)
    stalled, retry = server.stats.sessions
    assert stalled.fault is FaultKind.SILENT and retry.fault is None and retry.completed
    # The default bound: 15 s of unanswered speech, as the detector hears it (the clips'
    # pauses and quiet edges come on top), counted from the last answer, which came before
    # the service fell silent: so at most 15 s of speech after it.
    after = track[4 * RATE : round(stalled.audio_s * RATE)]
    speech_after_s = sum(m or 0.0 for m in _speech_heard(after))
    assert 10.0 < speech_after_s <= 15.0 + 0.5, speech_after_s
    assert stalled.audio_s < 0.5 * track.size / RATE
    assert transcript.split() == retry.final_words  # every word, once
    assert result.report["items"]["ok"] == 1


@pytest.mark.anyio
async def test_a_minute_of_silence_and_hold_music_is_not_a_stall(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batch.stallwatch")
    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    quiet = (rng.standard_normal(RATE * 30) * 0.001).astype(np.float32)
    music = hold_music(30.0, random.Random(1))
    clip = demo_voices()[0][1]
    write_audio(media / "hold.wav", [np.concatenate([clip, quiet, music, clip])], RATE)
    # The strictest healthy service: it answers no speech at all (nor music), only the end.
    async with local_server(engine=_Mute(), partial_interval_s=1e9) as server:
        manifest = _manifest(tmp_path, server.url)
        await run_job(load_manifest(manifest), RunOptions())
        await server.wait_idle()
    [(_, status, kind, attempts, _)] = _rows(tmp_path / "out")
    assert (status, kind, attempts) == ("ok", None, 1)
    assert server.stats.sessions_opened == 1 and server.stats.sessions[0].audio_s > 60.0
    assert "no answer to" not in caplog.text  # never even held for an answer


@pytest.mark.anyio
async def test_a_live_service_answers_the_probe_even_when_it_hears_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batch.stallwatch")
    _speech_file(tmp_path / "media", "talk.wav", 40.0)
    # It answers a finalize probe with an empty final: alive, though it hears nothing.
    async with local_server(engine=_Mute(), partial_interval_s=1e9) as server:
        manifest = _manifest(tmp_path, server.current_url)
        await run_job(load_manifest(manifest), RunOptions())
        await server.wait_idle()
    [(_, status, kind, attempts, _)] = _rows(tmp_path / "out")
    assert (status, kind, attempts) == ("ok", None, 1)
    assert "no answer to" in caplog.text  # held, probed, answered: fed on


@pytest.mark.anyio
async def test_every_session_stalling_stops_the_job_with_exit_6(tmp_path: Path) -> None:
    for index in range(3):
        _speech_file(tmp_path / "media", f"talk{index}.wav", 25.0)
    async with local_server(engine="synthetic", faults=FaultConfig(stall_after_s=1.0)) as server:
        manifest = _manifest(
            tmp_path, server.url, max_refusals_in_a_row=3, final_timeout_s=STALLED_WAIT_S
        )
        result = await run_job(load_manifest(manifest), RunOptions())
        await server.wait_idle()
    report = result.report
    assert exit_code(report) == 6
    assert report["status"] == "aborted" and "stalled" in str(report)
    assert server.stats.sessions_opened == 3  # the streak, then nothing more
    assert not any(s.completed for s in server.stats.sessions)


@pytest.mark.anyio
async def test_an_item_whose_sessions_all_stall_fails_as_stalled(tmp_path: Path) -> None:
    _speech_file(tmp_path / "media", "talk.wav", 25.0)
    async with local_server(engine="synthetic", faults=FaultConfig(stall_after_s=1.0)) as server:
        manifest = _manifest(tmp_path, server.url, max_attempts=2, final_timeout_s=STALLED_WAIT_S)
        result = await run_job(load_manifest(manifest), RunOptions())
        await server.wait_idle()
    [(_, status, kind, attempts, _)] = _rows(tmp_path / "out")
    assert (status, kind, attempts) == ("failed", "stalled", 2)
    assert exit_code(result.report) == 1 and "stalled" in str(result.report)


@pytest.mark.whisper
@pytest.mark.anyio
async def test_whisper_on_a_call_with_a_minute_of_hold_music_is_not_a_stall(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="batch.stallwatch")
    media = tmp_path / "media"
    media.mkdir()
    call = make_call(media / "call.wav", demo_voices(), turns=4, seed=3, music_s=60.0)
    async with local_server(engine="whisper") as server:  # legacy path: no probe to lean on
        manifest = _manifest(tmp_path, server.url, final_timeout_s=30.0 * TIME_UNIT_S)
        await run_job(load_manifest(manifest), RunOptions())
        await server.wait_idle(timeout_s=30.0)
    [(_, status, kind, attempts, transcript)] = _rows(tmp_path / "out")
    assert (status, kind, attempts) == ("ok", None, 1)
    assert call.duration_s > 60.0 and "subscription" in transcript.lower()
    assert "no answer to" not in caplog.text


@pytest.mark.anyio
async def test_empty_finals_to_speech_are_no_answer_where_there_is_no_probe(
    tmp_path: Path,
) -> None:
    _speech_file(tmp_path / "media", "talk.wav", 40.0)
    # Alive, but it transcribes nothing: an empty final per utterance, on the legacy path.
    async with local_server(engine=_Mute(), partial_interval_s=1e9) as server:
        manifest = _manifest(tmp_path, server.url, max_attempts=1, final_timeout_s=STALLED_WAIT_S)
        await run_job(load_manifest(manifest), RunOptions())
        await server.wait_idle()
    [(_, status, kind, attempts, _)] = _rows(tmp_path / "out")
    assert (status, kind, attempts) == ("failed", "stalled", 1)
    assert server.stats.sessions[0].audio_s < 30.0
