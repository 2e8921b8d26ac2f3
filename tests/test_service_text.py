"""Whatever text the service sends: real jobs against a scripted server on loopback, their
Parquet tables read back and exported through the CLI. Exports stay valid files, words past
the end of a recording are flagged, and a key echoed however JSON escapes it is stored
nowhere."""

from __future__ import annotations

import html
import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pyarrow.parquet as pq
import pytest
import srt
import webvtt
from websockets.asyncio.server import ServerConnection, serve

from batch.collect import TIME_MARGIN_S, Collected, time_quality
from batch.credentials import REDACTED, Scrubber
from batch.errors import ExitCode
from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.pulse import protocol
from tests.conftest import run_cli, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.tables import parquet

RATE = 16000
DURATION_S = 3.0
# "/" and "=" are what PHP (\/) and Gson (\u003d) escape.
KEY = "sk-live/7f3c9a2b4d6e8f10a1b2=="

Script = Callable[[int], list[str]]  # connection number -> frames to send after the end


@asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[str]:
    """A loopback server that reads audio until the end signal, then sends ``script(n)``
    (frames as given: raw JSON text) for its n-th connection and closes 1000."""
    connections = itertools.count()

    async def handler(ws: ServerConnection) -> None:
        number = next(connections)
        async for frame in ws:
            if isinstance(frame, str) and json.loads(frame).get("type") in ("end", "close_stream"):
                break
        for message in script(number):
            await ws.send(message)
        await ws.close(1000)

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}{protocol.CURRENT_PATH}"


def _media(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        track = tone_track([Burst(0.3, 0.2, 440), Burst(1.2, 0.2, 660)], DURATION_S, RATE)
        write_audio(folder / f"item-{i}.wav", [track], RATE)


def _run(tmp_path: Path, script: Script, items: int, **pulse: Any) -> dict[str, Any]:
    """Run a job of ``items`` recordings against a server playing ``script``; its counts."""
    _media(tmp_path / "media", items)

    async def job() -> dict[str, Any]:
        async with scripted(script) as url:
            manifest = write_manifest(
                tmp_path,
                pulse={"endpoint": url, **pulse},
                # One script per connection: each recording has a session of its own.
                run={"concurrency": 2, "pace": 0, "max_attempts": 1, "reuse_sessions": False},
            )
            result = await run_job(load_manifest(manifest), RunOptions())
        return dict(result.report["items"])  # type: ignore[arg-type]

    return anyio.run(job)


def _final(words: list[dict[str, Any]], text: str, **more: Any) -> dict[str, Any]:
    return {"session_id": "s", "transcript": text, "is_final": True, "words": words, **more}


def _last() -> str:
    return json.dumps({"session_id": "s", "transcript": "", "is_final": True, "is_last": True})


def _export(out: Path, fmt: str, to: Path) -> Any:
    return run_cli("export", str(out), "--job", "test-job", "--format", fmt, "--to", str(to))


# --- odd text and odd times --------------------------------------------------------------

ODD_WORDS = [  # out of time order on purpose
    ("a-->b", 0.9, 1.0),
    ("two\n\nlines", 0.3, 0.4),
    ("<b>bold</b>", 0.5, 0.6),
    ("fish&chips", 0.7, 0.8),
    ("nul\x00here\x07", 1.1, 1.2),
    ("\x85\u2028", 1.3, 1.4),  # nothing printable: no cue
]


def _odd_script(number: int) -> list[str]:
    words = [{"word": w, "start": s, "end": e, "confidence": 0.9} for w, s, e in ODD_WORDS]
    return [json.dumps(_final(words, " ".join(w for w, _, _ in ODD_WORDS))), _last()]


def test_odd_service_text_exports_as_valid_escaped_cues_in_time_order(
    tmp_path: Path,
) -> None:
    counts = _run(tmp_path, _odd_script, items=3)
    assert counts["ok"] == 3, counts
    out = tmp_path / "out"
    for fmt in ("vtt", "srt", "json", "txt"):
        done = _export(out, fmt, tmp_path / fmt)
        assert done.returncode == 0, done.output
        files = sorted((tmp_path / fmt).glob(f"*.{fmt}"))
        assert len(files) == 3
        assert all(b"\x00" not in f.read_bytes() and b"\x07" not in f.read_bytes() for f in files)
    expected = ["two lines", "<b>bold</b>", "fish&chips", "a-->b", "nul here"]
    for path in (tmp_path / "vtt").glob("*.vtt"):
        captions = webvtt.read(str(path)).captions
        shown = html.unescape(" ".join(c.raw_text.replace("\n", " ") for c in captions))
        assert shown.split() == " ".join(expected).split()  # lossless once unescaped
        assert "<b>" not in path.read_text() and "-->b" not in path.read_text()
        starts = [c.start_in_seconds * 1000 + c.start_time.milliseconds for c in captions]
        assert starts == sorted(starts)
    for path in (tmp_path / "srt").glob("*.srt"):
        subtitles = list(srt.parse(path.read_text()))
        shown = " ".join(s.content.replace("\n", " ") for s in subtitles)
        assert shown == "two lines ‹b>bold‹/b> fish&chips a->b nul here"
        assert [s.start for s in subtitles] == sorted(s.start for s in subtitles)
        assert all(s.end >= s.start for s in subtitles)
        assert subtitles[0].start.total_seconds() == pytest.approx(0.3)


def _late_script(number: int) -> list[str]:
    late = [{"word": "late", "start": 4999.5, "end": 5000.0}] if number == 0 else []
    words = [{"word": "fine", "start": 0.3, "end": 0.5}, *late]
    return [json.dumps(_final(words, " ".join(w["word"] for w in words))), _last()]


def test_words_past_the_end_of_the_recording_set_quality(tmp_path: Path) -> None:
    counts = _run(tmp_path, _late_script, items=2)
    assert counts["ok"] == 2, counts
    rows = duckdb.sql(
        f"select word_count, quality from {parquet(tmp_path / 'out', 'transcripts')} "
        "order by word_count"
    ).fetchall()
    assert rows[0] == (1, None)  # a clean item stays clean
    count, flag = rows[1]
    assert count == 2 and flag is not None
    assert flag.startswith("times_past_end: 1 words end after the recording")
    assert "5000.0 s" in flag and f"{DURATION_S:.1f} s" in flag


def test_one_item_that_cannot_be_exported_is_named_and_the_rest_are(
    tmp_path: Path,
) -> None:
    _run(tmp_path, _late_script, items=3)
    out = tmp_path / "out"
    # A words row no subtitle time can hold (as a table written by another tool may have).
    victim = duckdb.sql(
        f"select item_id, source from {parquet(out, 'transcripts')} order by source limit 1"
    ).fetchall()[0]
    for path in (out / "words").rglob("*.parquet"):
        table = pq.read_table(path)
        rows = table.to_pylist()
        for row in rows:
            if row["item_id"] == victim[0]:
                row["end_s"] = 1e300
        pq.write_table(type(table).from_pylist(rows, schema=table.schema), path)
    done = _export(out, "srt", tmp_path / "srt")
    assert done.returncode == ExitCode.ITEMS_FAILED, done.output
    assert f"{victim[1]} could not be exported" in done.stderr
    assert "Traceback" not in done.output
    assert "2 srt file(s)" in done.stdout
    assert len(list((tmp_path / "srt").glob("*.srt"))) == 2


# --- an echoed key -------------------------------------------------------------------


def _escaped(text: str) -> str:
    return "".join(f"\\u{ord(ch):04x}" for ch in text)


def _php(text: str) -> str:  # PHP escapes "/", Gson "="
    return text.replace("/", "\\/").replace("=", "\\u003d")


def _echo_script(number: int) -> list[str]:
    if number == 0:  # an error body that echoes the key
        return ['{"type": "error", "message": "bad key ' + _escaped(KEY) + '"}']
    every, php = _escaped(KEY), _php(KEY)
    final = (
        '{"session_id": "s", "is_final": true, "is_last": false, "language": "en",'
        f' "transcript": "key {every} said", "full_transcript": "all {php}",'
        f' "redacted_entities": ["{php}", {{"type": "KEY", "value": "{every}"}}],'
        ' "words": ['
        f'  {{"word": "{every}", "start": 0.3, "end": 0.5}},'
        f'  {{"word": "{php}", "start": 0.6, "end": 0.8}}],'
        f' "utterances": [{{"text": "key {php}", "start": 0.3, "end": 0.8}}]'
        "}"
    )
    assert json.loads(final)["words"][0]["word"] == KEY  # the frame does carry the key
    return [final, _last()]


def test_a_key_echoed_json_escaped_is_stored_and_exported_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SMALLEST_API_KEY", KEY)
    counts = _run(tmp_path, _echo_script, items=3, full_transcript=True)
    assert counts == {**counts, "ok": 2, "failed": 1}, counts
    out = tmp_path / "out"
    for fmt in ("srt", "vtt", "json", "txt"):
        assert _export(out, fmt, tmp_path / "exports" / fmt).returncode == 0
    t = parquet(out, "transcripts")
    ok = duckdb.sql(
        f"select transcript, full_transcript, redacted_entities from {t} where status='ok'"
    ).fetchall()
    assert ok[0][0] == f"key {REDACTED} said" and ok[0][1] == f"all {REDACTED}"
    assert ok[0][2][0] == REDACTED and REDACTED in ok[0][2][1]
    errors = duckdb.sql(f"select error from {t} where status='failed'").fetchall()
    assert len(errors) == 1 and REDACTED in errors[0][0]
    words = duckdb.sql(f"select distinct word from {parquet(out, 'words')}").fetchall()
    assert words == [(REDACTED,)]
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    forms = {KEY, _escaped(KEY), _php(KEY), json.dumps(KEY)[1:-1], KEY[:12], KEY[-12:]}
    for form in forms:
        assert form.encode() not in written, form


def test_parsing_scrubs_every_decoded_string_whatever_its_escaping() -> None:
    scrub = Scrubber(KEY).scrub
    for form in (KEY, _escaped(KEY), _php(KEY)):
        final = protocol.parse_message(_echo_script(1)[0].replace(_escaped(KEY), form), scrub)
        assert isinstance(final, protocol.Transcription)
        assert KEY not in repr(final) and REDACTED in final.words[0].word
        error = protocol.parse_message('{"error": {"message": "' + form + '"}}', scrub)
        assert error == protocol.ServerError(REDACTED)
        event = protocol.parse_message('{"type": "' + form + '"}', scrub)
        assert event == protocol.Ignored(REDACTED)
        with pytest.raises(protocol.InvalidField) as caught:  # its message quotes the value
            protocol.parse_message('{"transcript": ["' + form + '"], "is_final": true}', scrub)
        assert KEY not in str(caught.value) and REDACTED in str(caught.value)
    unscrubbed = protocol.parse_message(_echo_script(1)[0])
    assert isinstance(unscrubbed, protocol.Transcription) and unscrubbed.words[0].word == KEY


def test_time_quality_allows_rounding_and_judges_utterances_too() -> None:
    def row(end_s: float) -> dict[str, Any]:
        return {"start_s": 0.0, "end_s": end_s}

    rounded = Collected(words=[row(DURATION_S + TIME_MARGIN_S)], utterances=[row(DURATION_S)])
    assert time_quality(rounded, DURATION_S) is None
    late = Collected(words=[row(1.0)], utterances=[row(DURATION_S + TIME_MARGIN_S + 0.1)])
    assert (time_quality(late, DURATION_S) or "").startswith("times_past_end: 1 utterances")
    assert time_quality(late, 0.0) is None  # an unknown duration cannot be judged
