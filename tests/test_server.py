"""The local Pulse-compatible server, tested with a real websockets client on loopback.

Audio is made in the tests (tone bursts) or decoded from the project's demo clips with
PyAV; G.711 audio is encoded with FFmpeg's encoders, independently of the server's own
tables. Every wait is a multiple of ``UNIT_S`` (raise PULSE_BATCH_TEST_TIME_UNIT on slow
machines).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import av
import numpy as np
import numpy.typing as npt
import pytest
from typer.testing import CliRunner
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from batch.cli import app as cli_app
from batch.pulse.protocol import MalformedMessage, ServerError, parse_message
from batch.server import (
    FaultConfig,
    FaultConfigError,
    FaultKind,
    LocalServer,
    draw_fault,
    local_server,
)
from batch.server.audio import ALAW_TABLE, MULAW_TABLE
from batch.server.cli import is_loopback
from batch.server.handshake import bearer_matches
from batch.server.vad import Segmenter
from tests.conftest import TIME_UNIT_S, run_cli
from tests.media import word_error_rate

UNIT_S = TIME_UNIT_S  # the suite's one time unit (PULSE_BATCH_TEST_TIME_UNIT)
CLIPS = Path(__file__).resolve().parents[1] / "jobs" / "demo" / "clips"
SPEECH = {
    "callback.flac": "Please call me back tomorrow morning about the invoice.",
    "support.mp3": "Thank you for calling customer support.",
    "cancel.wav": "I would like to cancel my subscription.",
}
KEY = "test-key-123"
Audio = npt.NDArray[np.float32]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- audio helpers -------------------------------------------------------------------


def load_clip(name: str, rate: int) -> Audio:
    """Decode a demo clip to mono float32 at ``rate`` with PyAV."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks = []
    with av.open(str(CLIPS / name)) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32)


def encode(audio: Audio, encoding: str, rate: int) -> bytes:
    """Wire bytes; G.711 through FFmpeg's encoders so the server's tables are checked."""
    if encoding == "linear16":
        return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    if encoding == "linear32":
        return (np.clip(audio, -1, 1).astype(np.float64) * 2147483647).astype("<i4").tobytes()
    codec = av.CodecContext.create({"mulaw": "pcm_mulaw", "alaw": "pcm_alaw"}[encoding], "w")
    codec.sample_rate, codec.layout, codec.format = rate, "mono", "s16"
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate, frame.pts = rate, 0
    return b"".join(bytes(p) for p in [*codec.encode(frame), *codec.encode(None)])


def silence(seconds: float, rate: int) -> Audio:
    return np.zeros(round(seconds * rate), dtype=np.float32)


def tone(hz: int, seconds: float, rate: int, amplitude: float = 0.5) -> Audio:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def bursts(plan: Sequence[tuple[int | None, float]], rate: int) -> tuple[Audio, list[Any]]:
    """Concatenate (hz or None for silence, seconds) pieces; returns the audio and the
    expected (word, start_s, end_s) of every tone."""
    pieces, expected, t = [], [], 0.0
    for hz, seconds in plan:
        pieces.append(silence(seconds, rate) if hz is None else tone(hz, seconds, rate))
        if hz is not None:
            expected.append((f"tone{hz}", t, t + seconds))
        t += seconds
    return np.concatenate(pieces), expected


# --- client helpers ------------------------------------------------------------------


def url_for(server: LocalServer, *, unified: bool = False, **params: Any) -> str:
    base = server.unified_url if unified else server.url
    if unified:
        params.setdefault("model", "pulse")
    text = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
    return f"{base}?{urlencode(text)}" if text else base


def end_frame(unified: bool) -> str:
    return json.dumps({"type": "close_stream" if unified else "end"})


@dataclass
class Session:
    """What a client saw: JSON messages, raw non-JSON frames, the close code, and
    whether it gave up waiting for the close."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    junk: list[str] = field(default_factory=list)
    close_code: int | None = None
    timed_out: bool = False

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("is_final")]

    @property
    def words(self) -> list[dict[str, Any]]:
        return [w for m in self.finals for w in m.get("words", [])]

    @property
    def text(self) -> str:
        return " ".join(m["transcript"] for m in self.finals if m["transcript"])


async def collect(ws: ClientConnection, session: Session, timeout_s: float) -> Session:
    """Read until the server closes, or give up after ``timeout_s`` (``timed_out``)."""
    with anyio.move_on_after(timeout_s) as scope:
        try:
            while True:
                frame = await ws.recv()
                try:
                    session.messages.append(json.loads(frame))
                except json.JSONDecodeError:
                    session.junk.append(str(frame))
        except ConnectionClosed:
            session.close_code = ws.close_code
    session.timed_out = scope.cancelled_caught
    return session


async def send_audio(ws: ClientConnection, payload: bytes, chunk: int = 4096) -> None:
    for i in range(0, len(payload), chunk):
        await ws.send(payload[i : i + chunk])


async def run_session(
    url: str,
    payload: bytes,
    *,
    unified: bool = False,
    key: str | None = KEY,
    timeout_s: float = 10 * UNIT_S,
) -> Session:
    """Send ``payload`` unpaced, then the end message; collect everything until close.

    Sending first is safe: the server reads audio independently of sending results.
    """
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with connect(url, additional_headers=headers, compression=None) as ws:
        try:
            await send_audio(ws, payload)
            await ws.send(end_frame(unified))
        except ConnectionClosed:
            pass  # the server dropped us; collect() records how
        return await collect(ws, Session(), timeout_s)


async def refused(url: str, key: str | None = KEY) -> InvalidStatus:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, additional_headers=headers, compression=None):
            pass
    return info.value


def assert_words_match(words: list[dict[str, Any]], expected: list[Any], tol_s: float) -> None:
    assert [w["word"] for w in words] == [e[0] for e in expected]
    for word, (_, start, end) in zip(words, expected, strict=True):
        assert abs(word["start"] - start) <= tol_s, (word, start)
        assert abs(word["end"] - end) <= tol_s, (word, end)


def assert_well_formed(session: Session) -> None:
    """session_id everywhere, language on finals, is_last only at the end, close 1000."""
    assert session.messages and not session.timed_out
    ids = {m["session_id"] for m in session.messages}
    assert len(ids) == 1 and next(iter(ids)).startswith("sess_")
    for m in session.finals:
        assert m["language"] == "en" and m["languages"] == ["en"]
    assert session.messages[-1]["is_last"] is True and session.messages[-1]["is_final"]
    assert not any(m["is_last"] for m in session.messages[:-1])
    assert session.close_code == 1000


# --- pure parts ----------------------------------------------------------------------


def decode_with_ffmpeg(codec_name: str) -> Audio:
    codec = av.CodecContext.create(codec_name, "r")
    codec.sample_rate, codec.layout = 8000, "mono"
    frames = codec.decode(av.Packet(bytes(range(256))))
    return (np.concatenate([f.to_ndarray().reshape(-1) for f in frames]) / 32768.0).astype(
        np.float32
    )


def test_g711_tables_match_ffmpeg() -> None:
    np.testing.assert_array_equal(MULAW_TABLE, decode_with_ffmpeg("pcm_mulaw"))
    np.testing.assert_array_equal(ALAW_TABLE, decode_with_ffmpeg("pcm_alaw"))


def test_segmenter_closes_on_silence_and_force_cuts_long_speech() -> None:
    rate = 8000
    segmenter = Segmenter(rate, max_segment_s=5.0)
    audio = np.concatenate([tone(300, 1.0, rate), silence(1.0, rate), tone(300, 12.0, rate)])
    segments = segmenter.push(audio) + segmenter.flush()
    assert segments[0].start_s == pytest.approx(0.0) and segments[0].duration_s < 1.7
    assert all(s.duration_s <= 5.0 for s in segments)
    assert [s.index for s in segments] == list(range(len(segments)))
    # Consecutive pieces of the long stretch are contiguous and cover all of it.
    for before, after in itertools.pairwise(segments[1:]):
        assert after.start_sample == before.start_sample + len(before.audio)
    assert segments[-1].start_s + segments[-1].duration_s == pytest.approx(14.0)


def test_fault_draws_are_deterministic_and_follow_rates() -> None:
    config = FaultConfig(seed=7, drop_rate=0.25, refuse_429_rate=0.25, fault_at_max_s=3.0)
    draws = [draw_fault(config, i) for i in range(400)]
    assert draws == [draw_fault(config, i) for i in range(400)]
    kinds = [d.kind for d in draws if d is not None]
    assert 60 < kinds.count(FaultKind.DROP) < 140 and 60 < kinds.count(FaultKind.REFUSE_429) < 140
    assert all(0 <= d.trigger_s <= 3.0 for d in draws if d is not None)
    assert draws != [draw_fault(FaultConfig(seed=8, drop_rate=0.25), i) for i in range(400)]


def test_fault_config_files_and_validation(tmp_path: Path) -> None:
    (tmp_path / "f.yaml").write_text("seed: 3\ndrop_rate: 0.5\nmax_sessions: 4\n")
    (tmp_path / "f.json").write_text('{"stall_rate": 1.0, "fault_limit": 2}')
    (tmp_path / "bad.yaml").write_text("drop_rat: 0.5\n")
    assert FaultConfig.from_file(tmp_path / "f.yaml") == FaultConfig(
        seed=3, drop_rate=0.5, max_sessions=4
    )
    assert FaultConfig.from_file(tmp_path / "f.json").fault_limit == 2
    with pytest.raises(FaultConfigError, match="drop_rat"):
        FaultConfig.from_file(tmp_path / "bad.yaml")
    with pytest.raises(FaultConfigError, match="at most 1"):
        FaultConfig(drop_rate=0.7, error_rate=0.7)
    with pytest.raises(FaultConfigError, match="refuse_5xx_status"):
        FaultConfig(refuse_5xx_status=404)


def test_bearer_matching() -> None:
    assert bearer_matches("Bearer k1", "k1") and bearer_matches("bearer  k1 ", "k1")
    assert not bearer_matches(None, "k1") and not bearer_matches("Basic k1", "k1")
    assert not bearer_matches("Bearer k2", "k1")


# --- sessions with the synthetic engine ---------------------------------------------

TONE_PLAN = [(None, 0.3), (440, 0.3), (None, 0.15), (880, 0.4), (None, 1.0), (660, 0.5)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("encoding", "rate"),
    [
        ("linear16", 16000),
        ("linear32", 48000),
        ("alaw", 8000),
        ("mulaw", 8000),
        ("linear16", 22050),
    ],
)
async def test_words_at_burst_times(encoding: str, rate: int) -> None:
    audio, expected = bursts(TONE_PLAN, rate)
    async with local_server(api_key=KEY) as server:
        url = url_for(server, encoding=encoding, sample_rate=rate)
        session = await run_session(url, encode(audio, encoding, rate))
        await server.wait_idle()
    assert_well_formed(session)
    assert_words_match(session.words, expected, tol_s=0.02)
    # 1 s of silence splits the stream: two tones in the first final, one in the second.
    assert [m["transcript"] for m in session.finals] == ["tone440 tone880", "tone660"]
    for m in session.messages:
        assert "type" not in m and "transcription" not in m  # unified-only fields
    record = server.stats.sessions[0]
    assert record.completed and record.outcome == "end"
    assert record.audio_s == pytest.approx(len(audio) / rate, abs=0.01)
    assert record.query["encoding"] == encoding and record.pace is not None
    assert server.stats.sessions_completed == 1 and server.stats.open_now == 0


@pytest.mark.anyio
async def test_optional_fields_follow_the_query() -> None:
    rate = 16000
    audio, _ = bursts(TONE_PLAN, rate)
    async with local_server() as server:
        url = url_for(
            server, full_transcript=True, sentence_timestamps=True, diarize=True, redact_pii=True
        )
        rich = await run_session(url, encode(audio, "linear16", rate), key=None)
        bare = await run_session(
            url_for(server, word_timestamps=False), encode(audio, "linear16", rate), key=None
        )
    assert [m["full_transcript"] for m in rich.finals] == [
        "tone440 tone880",
        "tone440 tone880 tone660",
    ]
    first = rich.finals[0]
    assert first["utterances"] == [{"text": "tone440 tone880", "start": 0.3, "end": 1.15}]
    # The local engines do not diarize: no speaker is made up, even when asked.
    assert all("speaker" not in w and "speaker_confidence" not in w for w in rich.words)
    assert first["redacted_entities"] == []  # tones hold nothing to redact
    assert all(
        "words" not in m and "full_transcript" not in m and "utterances" not in m
        for m in bare.messages
    )
    assert bare.text == "tone440 tone880 tone660"


@pytest.mark.anyio
async def test_unified_path_shape_and_finalize_keeps_the_socket_open() -> None:
    rate = 16000
    first, _ = bursts([(None, 0.2), (440, 0.3)], rate)
    second, _ = bursts([(None, 0.2), (880, 0.3)], rate)
    async with local_server() as server:
        url = url_for(server, unified=True, word_timestamps=True)
        async with connect(url, compression=None) as ws:
            await send_audio(ws, encode(first, "linear16", rate))
            await ws.send(json.dumps({"type": "finalize"}))
            flushed = Session()
            with anyio.fail_after(5 * UNIT_S):
                while not flushed.finals:
                    flushed.messages.append(json.loads(await ws.recv()))
            await send_audio(ws, encode(second, "linear16", rate))
            await ws.send(json.dumps({"type": "close_stream"}))
            rest = await collect(ws, Session(), 5 * UNIT_S)
    assert flushed.finals[0]["transcript"] == "tone440" and not flushed.finals[0]["is_last"]
    assert_well_formed(rest)
    # The time base continues across finalize: the second tone starts at 0.5 + 0.2 s.
    assert rest.words[0]["word"] == "tone880" and rest.words[0]["start"] == pytest.approx(
        0.7, abs=0.02
    )
    for m in flushed.messages + rest.messages:
        assert m["type"] == "transcription" and m["transcription"] == m["transcript"]


@pytest.mark.anyio
async def test_end_without_audio_sends_an_empty_last_final() -> None:
    async with local_server() as server:
        session = await run_session(server.url, b"", key=None)
    assert_well_formed(session)
    assert session.messages == [session.finals[0]] and session.finals[0]["transcript"] == ""


@pytest.mark.anyio
async def test_bad_client_frame_gets_an_error_and_close_1003() -> None:
    async with local_server() as server, connect(server.url, compression=None) as ws:
        await ws.send("hello")
        session = await collect(ws, Session(), 5 * UNIT_S)
    error = parse_message(json.dumps(session.messages[0]))
    assert isinstance(error, ServerError) and "JSON" in error.message
    assert session.close_code == 1003


# --- handshake refusals --------------------------------------------------------------


@pytest.mark.anyio
async def test_api_key_is_required_when_configured() -> None:
    async with local_server(api_key=KEY) as server:
        missing = await refused(server.url, key=None)
        wrong = await refused(server.url, key="not-the-key")
        ok = await run_session(server.url, b"", key=KEY)
    assert missing.response.status_code == 401 and wrong.response.status_code == 401
    assert b"API key" in wrong.response.body and KEY.encode() not in wrong.response.body
    assert ok.close_code == 1000
    assert server.stats.refused[401] == 2


@pytest.mark.anyio
async def test_the_key_never_reaches_the_server_logs(caplog: pytest.LogCaptureFixture) -> None:
    # Levels set here, not inherited: a CLI run in this process (text or JSON mode) may have
    # left `batch` at INFO and `batch.server` at WARNING, and the header lines are DEBUG.
    for name in ("", "batch", "batch.server"):
        caplog.set_level(logging.DEBUG, logger=name)
    async with local_server(api_key=KEY) as server:
        await run_session(server.url, b"")
        await refused(server.url, key="wrong-key-456")
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("batch.")]
    assert any(line.startswith("< Authorization: [redacted]") for line in logged)
    assert not any(KEY in line or "wrong-key-456" in line for line in logged)


@pytest.mark.anyio
async def test_any_key_is_accepted_without_configuration() -> None:
    async with local_server() as server:
        for key in (None, "whatever"):
            assert (await run_session(server.url, b"", key=key)).close_code == 1000


@pytest.mark.anyio
async def test_unknown_path_is_404() -> None:
    async with local_server() as server:
        error = await refused(server.base_url + "/v1/listen")
    assert error.response.status_code == 404


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"sample_rate": "12345"}, "sample_rate"),
        ({"encoding": "flac"}, "encoding"),
        ({"encoding": "opus", "sample_rate": "44100"}, "sample_rate"),
        ({"language": "xx"}, "language"),
        ({"word_timestamps": "maybe"}, "word_timestamps"),
        ({"keywords": "product"}, "keywords"),
        ({"keywords": '["product:-1"]'}, "keywords"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    params: dict[str, str], name: str
) -> None:
    async with local_server() as server:
        error = await refused(url_for(server, **params))
    assert error.response.status_code == 400
    assert f"'{name}'" in error.response.body.decode()


@pytest.mark.anyio
async def test_unified_path_needs_a_model() -> None:
    async with local_server() as server:
        error = await refused(server.unified_url)
        ok = await run_session(url_for(server, unified=True), b"", unified=True)
    assert error.response.status_code == 400 and "'model'" in error.response.body.decode()
    assert ok.close_code == 1000


@pytest.mark.anyio
async def test_concurrency_limit_refuses_with_429() -> None:
    async with local_server(faults=FaultConfig(max_sessions=2, retry_after_s=0.5)) as server:
        async with connect(server.url) as first, connect(server.url) as second:
            error = await refused(server.url)
            await first.send(end_frame(False))
            await collect(first, Session(), 5 * UNIT_S)
            await server.wait_idle(open_at_most=1)
            async with connect(server.url) as third:
                await third.send(end_frame(False))
                await collect(third, Session(), 5 * UNIT_S)
            await second.send(end_frame(False))
            await collect(second, Session(), 5 * UNIT_S)
        await server.wait_idle()
    assert error.response.status_code == 429 and error.response.headers["Retry-After"] == "0.5"
    assert server.stats.max_open == 2 and server.stats.refused[429] == 1
    assert server.stats.sessions_completed == 3 and not server.stats.faults


# --- injected faults -----------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("config", "status"),
    [
        (FaultConfig(refuse_429_rate=1.0, retry_after_s=2), 429),
        (FaultConfig(refuse_5xx_rate=1.0), 503),
    ],
)
async def test_injected_refusals_then_success(config: FaultConfig, status: int) -> None:
    config = dataclasses.replace(config, fault_limit=1)
    async with local_server(faults=config) as server:
        error = await refused(server.url)
        ok = await run_session(server.url, b"")
    assert error.response.status_code == status
    assert error.response.headers.get("Retry-After") == ("2" if status == 429 else None)
    assert ok.close_code == 1000 and server.stats.refused[status] == 1


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["drop", "error", "malformed", "stall"])
async def test_mid_stream_faults_are_observable_then_success(kind: str) -> None:
    rate = 16000
    audio, expected = bursts(TONE_PLAN, rate)
    payload = encode(audio, "linear16", rate)
    config = FaultConfig(seed=1, fault_limit=1, fault_at_max_s=1.0, **{f"{kind}_rate": 1.0})
    async with local_server(faults=config) as server:
        # A stalled session never answers: any wait shows it; the others end by themselves.
        wait_s = (0.5 if kind == "stall" else 10.0) * UNIT_S
        faulted = await run_session(server.url, payload, timeout_s=wait_s)
        clean = await run_session(server.url, payload)
        await server.wait_idle()
    assert_well_formed(clean)
    assert_words_match(clean.words, expected, tol_s=0.02)
    assert server.stats.faults == {FaultKind(kind): 1}
    assert server.stats.sessions[0].fault == FaultKind(kind)
    assert not faulted.timed_out or kind == "stall"
    if kind == "stall":  # no is_last within the timeout, the socket left open
        assert faulted.timed_out and faulted.close_code is None
        assert not any(m.get("is_last") for m in faulted.messages)
        assert not server.stats.sessions[0].completed
    elif kind == "drop":
        assert faulted.close_code == 1006
        assert not any(m.get("is_last") for m in faulted.messages)
    elif kind == "error":
        error = parse_message(json.dumps(faulted.messages[-1]))
        assert isinstance(error, ServerError) and faulted.close_code == 1011
    else:  # malformed: one junk frame, then the session completes normally
        assert len(faulted.junk) == 1
        with pytest.raises(MalformedMessage):
            parse_message(faulted.junk[0])
        assert_well_formed(faulted)


# --- real speech through whisper -----------------------------------------------------


# Each clip once, on the path named: both session shapes, with whisper's cost paid once.
CLIP_PATHS = {"callback.flac": "legacy", "support.mp3": "unified", "cancel.wav": "legacy"}


@pytest.mark.whisper
@pytest.mark.anyio
async def test_whisper_transcribes_the_demo_clips_on_both_paths() -> None:
    rate = 16000
    results: dict[str, Session] = {}
    async with local_server(engine="whisper") as server:

        async def one(name: str) -> None:
            unified = CLIP_PATHS[name] == "unified"
            audio = np.concatenate([load_clip(name, rate), silence(0.5, rate)])
            url = url_for(server, unified=unified, word_timestamps=True)
            results[name] = await run_session(
                url, encode(audio, "linear16", rate), unified=unified, timeout_s=60 * UNIT_S
            )

        async with anyio.create_task_group() as tg:
            for name in SPEECH:
                tg.start_soon(one, name)
    assert sorted(CLIP_PATHS.values()) == ["legacy", "legacy", "unified"]
    for name, reference in SPEECH.items():
        session = results[name]
        assert_well_formed(session)
        assert word_error_rate(reference, session.text) <= 0.10, session.text
        starts = [w["start"] for w in session.words]
        duration_s = len(load_clip(name, rate)) / rate + 0.5
        assert starts == sorted(starts)
        assert all(0 <= w["start"] <= w["end"] <= duration_s for w in session.words)
        for m in session.messages:  # the unified path's own fields, and only there
            assert ("type" in m) is (CLIP_PATHS[name] == "unified"), m


@pytest.mark.whisper
@pytest.mark.anyio
async def test_whisper_understands_mulaw_at_8khz() -> None:
    rate = 8000
    audio = load_clip("callback.flac", rate)
    async with local_server(engine="whisper") as server:
        url = url_for(server, encoding="mulaw", sample_rate=rate)
        session = await run_session(url, encode(audio, "mulaw", rate), timeout_s=30 * UNIT_S)
    assert_well_formed(session)
    assert word_error_rate(SPEECH["callback.flac"], session.text) <= 0.10, session.text


# --- the CLI -------------------------------------------------------------------------

CLI_SCRIPT = """
import typer
from batch.server.cli import serve
app = typer.Typer()
app.callback()(lambda: None)
app.command("serve")(serve)
app()
"""


def test_cli_serves_until_sigterm() -> None:
    env = {**os.environ, "PULSE_TEST_KEY": KEY}
    command = [sys.executable, "-c", CLI_SCRIPT, "serve", "--port", "0", "--engine", "synthetic"]
    command += ["--api-key-env", "PULSE_TEST_KEY", "--max-sessions", "3"]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = ""
            while "url:" not in line:
                line = process.stdout.readline()
                assert line, "server exited early"
            url = line.split("url:")[1].strip()
            assert anyio.run(run_session, url, b"").close_code == 1000
            assert anyio.run(refused, url, None).response.status_code == 401
            process.send_signal(signal.SIGTERM)
            output, _ = process.communicate(timeout=10 * UNIT_S)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0
    assert "stopped: 1 sessions opened, 1 completed" in output
    assert KEY not in output


def test_cli_refuses_a_port_out_of_range() -> None:
    done = run_cli("serve", "--port", "99999")
    assert done.returncode == 2, done.stderr  # a usage error, not a traceback
    assert "--port" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "pulse.example"])
def test_cli_refuses_an_open_server_on_a_reachable_host(host: str) -> None:
    """No key on a host other machines reach: exit 2 before binding, saying why and how."""
    done = CliRunner().invoke(cli_app, ["serve", "--host", host, "--engine", "synthetic"])
    assert done.exit_code == 2, done.output
    assert f"--host {host} is reachable from other machines" in done.stderr
    assert "--api-key-env" in done.stderr and "--allow-open" in done.stderr


@pytest.mark.parametrize("flags", [["--allow-open"], ["--api-key-env", "PULSE_TEST_KEY"]])
def test_cli_lets_a_keyed_or_knowingly_open_server_through(
    flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the guard, the server tries to bind: 192.0.2.1 (TEST-NET-1) is no address of
    this machine, so the bind fails (exit 1) and nothing listens beyond loopback."""
    monkeypatch.setenv("PULSE_TEST_KEY", KEY)
    args = ["serve", "--host", "192.0.2.1", "--port", "0", "--engine", "synthetic", *flags]
    done = CliRunner().invoke(cli_app, args)
    assert done.exit_code == 1, done.output
    assert "cannot listen on 192.0.2.1:0" in done.stderr
    assert "reachable from other machines" not in done.stderr


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.1", "box.local"]))
