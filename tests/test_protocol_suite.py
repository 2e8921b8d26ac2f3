"""The client (`batch.session`) against every endpoint generation and every odd-but-valid
message shape, and every odd field value the service could send.

Real WebSocket sessions on loopback: the project's own server (strict per path), and for
shapes the local server never makes (speaker as an integer, unknown event types) a small
scripted server that plays given messages after the client's end signal.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import duckdb
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from batch.errors import ExitCode, HandshakeRejected, ManifestError, ProtocolViolation
from batch.job import exit_code, run_job
from batch.manifest import load_manifest
from batch.pulse import protocol
from batch.pulse.protocol import Generation, PulseOptions
from batch.server import FaultConfig, draw_fault, local_server
from batch.server.odd import ODD_VALUES
from batch.session import Endpoint, SessionResult, Timeouts, run_session
from tests.conftest import TIME_UNIT_S, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.tables import parquet

pytestmark = pytest.mark.anyio
RATE = 16000
BURSTS = [Burst(0.3, 0.2, 440), Burst(0.9, 0.2, 660), Burst(1.5, 0.2, 880)]
TIMEOUTS = Timeouts(5 * TIME_UNIT_S, 5 * TIME_UNIT_S, 30 * TIME_UNIT_S)


class Chunks:
    """An `AudioSource` over linear16 bytes in 4096-byte chunks."""

    def __init__(self, samples: np.ndarray) -> None:
        self._data = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
        self.position_s = 0.0

    def __iter__(self) -> Any:
        for start in range(0, len(self._data), 4096):
            chunk = self._data[start : start + 4096]
            self.position_s = (start + len(chunk)) / 2 / RATE
            yield chunk


def tones() -> Chunks:
    return Chunks(tone_track(BURSTS, 2.0, RATE))


async def stream(endpoint: Endpoint, options: PulseOptions | None = None) -> SessionResult:
    return await run_session(
        endpoint, options or PulseOptions(), tones(), api_key=None, pace=0, timeouts=TIMEOUTS
    )


# --- the three generations, against the strict local server ------------------------


@pytest.mark.parametrize("generation", list(Generation), ids=lambda g: g.value)
async def test_each_path_ends_its_sessions_correctly(generation: Generation) -> None:
    async with local_server() as server:
        endpoint = Endpoint.resolve(server.url_for(generation))
        assert endpoint.generation is generation
        result = await stream(endpoint)
        await server.wait_idle()
        record = server.stats.sessions[0]
    assert [f.transcript for f in result.finals] == ["tone440 tone660 tone880"] or (
        " ".join(f.transcript for f in result.finals) == "tone440 tone660 tone880"
    )
    assert record.completed and record.path == generation.path
    assert ("model" in record.query) is generation.needs_model


@pytest.mark.parametrize("generation", list(Generation), ids=lambda g: g.value)
async def test_the_wrong_end_signal_is_refused_by_each_path(generation: Generation) -> None:
    wrong = "close_stream" if generation is Generation.LEGACY else "end"
    query = "?model=pulse" if generation.needs_model else ""
    async with (
        local_server() as server,
        connect(server.url_for(generation) + query, compression=None) as ws,
    ):
        await ws.send(json.dumps({"type": wrong}))
        messages = []
        with anyio.fail_after(5 * TIME_UNIT_S):
            try:
                while True:
                    messages.append(json.loads(await ws.recv()))
            except ConnectionClosed:
                pass
    assert ws.close_code == 1003
    assert messages[-1]["type"] == "error" and generation.end_type in messages[-1]["message"]


def test_an_unknown_path_is_refused_at_validation_naming_the_known_ones(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, pulse={"endpoint": "wss://api.example.com/v2/listen"})
    with pytest.raises(ManifestError) as caught:
        load_manifest(manifest)
    for path in protocol.KNOWN_PATHS:
        assert path in str(caught.value)
    assert "pulse.protocol" in str(caught.value)


async def test_protocol_can_be_forced_for_a_proxy_path(tmp_path: Path) -> None:
    endpoint = Endpoint.resolve("wss://proxy.example.com/pulse-in", "current")
    assert endpoint.generation is Generation.CURRENT
    assert "model" not in endpoint.session_url(PulseOptions())
    forced = Endpoint.resolve("wss://proxy.example.com/x", "unified")
    assert "model=pulse" in forced.session_url(PulseOptions())


async def test_vad_events_interleave_and_are_ignored() -> None:
    options = PulseOptions(extra={"vad_events": "true"})
    async with local_server() as server:
        result = await stream(Endpoint.resolve(server.current_url), options)
        await server.wait_idle()
        assert server.stats.sessions[0].query["vad_events"] == "true"
    assert " ".join(f.transcript for f in result.finals) == "tone440 tone660 tone880"


async def test_vad_events_really_are_sent() -> None:
    async with (
        local_server() as server,
        connect(server.current_url + "?vad_events=true", compression=None) as ws,
    ):
        for chunk in tones():
            await ws.send(chunk)
        await ws.send(json.dumps({"type": "close_stream"}))
        kinds = []
        with anyio.fail_after(10 * TIME_UNIT_S):
            try:
                while True:
                    message = json.loads(await ws.recv())
                    final = message.get("is_final") is True
                    kinds.append("final" if final else message.get("type"))
            except ConnectionClosed:
                pass
    assert "speech_started" in kinds and "final" in kinds
    assert kinds.index("speech_started") < kinds.index("final")


async def test_extra_params_reach_the_query_and_a_400_names_them(tmp_path: Path) -> None:
    async with local_server() as server:
        options = PulseOptions(extra={"punctuate": "true", "eou_timeout_ms": "800"})
        await stream(Endpoint.resolve(server.unified_url), options)
        await server.wait_idle()
        query = server.stats.sessions[0].query
        assert (query["punctuate"], query["eou_timeout_ms"], query["model"]) == (
            "true",
            "800",
            "pulse",
        )
        with pytest.raises(HandshakeRejected) as caught:
            bad = PulseOptions(extra={"punctuate": "maybe"})
            await stream(Endpoint.resolve(server.unified_url), bad)
        assert caught.value.status == 400 and "punctuate" in str(caught.value)

        # In a job: a 400 naming the parameter stops the job with a clear message.
        media = tmp_path / "media"
        media.mkdir()
        write_audio(media / "a.wav", [tone_track(BURSTS, 2.0, RATE)], RATE)
        pulse = {"endpoint": server.unified_url, "extra_params": {"punctuate": "maybe"}}
        result = await run_job(load_manifest(write_manifest(tmp_path, pulse=pulse)))
    assert exit_code(result.report) == ExitCode.FATAL_SERVICE
    assert "punctuate" in json.dumps(result.report)


def test_extra_params_cannot_override_named_options_or_carry_the_key(tmp_path: Path) -> None:
    for params, hint in (
        ({"language": "de"}, "pulse.language"),
        ({"api_key": "x"}, "Authorization"),
        ({"punctuate": True}, "string"),
        ({"Bad-Name": "x"}, "query parameter name"),
    ):
        manifest = write_manifest(tmp_path, pulse={"extra_params": params})
        with pytest.raises(ManifestError) as caught:
            load_manifest(manifest)
        assert "extra_params" in str(caught.value) and hint in str(caught.value)


def test_new_languages_are_accepted(tmp_path: Path) -> None:
    for language in ("ja", "zh", "ko", "yue", "multi-asian"):
        manifest = write_manifest(tmp_path, pulse={"language": language})
        assert load_manifest(manifest).manifest.pulse.language == language


# --- odd-but-valid shapes, from a scripted server ----------------------------------


@asynccontextmanager
async def scripted(script: Sequence[dict[str, Any] | str]) -> AsyncIterator[str]:
    """A loopback server that reads audio until an end signal, then sends ``script``
    (dicts as JSON) and closes 1000. Yields its current-path URL."""

    async def handler(ws: ServerConnection) -> None:
        async for frame in ws:
            if isinstance(frame, str) and json.loads(frame).get("type") in ("end", "close_stream"):
                break
        for message in script:
            await ws.send(message if isinstance(message, str) else json.dumps(message))
        await ws.close(1000)

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}{protocol.CURRENT_PATH}"


def word(text: str, start: float, end: float, **more: Any) -> dict[str, Any]:
    return {"word": text, "start": start, "end": end, "confidence": 0.9, **more}


SHAPES: list[dict[str, Any] | str] = [
    {"type": "speech_started", "session_id": "s", "timestamp": 0.2},
    {"type": "transcription", "transcription": "hel", "is_final": False, "session_id": "s"},
    {"type": "metadata", "request_id": "r1", "model": "pulse"},
    {"type": "something_new", "payload": {"x": 1}},
    {"type": "transcription", "session_id": "s", "transcript": "hello there",
     "transcription": "hello there", "is_final": True, "is_last": False, "language": "en",
     "languages": ["en"], "new_field": [1, 2],
     "words": [word("hello", 0.2, 0.5, speaker=0, speaker_confidence=0.8),
               word("there", 0.5, 0.9, speaker="1")],
     "utterances": [{"text": "hello there", "start": 0.2, "end": 0.9, "speaker": 1}]},
    {"type": "speech_ended", "session_id": "s", "timestamp": 1.0},
    {"session_id": "s", "transcription": "hola", "is_final": True, "language": "es",
     "languages": ["es", "en"], "words": [word("hola", 1.2, 1.5, speaker=2)]},
    {"type": "transcription", "session_id": "s", "transcript": "", "is_final": True,
     "is_last": True, "full_transcript": "hello there hola"},
]  # fmt: skip


async def test_odd_but_valid_shapes_are_all_understood() -> None:
    async with scripted(SHAPES) as url:
        diarized = await stream(Endpoint.resolve(url), PulseOptions(diarize=True))
    assert [f.transcript for f in diarized.finals] == ["hello there", "hola"]
    speakers = [w.speaker for f in diarized.finals for w in f.words]
    assert speakers == ["0", "1", "2"]  # integer and string speakers, both as text
    assert diarized.finals[0].utterances[0].speaker == "1"
    assert diarized.languages == ["en", "es"]
    assert diarized.full_transcript == "hello there hola"

    async with scripted(SHAPES) as url:
        plain = await stream(Endpoint.resolve(url), PulseOptions(diarize=False))
    assert {w.speaker for f in plain.finals for w in f.words} == {None}
    assert plain.finals[0].utterances[0].speaker is None


def test_redacted_entities_objects_are_kept_as_their_json_text() -> None:
    message = _good_final()
    message["redacted_entities"] = [
        "[CREDITCARD_1]",
        {"type": "PHONE", "start": 1.5, "end": 2.0},
        7,
    ]
    parsed = protocol.parse_message(json.dumps(message))
    assert isinstance(parsed, protocol.Transcription)
    kept = parsed.redacted_entities
    assert kept[0] == "[CREDITCARD_1]"
    assert json.loads(kept[1]) == {"type": "PHONE", "start": 1.5, "end": 2.0}
    assert len(kept) == 2  # the number is not an entity
    assert parsed.dropped == ("redacted_entities",)


async def test_a_string_is_final_is_not_taken_as_final() -> None:
    script = [
        {"transcript": "partial text", "is_final": "false"},
        {"transcript": "", "is_final": True, "is_last": True},
    ]
    async with scripted(script) as url:
        with pytest.raises(ProtocolViolation, match="is_final"):
            await stream(Endpoint.resolve(url))


# --- odd field values: the pure check, then the server's fault, then a whole job ---


def _good_final() -> dict[str, Any]:
    return {
        "session_id": "s1",
        "transcript": "tone440",
        "is_final": True,
        "is_last": False,
        "language": "en",
        "languages": ["en"],
        "words": [word("tone440", 0.3, 0.5, speaker=0)],
    }


def assert_clean(message: protocol.Transcription) -> None:
    """Nothing odd: strings are strings (valid UTF-8), times finite and ordered,
    probabilities in 0..1."""
    for text in (message.transcript, message.full_transcript or "", *message.languages):
        assert isinstance(text, str)
        text.encode("utf-8")
    assert message.language is None or isinstance(message.language, str)
    for w in message.words:
        assert isinstance(w.word, str)
        assert math.isfinite(w.start_s) and 0 <= w.start_s <= w.end_s
        assert w.confidence is None or 0 <= w.confidence <= 1
        assert w.speaker is None or isinstance(w.speaker, str)


@pytest.mark.parametrize("name", list(ODD_VALUES))
def test_every_odd_value_is_refused_or_cleaned(name: str) -> None:
    odd = ODD_VALUES[name]
    message = _good_final()
    odd.apply(message)
    raw = json.dumps(message)
    if odd.fails:
        with pytest.raises(protocol.InvalidField):
            protocol.parse_message(raw)
    else:
        parsed = protocol.parse_message(raw)
        assert isinstance(parsed, protocol.Transcription)
        assert_clean(parsed)
        assert parsed.dropped or "\ufffd" in parsed.transcript


@pytest.mark.parametrize("name", list(ODD_VALUES))
async def test_the_servers_odd_values_fault_reaches_the_client(name: str) -> None:
    faults = FaultConfig(seed=1, odd_values_rate=1.0, odd_value_kinds=(name,))
    async with local_server(faults=faults) as server:
        endpoint = Endpoint.resolve(server.url)
        if ODD_VALUES[name].fails:
            with pytest.raises(ProtocolViolation):
                await stream(endpoint)
        else:
            result = await stream(endpoint)
            assert result.finals
            for final in result.finals:
                assert_clean(final)


async def test_odd_values_fail_only_their_item_and_nothing_odd_is_stored(tmp_path: Path) -> None:
    items = 8
    faults = FaultConfig(seed=5, odd_values_rate=0.6)
    draws = [draw_fault(faults, index) for index in range(items)]
    failing = sum(1 for d in draws if d is not None and ODD_VALUES[d.odd_value or ""].fails)
    coerced = sum(1 for d in draws if d is not None and not ODD_VALUES[d.odd_value or ""].fails)
    assert failing >= 1 and coerced >= 1 and failing < items  # the seed exercises both paths
    media = tmp_path / "media"
    media.mkdir()
    for i in range(items):
        write_audio(media / f"item-{i}.wav", [tone_track(BURSTS, 2.0, RATE)], RATE)
    async with local_server(faults=faults) as server:
        manifest = write_manifest(
            tmp_path,
            pulse={"endpoint": server.url},
            run={"concurrency": 3, "pace": 0, "max_attempts": 1},
            output={"path": "out", "commit_every_items": 1000},  # one batch for all items
        )
        result = await run_job(load_manifest(manifest))
    out = tmp_path / "out"
    t = parquet(out, "transcripts")
    w = parquet(out, "words")
    by_status = dict(duckdb.sql(f"select status, count(*) from {t} group by 1").fetchall())
    assert by_status == {"ok": items - failing, "failed": failing}
    kinds = duckdb.sql(f"select distinct error_kind from {t} where status='failed'").fetchall()
    assert kinds == [("protocol",)]
    assert result.report["items"]["ok"] == items - failing  # type: ignore[index]
    odd_words = duckdb.sql(
        f"select count(*) from {w} where word is null or not isfinite(start_s) "
        "or not isfinite(end_s) or start_s < 0 or end_s < start_s "
        "or (confidence is not null and (confidence < 0 or confidence > 1))"
    ).fetchall()
    assert odd_words == [(0,)]
    texts = duckdb.sql(f"select distinct transcript from {t} where status='ok'").fetchall()
    assert {row[0].replace(" \ufffd", "") for row in texts} == {"tone440 tone660 tone880"}
    assert duckdb.sql(f"select count(*) from {w}").fetchall() == [((items - failing) * 3,)]


async def test_the_odd_value_warning_names_the_item_channel_and_piece(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    call = media / "call.wav"
    write_audio(call, [tone_track(BURSTS, 2.0, RATE)] * 2, RATE)
    meeting = media / "meeting.wav"
    beeps = [Burst(0.5 + i, 0.2, 440) for i in range(23)]
    write_audio(meeting, [tone_track(beeps, 24.0, RATE)], RATE)
    faults = FaultConfig(seed=2, odd_values_rate=1.0, odd_value_kinds=("confidence_above_1",))
    caplog.set_level(logging.WARNING, logger="batch.session")
    async with local_server(faults=faults) as server:
        manifest = write_manifest(
            tmp_path,
            pulse={"endpoint": server.url},
            run={"concurrency": 3, "pace": 0, "channels": "split", "split_long_files": True,
                 "split_threshold_s": 20, "piece_target_s": 10, "split_window_s": 3},
        )  # fmt: skip
        result = await run_job(load_manifest(manifest))
    assert result.report["items"]["ok"] == 3  # type: ignore[index]
    said = [r.getMessage() for r in caplog.records if "odd" in r.getMessage()]
    for channel in (0, 1):
        assert any(m.startswith(f"{call}, channel {channel}: ") for m in said), said
    assert any(m.startswith(f"{meeting}, channel 0, piece ") for m in said), said
    assert all("confidence" in m for m in said)
