"""`pulse-batch export`: cue building (pure), then real jobs exported and read back with the
same libraries that players and editors use (srt, webvtt-py)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import anyio
import pytest
import srt
import webvtt

from batch import cues as cuelib
from batch.errors import ExportError
from batch.export import FORMATS, export_job, file_names, parse_where, select
from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.model import ItemRows
from batch.output import JobOutput
from tests.conftest import run_cli, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.tables import sql

RATE = 16000


def _word(text: str, start: float, end: float, speaker: str | None = None) -> cuelib.TimedText:
    return cuelib.TimedText(text, start, end, speaker)


def _steady(count: int, *, step: float = 0.5, length: float = 0.4) -> list[cuelib.TimedText]:
    return [_word(f"word{i:02d}", i * step, i * step + length) for i in range(count)]


# --- the pure cue builder --------------------------------------------------------------


def test_cues_keep_subtitle_limits_and_the_words_times() -> None:
    words = _steady(40)
    limits = cuelib.CueLimits()
    cues = cuelib.cues_from_words(words, limits)
    assert len(cues) > 1
    for cue in cues:
        assert 1 <= len(cue.lines) <= limits.max_lines
        assert all(len(line) <= limits.max_chars for line in cue.lines)
        assert cue.end_s - cue.start_s <= limits.max_duration_s
    # Every word exactly once, in order; each cue spans its first word's start to its last's end.
    shown = [w for cue in cues for line in cue.lines for w in line.split()]
    assert shown == [w.text for w in words]
    position = 0
    for cue in cues:
        count = sum(len(line.split()) for line in cue.lines)
        group = words[position : position + count]
        assert cue.start_s == pytest.approx(group[0].start_s)
        assert cue.end_s == pytest.approx(group[-1].end_s)
        position += count


def test_two_lines_are_balanced() -> None:
    words = [_word("aaaa", i * 0.3, i * 0.3 + 0.2) for i in range(12)]  # 59 characters in all
    (cue,) = cuelib.cues_from_words(words)
    assert [len(line) for line in cue.lines] == [29, 29]


def test_cues_break_at_pauses_sentence_ends_and_speaker_changes() -> None:
    words = [
        _word("Hello", 0.0, 0.4, "A"),
        _word("there.", 0.5, 0.9, "A"),
        _word("How", 1.0, 1.2, "A"),
        _word("are", 1.3, 1.5, "A"),
        _word("you", 3.0, 3.3, "A"),  # after a 1.5 s pause
        _word("Fine", 3.4, 3.7, "B"),  # another speaker
    ]
    cues = cuelib.cues_from_words(words)
    assert [c.lines for c in cues] == [("Hello there.",), ("How are",), ("you",), ("Fine",)]
    assert [c.speaker for c in cues] == ["A", "A", "A", "B"]


def test_a_long_word_and_a_long_utterance_still_fit() -> None:
    long_word = "x" * 60
    (cue,) = cuelib.cues_from_words([_word(long_word, 0, 1)])
    assert cue.lines == (long_word,)
    text = " ".join(f"word{i}" for i in range(30))  # about 180 characters
    utterance = cuelib.TimedText(text, 10.0, 22.0, None)
    cues = cuelib.cues_from_utterances([utterance])
    assert len(cues) >= 3
    assert cues[0].start_s == 10.0 and cues[-1].end_s == 22.0
    assert " ".join(line for c in cues for line in c.lines) == text
    assert all(len(line) <= 42 for c in cues for line in c.lines)
    assert all(b.start_s >= a.end_s for a, b in itertools.pairwise(cues))


def test_srt_and_vtt_read_back_with_their_libraries() -> None:
    cues = cuelib.cues_from_words(
        [_word("Hi", 0.0004, 0.5, "spk>1"), _word("there", 3.0, 3.2566, "spk>1")]
    )
    parsed = list(srt.parse(cuelib.to_srt(cues)))
    assert [s.start.total_seconds() for s in parsed] == [0.0, 3.0]
    assert [s.end.total_seconds() for s in parsed] == [0.5, 3.257]
    assert parsed[0].content == "spk>1: Hi"
    captions = webvtt.from_string(cuelib.to_vtt(cues)).captions
    assert [c.start_in_seconds for c in captions] == [0, 3]
    assert captions[1].end == "00:00:03.257"
    # The label whole, its ">" escaped inside the voice span (no markup can end it early).
    assert captions[0].voice == "spk&gt;1" and captions[0].text == "Hi"


def test_file_names_add_channel_and_only_collisions_get_an_id() -> None:
    items: list[dict[str, Any]] = [
        {"item_id": "aaaaaaaa1111", "source": "/a/call.wav", "channel": None},
        {"item_id": "bbbbbbbb2222", "source": "/b/call.wav", "channel": None},
        {"item_id": "cccccccc3333", "source": "/a/Meeting.flac", "channel": None},
        {
            "item_id": "dddddddd4444",
            "source": "/s/stereo.wav",
            "channel": 0,
            "channel_name": "agent",
        },
        {"item_id": "eeeeeeee5555", "source": "/s/stereo.wav", "channel": 1},
        {"item_id": "ffffffff6666", "source": "s3://bucket/x/y.mp3?v=1", "channel": None},
    ]
    assert file_names(items) == {
        "aaaaaaaa1111": "call-aaaaaaaa",
        "bbbbbbbb2222": "call-bbbbbbbb",
        "cccccccc3333": "Meeting",
        "dddddddd4444": "stereo.agent",
        "eeeeeeee5555": "stereo.ch1",
        "ffffffff6666": "y",
    }


def test_names_too_long_for_a_file_system_are_cut_and_get_an_id() -> None:
    long_ascii, long_accents = "x" * 251, "é" * 130  # 251 and 260 bytes
    items: list[dict[str, Any]] = [
        {"item_id": "aaaaaaaa1111", "source": f"/m/{long_ascii}.wav", "channel": None},
        {"item_id": "bbbbbbbb2222", "source": f"/m/{long_accents}.wav", "channel": None},
    ]
    names = file_names(items)
    assert names["aaaaaaaa1111"] == "x" * 200 + "-aaaaaaaa"
    assert names["bbbbbbbb2222"] == "é" * 100 + "-bbbbbbbb"  # cut between characters
    for name in names.values():
        assert len(f".{name}.json.tmp".encode()) <= 255


def test_a_source_with_the_longest_file_name_exports(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    track = tone_track(_bursts(2, 440, 0.2), 1.5, RATE)
    write_audio(tmp_path / "media" / f"{'n' * 251}.wav", [track], RATE)  # 255 bytes
    manifest = write_manifest(tmp_path)
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 1, result.report
    for fmt in FORMATS:
        done = run_cli("export", str(tmp_path / "out"), "--job", "test-job", "--format", fmt)
        assert done.returncode == 0, done.stderr
        written = list((tmp_path / "out" / "_exports" / "test-job" / fmt).iterdir())
        assert [p.name.startswith("n" * 200 + "-") for p in written] == [True]


def test_where_grammar() -> None:
    rows: list[dict[str, Any]] = [
        {"item_id": "1", "language": "en", "channel": 0, "metadata": {"team": "sales"}},
        {"item_id": "2", "language": "es", "channel": 1, "metadata": {"team": "sales"}},
        {"item_id": "3", "language": "en", "channel": 1, "metadata": None},
    ]
    columns = ["item_id", "language", "channel", "metadata"]
    pick = select(rows, parse_where("language=en, channel!=0", columns))
    assert [r["item_id"] for r in pick] == ["3"]
    pick = select(rows, parse_where("metadata.team=sales,language='es'", columns))
    assert [r["item_id"] for r in pick] == ["2"]
    with pytest.raises(ExportError, match="unknown column 'lang'"):
        parse_where("lang=en", columns)
    with pytest.raises(ExportError, match="not column=value"):
        parse_where("language>en", columns)


# --- real jobs, exported through the CLI ------------------------------------------------


def _bursts(count: int, hz: float, first_s: float, step_s: float = 0.5) -> list[Burst]:
    return [Burst(first_s + i * step_s, 0.3, hz) for i in range(count)]


@pytest.fixture(scope="session")
def job_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished synthetic job: two files with one stem in different folders, a stereo
    call split into named channels, and a file with a long pause."""
    root = tmp_path_factory.mktemp("export")
    for folder in ("a", "b", "calls"):
        (root / "media" / folder).mkdir(parents=True)
    mono = tone_track([*_bursts(14, 440, 0.2), *_bursts(3, 660, 9.5)], 12.0, RATE)
    write_audio(root / "media" / "a" / "note.wav", [mono], RATE)
    write_audio(root / "media" / "b" / "note.wav", [mono], RATE)
    left = tone_track(_bursts(4, 880, 0.3), 4.0, RATE)
    right = tone_track(_bursts(3, 550, 1.0, 0.7), 4.0, RATE)
    write_audio(root / "media" / "calls" / "call.wav", [left, right], RATE)
    manifest = write_manifest(
        root,
        inputs=[{"glob": "media/*/*.wav"}],
        pulse={"sentence_timestamps": True},
        # A mono file under split is channel 0 (unnamed: the names are for stereo calls).
        run={"channels": "split", "channel_names": ["agent", "customer"]},
    )
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 4, result.report
    return root / "out"


def _words(out: Path) -> dict[str, list[tuple[str, float, float]]]:
    rows = sql(
        out,
        """SELECT t.source, t.channel_name, w.word, w.start_s, w.end_s
        FROM {words} w
        JOIN {transcripts} t
        USING (job, item_id) ORDER BY t.source, t.channel, w.idx""",
    )
    by_file: dict[str, list[tuple[str, float, float]]] = {}
    for source, channel_name, word, start, end in rows:
        key = f"{Path(source).parent.name}/{Path(source).stem}.{channel_name or 'ch0'}"
        by_file.setdefault(key, []).append((word, start, end))
    return by_file


def _export(out: Path, *options: str) -> str:
    """`pulse-batch export` of the test job; it must succeed. Returns what it printed."""
    done = run_cli("export", str(out), "--job", "test-job", *options)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _expected_names(out: Path) -> dict[str, str]:
    ids = sql(
        out,
        """SELECT source, channel_name, item_id FROM
        {transcripts}""",
    )
    names = {}
    for source, channel_name, item_id in ids:
        key = f"{Path(source).parent.name}/{Path(source).stem}.{channel_name or 'ch0'}"
        names[key] = f"{Path(source).stem}.{channel_name or 'ch0'}"
        if key.endswith("note.ch0"):  # one name twice: both get the item id's start
            names[key] += f"-{item_id[:8]}"
    return names


def test_srt_export_cues_are_the_words_times(job_output: Path, tmp_path: Path) -> None:
    assert "4 srt file(s)" in _export(job_output, "--format", "srt", "--to", str(tmp_path))
    names = _expected_names(job_output)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.srt" for n in names.values())
    for key, words in _words(job_output).items():
        subtitles = list(srt.parse((tmp_path / f"{names[key]}.srt").read_text()))
        shown = [w for s in subtitles for w in s.content.split()]
        assert shown == [w for w, _, _ in words]
        starts = {round(s, 3) for _, s, _ in words}
        ends = {round(e, 3) for _, _, e in words}
        for subtitle in subtitles:
            assert round(subtitle.start.total_seconds(), 3) in starts
            assert round(subtitle.end.total_seconds(), 3) in ends
            assert all(len(line) <= 42 for line in subtitle.content.splitlines())
            assert len(subtitle.content.splitlines()) <= 2
            assert (subtitle.end - subtitle.start).total_seconds() <= 7.0
        # the first cue starts with the first word and the last ends with the last word
        assert subtitles[0].start.total_seconds() == pytest.approx(words[0][1], abs=5e-4)
        assert subtitles[-1].end.total_seconds() == pytest.approx(words[-1][2], abs=5e-4)
    note = _words(job_output)["a/note.ch0"]
    assert len(note) == 17  # 14 + 3 tones: more than one cue's worth, and a long pause
    first = next(p for p in tmp_path.iterdir() if p.name.startswith("note"))
    assert len(list(srt.parse(first.read_text()))) >= 3


def test_vtt_json_and_txt_exports_read_back(job_output: Path, tmp_path: Path) -> None:
    names = _expected_names(job_output)
    words = _words(job_output)
    for fmt in ("vtt", "json", "txt"):
        _export(job_output, "--format", fmt, "--to", str(tmp_path / fmt))
    for key, expected in words.items():
        captions = webvtt.read(str(tmp_path / "vtt" / f"{names[key]}.vtt")).captions
        assert [w for c in captions for w in c.text.split()] == [w for w, _, _ in expected]
        assert captions[0].start_in_seconds + captions[0].start_time.milliseconds / 1000 == (
            pytest.approx(expected[0][1], abs=5e-4)
        )
        body = json.loads((tmp_path / "json" / f"{names[key]}.json").read_text())
        assert body["item"]["status"] == "ok"
        assert [(w["word"], w["start_s"], w["end_s"]) for w in body["words"]] == expected
        assert body["utterances"] and "segments" in body
        text = (tmp_path / "txt" / f"{names[key]}.txt").read_text()
        assert text.strip() == body["item"]["transcript"]


def test_where_and_item_pick_the_files(job_output: Path, tmp_path: Path) -> None:
    where = tmp_path / "w"
    _export(job_output, "--format", "txt", "--to", str(where), "--where", "channel_name=customer")
    assert [p.name for p in where.iterdir()] == ["call.customer.txt"]
    item_id = sql(
        job_output,
        "SELECT item_id FROM {transcripts}"
        " WHERE channel_name = 'agent' AND source LIKE '%call.wav'",
    )[0]
    _export(job_output, "--format", "vtt", "--to", str(tmp_path / "i"), "--item", item_id[0][:10])
    assert [p.name for p in (tmp_path / "i").iterdir()] == ["call.agent.vtt"]
    # Default folder: under the output's _exports (readers ignore `_` folders).
    _export(job_output, "--utterances", "--format", "srt")
    default = job_output / "_exports" / "test-job" / "srt"
    assert len(list(default.glob("*.srt"))) == 4
    shutil.rmtree(job_output / "_exports")


def test_export_usage_errors_say_what_to_do(job_output: Path) -> None:
    wrong_job = run_cli("export", str(job_output), "--job", "nope")
    assert wrong_job.returncode == 2
    assert "no rows for job 'nope'; jobs here: test-job" in wrong_job.stderr
    bad_where = run_cli("export", str(job_output), "--job", "test-job", "--where", "colour=red")
    assert bad_where.returncode == 2 and "unknown column 'colour'" in bad_where.stderr
    bad_format = run_cli("export", str(job_output), "--job", "test-job", "--format", "docx")
    assert (
        bad_format.returncode == 2
        and "'docx' is not one of srt, vtt, json, txt" in bad_format.stderr
    )


def test_a_delta_output_exports_and_scores_alike(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    track = tone_track(_bursts(6, 440, 0.2), 4.0, RATE)
    write_audio(tmp_path / "media" / "talk.wav", [track], RATE)
    (tmp_path / "list.csv").write_text("path,reference\nmedia/talk.wav,tone440 tone440\n")
    manifest = write_manifest(
        tmp_path, inputs=[{"list": "list.csv"}], output={"path": "lake", "format": "delta"}
    )
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 1, result.report
    assert (tmp_path / "lake" / "words" / "_delta_log").is_dir()
    _export(tmp_path / "lake", "--to", str(tmp_path / "s"))
    subtitles = list(srt.parse((tmp_path / "s" / "talk.srt").read_text()))
    assert [w for s in subtitles for w in s.content.split()] == ["tone440"] * 6
    accuracy = result.report["accuracy"]
    assert accuracy["items"] == 1 and accuracy["wer"] == pytest.approx(2.0)  # 4 insertions / 2


@pytest.mark.parametrize("fmt", ["parquet", "delta"])
def test_where_on_a_metadata_column_of_a_real_output(fmt: str, tmp_path: Path) -> None:
    # Arrow hands map columns back as lists of pairs, not the dicts the pure tests use.
    (tmp_path / "media").mkdir()
    for name, hz in (("north", 440), ("south", 660)):
        write_audio(
            tmp_path / "media" / f"{name}.wav", [tone_track(_bursts(2, hz, 0.2), 2.0, RATE)], RATE
        )
    (tmp_path / "list.csv").write_text(
        "path,team\nmedia/north.wav,sales\nmedia/south.wav,support\n"
    )
    manifest = write_manifest(
        tmp_path, inputs=[{"list": "list.csv"}], output={"path": "out", "format": fmt}
    )
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 2, result.report
    for where, expected in (
        ("metadata.team=sales", "north.txt"),
        ("metadata.team!=sales", "south.txt"),
    ):
        folder = tmp_path / where.replace("!", "not")
        done = run_cli(
            "export", str(tmp_path / "out"), "--job", "test-job", "--format", "txt",
            "--to", str(folder), "--where", where,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert [p.name for p in folder.iterdir()] == [expected]
    done = run_cli(
        "export", str(tmp_path / "out"), "--job", "test-job", "--format", "json",
        "--to", str(tmp_path / "j"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    document = json.loads((tmp_path / "j" / "north.json").read_text())
    assert document["item"]["metadata"] == {"team": "sales"}


def test_without_word_times_the_warning_points_at_utterances(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    write_audio(
        tmp_path / "media" / "talk.wav", [tone_track(_bursts(3, 440, 0.2), 2.0, RATE)], RATE
    )
    manifest = write_manifest(
        tmp_path, pulse={"word_timestamps": False, "sentence_timestamps": True}
    )
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 1, result.report
    out = str(tmp_path / "out")
    words = run_cli("export", out, "--job", "test-job", "--to", str(tmp_path / "w"))
    assert words.returncode == 0, words.stderr
    assert "has no words" in words.stderr and "try --utterances" in words.stderr
    sentences = run_cli(
        "export", out, "--job", "test-job", "--utterances", "--to", str(tmp_path / "u")
    )
    assert sentences.returncode == 0, sentences.stderr
    assert "warning" not in sentences.stderr
    cues = list(srt.parse((tmp_path / "u" / "talk.srt").read_text()))
    assert " ".join(c.content.replace("\n", " ") for c in cues).split() == ["tone440"] * 3


def test_service_text_never_breaks_a_cue_or_becomes_markup() -> None:
    rows = [
        {"word": "a-->b", "start_s": 0.0, "end_s": 0.2, "speaker": "x>y&\n"},
        {"word": "blank\n\nline\r\n", "start_s": 0.3, "end_s": 0.4, "speaker": "x>y&\n"},
        {"word": "<i>&amp;\x00\x1b", "start_s": 0.5, "end_s": 0.6, "speaker": "x>y&\n"},
        {"word": "\x00\u2028", "start_s": 0.7, "end_s": 0.8},  # nothing printable: dropped
        {"word": "no time", "start_s": None, "end_s": 0.8},  # cannot be cued: dropped
    ]
    words = cuelib.timed(rows)
    assert [w.text for w in words] == ["a-->b", "blank line", "<i>&amp;"]
    cues = cuelib.cues_from_words(words)
    vtt = cuelib.to_vtt(cues)
    caption = webvtt.from_string(vtt).captions[0]
    assert caption.voice == "x&gt;y&amp;"
    assert caption.text == "a--&gt;b blank line &lt;i&gt;&amp;amp;"
    assert "\x00" not in vtt and "\x1b" not in vtt
    (subtitle,) = srt.parse(cuelib.to_srt(cues))
    assert subtitle.content == "x>y&: a->b blank line ‹i>&amp;"


def test_cues_run_forward_in_time_whatever_order_the_words_came_in() -> None:
    rows = [
        {"word": "third", "start_s": 2.0, "end_s": 2.3},
        {"word": "first.", "start_s": 0.0, "end_s": 0.4},
        {"word": "second", "start_s": 1.0, "end_s": 1.5},
        {"word": "long", "start_s": 1.1, "end_s": 1.9},  # overlaps, ends after "second"
    ]
    cues = cuelib.cues_from_words(cuelib.timed(rows))
    assert [c.lines for c in cues] == [("first.",), ("second long third",)]
    assert [(c.start_s, c.end_s) for c in cues] == [(0.0, 0.4), (1.0, 2.3)]
    utterances = [
        cuelib.TimedText("later turn", 3.0, 4.0),
        cuelib.TimedText("earlier turn", 1.0, 3.5),
    ]
    by_turn = cuelib.cues_from_utterances(
        cuelib.timed(
            [{"text": u.text, "start_s": u.start_s, "end_s": u.end_s} for u in utterances], "text"
        )
    )
    assert [c.start_s for c in by_turn] == [1.0, 3.0]


def test_json_keeps_empty_lists_as_lists_and_maps_as_objects(tmp_path: Path) -> None:
    """An empty list column (languages, redacted_entities) is ``[]`` in JSON, not ``{}``;
    a map column (metadata) is an object, empty or not. Written as a real Parquet output."""
    common = {"job": "j", "date": "2026-11-24", "language": "en", "run_id": "r1", "channel": None}

    def item(item_id: str, metadata: dict[str, str]) -> ItemRows:
        transcript = {
            **common, "item_id": item_id, "source": f"/{item_id}.wav", "status": "ok",
            "transcript": "hello", "languages": [], "redacted_entities": [],
            "metadata": metadata, "word_count": 1,
        }  # fmt: skip
        segment = {**common, "item_id": item_id, "segment": 0, "text": "hello"}
        segment["redacted_entities"] = []
        word = {**common, "item_id": item_id, "segment": 0, "idx": 0, "word": "hello"}
        return ItemRows(transcript, [word], segments=[segment])

    async def write() -> None:
        with JobOutput.open(tmp_path / "out", "j", ["job", "date"], "parquet") as output:
            async with output.run("r1", commit_every_items=10) as writer:
                await writer.add(item("bare", {}))
                await writer.add(item("tagged", {"team": "sales"}))

    anyio.run(write)
    export_job(tmp_path / "out", "j", "json", tmp_path / "json")
    bare = json.loads((tmp_path / "json" / "bare.json").read_text())
    assert bare["item"]["languages"] == [] and bare["item"]["redacted_entities"] == []
    assert bare["item"]["metadata"] == {}
    assert bare["segments"][0]["redacted_entities"] == []
    tagged = json.loads((tmp_path / "json" / "tagged.json").read_text())
    assert tagged["item"]["metadata"] == {"team": "sales"}
