"""Every response field reaches the tables: languages, segments, full_transcript, redaction,
quality; filled by the local server and read back with DuckDB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from batch.collect import quality
from batch.decode import DecodedAudio, WireFormat
from batch.job import run_job
from batch.manifest import load_manifest
from batch.pulse.protocol import PulseOptions
from batch.server import local_server
from batch.session import Endpoint, Timeouts, run_session
from tests.conftest import TIME_UNIT_S, run_cli, write_manifest
from tests.media import DEMO_CLIPS, Burst, tone_track, write_audio
from tests.tables import sql

pytestmark = pytest.mark.anyio
RATE = 16000
# Three segments (gaps over the server's 0.6 s end-of-segment silence), one language each
# for the multilingual test engine: 440 Hz English, 660 Hz Spanish, 880 Hz Japanese.
BURSTS = [Burst(0.3, 0.3, 440), Burst(1.6, 0.3, 660), Burst(2.9, 0.3, 880)]


async def _run(tmp_path: Path, pulse: dict[str, Any], **sections: Any) -> Path:
    manifest = write_manifest(
        tmp_path,
        pulse={"endpoint": "local", "local_engine": "synthetic-multilingual", **pulse},
        **sections,
    )
    result = await run_job(load_manifest(manifest))
    assert result.report["items"]["failed"] == 0, result.report["failures"]
    return tmp_path / "out"


async def test_languages_segments_and_full_transcript(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_audio(media / "talk.wav", [tone_track(BURSTS, 4.0, RATE)], RATE)
    out = await _run(
        tmp_path, {"language": "multi", "full_transcript": True, "sentence_timestamps": True}
    )
    assert sql(
        out, "select languages, full_transcript, transcript, quality from {transcripts}"
    ) == [(["en", "es", "ja"], "tone440 tone660 tone880", "tone440 tone660 tone880", None)]
    segments = sql(
        out,
        "select segment, text, detected_language, start_s, end_s, redacted_entities, piece "
        "from {segments} order by segment",
    )
    assert [s[:3] for s in segments] == [
        (0, "tone440", "en"),
        (1, "tone660", "es"),
        (2, "tone880", "ja"),
    ]
    for (_, _, _, start, end, entities, piece), burst in zip(segments, BURSTS, strict=True):
        assert (
            abs(start - burst.start_s) < 0.02 and abs(end - burst.start_s - burst.length_s) < 0.02
        )
        assert entities == [] and piece is None
    joined = sql(
        out,
        "select s.segment, w.word, s.start_s = w.start_s from {segments} s "
        "join {words} w using (item_id, segment) order by s.segment",
    )
    assert joined == [(0, "tone440", True), (1, "tone660", True), (2, "tone880", True)]
    # No diarization locally: speaker is null, never a made-up "0".
    assert sql(out, "select distinct speaker from {words}") == [(None,)]
    assert sql(out, "select distinct speaker from {utterances}") == [(None,)]


async def test_full_transcript_is_null_when_off_and_language_is_the_asked_one(
    tmp_path: Path,
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_audio(media / "talk.wav", [tone_track(BURSTS, 4.0, RATE)], RATE)
    out = await _run(tmp_path, {"language": "de"})
    assert sql(out, "select languages, full_transcript from {transcripts}") == [(["de"], None)]
    assert sql(out, "select distinct detected_language from {segments}") == [("de",)]


async def test_split_pieces_join_full_transcripts_in_order(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    tones = [Burst(0.5 + 2.0 * i, 0.3, (440, 660, 880)[i % 3]) for i in range(12)]
    write_audio(media / "long.wav", [tone_track(tones, 24.0, RATE)], RATE)
    out = await _run(
        tmp_path,
        {"language": "multi", "full_transcript": True},
        run={"pace": 0, "split_long_files": True, "split_threshold_s": 10,
             "piece_target_s": 8, "split_window_s": 2},
    )  # fmt: skip
    ((full, transcript, pieces, languages),) = sql(
        out, "select full_transcript, transcript, pieces, languages from {transcripts}"
    )
    assert pieces >= 2 and full == transcript and len(transcript.split()) == 12
    assert languages == ["en", "es", "ja"]
    segments = sql(out, "select segment, piece from {segments} order by segment")
    assert [s[0] for s in segments] == list(range(len(segments)))
    assert sorted({s[1] for s in segments}) == list(range(pieces))
    orphans = sql(
        out, "select count(*) from {words} w anti join {segments} s using (item_id, segment)"
    )
    assert orphans == [(0,)]


def test_quality_flags_impossible_word_rates_and_loops() -> None:
    assert quality(["please", "call", "me", "back", "tomorrow"], 2.5) is None
    looping = ["My", "card", "number", "is"] + ["41,"] * 114
    flag = quality(looping, 7.0)
    assert flag is not None and flag.startswith("implausible_word_rate: 118 words in 7.0 s")
    assert quality(["no"] * 12, 60.0) == "repeated_word: 'no' 12 times in a row"
    assert quality(["yes"] * 3, 0.5) is None  # too short to judge a rate


# --- real speech: the payment clip through whisper ----------------------------------


def _payment_audio() -> Any:
    class Source:
        def __init__(self) -> None:
            self._decoded = DecodedAudio(DEMO_CLIPS / "payment.ogg", WireFormat("linear16", RATE))
            self.position_s = 0.0

        def __iter__(self) -> Any:
            for chunk in self._decoded:
                self.position_s += len(chunk) / 2 / RATE
                yield chunk
            # A second of silence lets the last words close, as the service advises.
            yield np.zeros(RATE, dtype="<i2").tobytes()

    return Source()


@pytest.mark.whisper
async def test_whisper_redacts_pci_and_writes_numerals_both_ways() -> None:
    timeouts = Timeouts(10 * TIME_UNIT_S, 60 * TIME_UNIT_S, 120 * TIME_UNIT_S)
    results = {}
    async with local_server(engine="whisper") as server:
        for numerals in ("true", "false"):
            options = PulseOptions(redact_pci=True, numerals=numerals, full_transcript=True)
            results[numerals] = await run_session(
                Endpoint.resolve(server.url), options, _payment_audio(), api_key=None,
                pace=0, timeouts=timeouts,
            )  # fmt: skip
    for numerals, result in results.items():
        text = " ".join(f.transcript for f in result.finals)
        entities = [e for f in result.finals for e in f.redacted_entities]
        assert "[CREDITCARDNUMBER_1]" in text and "[CREDITCARDNUMBER_1]" in entities, text
        assert "[CVV_1]" in text and "[CVV_1]" in entities, text
        every = text + " " + (result.full_transcript or "") + " "
        every += " ".join(w.word for f in result.finals for w in f.words)
        for secret in ("4929", "2319", "725", "seven two five"):
            assert secret not in every, (numerals, every)
        if numerals == "true":
            assert "25,000" in text, text
        else:
            assert "twenty-five thousand" in text and "25" not in text, text


async def test_the_local_engines_limits_are_warned_at_validate_and_run(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    write_audio(media / "talk.wav", [tone_track(BURSTS, 4.0, RATE)], RATE)
    pulse = {"local_engine": "synthetic", "diarize": True, "redact_pii": True,
             "keywords": ["acme:2"], "extra_params": {"punctuate": "true"}}  # fmt: skip
    manifest = write_manifest(tmp_path, pulse=pulse)
    validated = await anyio.to_thread.run_sync(lambda: run_cli("validate", str(manifest)))
    assert validated.returncode == 0, validated.stderr
    assert "warning: the local engine does not diarize: speaker is null" in validated.stdout
    result = await run_job(load_manifest(manifest))
    warnings = result.report["warnings"]
    assert len(warnings) == 4 and any("names" in w for w in warnings)
    assert any("keywords are ignored" in w for w in warnings)
    assert any("punctuate" in w for w in warnings)
    assert result.report_path is not None
    markdown = Path(result.report_path).with_suffix(".md").read_text()
    assert "## Warnings" in markdown and "does not diarize" in markdown
