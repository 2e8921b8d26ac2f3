"""Accuracy against references: normalisation, WER/CER equal to jiwer's, stored in the
transcripts table, summarised in the report, and `pulse-batch score` after the fact."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import anyio
import jiwer
import pytest

from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.score import normalise, score, summarise
from tests.conftest import run_cli, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.tables import by_source

RATE = 16000

ROW = "language, transcript, reference, wer, cer, metadata"  # by file name


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("Hello, World!", "en", "hello world"),
        (
            "I paid 1,000 dollars for 3.5 kg",
            "en",
            "i paid one thousand dollars for three point five kg",
        ),
        ("the 3rd call, 50% off", "en", "the third call fifty percent off"),
        ("well-known don't", "en", "well known don t"),
        ("Tengo 42 años.", "es", "tengo cuarenta y dos años"),
        ("  many\tspaces \n here ", "en", "many spaces here"),
    ],
)
def test_normalisation_rules(text: str, language: str, expected: str) -> None:
    assert normalise(text, language) == expected


@pytest.mark.parametrize(
    ("reference", "hypothesis"),
    [
        ("the cat sat on the mat", "the cat sit on mat"),
        ("please call me back tomorrow", "please call back tomorrow morning"),
        ("one two three", "one two three"),
        ("a b c d e", "x y"),
    ],
)
def test_scores_equal_jiwer_on_known_strings(reference: str, hypothesis: str) -> None:
    result = score(reference, hypothesis)
    assert result.wer == pytest.approx(jiwer.wer(reference, hypothesis))
    assert result.cer == pytest.approx(jiwer.cer(reference, hypothesis))


def test_known_figures_after_normalisation() -> None:
    # "Call me at 5." vs "call me at five": equal once normalised.
    assert score("Call me at 5.", "call me at five") == score("a", "a")
    # One substitution in four words: 25 %.
    assert score("The cat sat down.", "the cat sat town").wer == pytest.approx(0.25)
    assert score("...", "anything").wer is None  # nothing to score against


def test_summary_pools_edits_and_lists_the_worst() -> None:
    rows = [
        {
            "item_id": "1",
            "status": "ok",
            "language": "en",
            "channel": None,
            "source": "/a.wav",
            "reference": "a b c d",
            "transcript": "a b c d",
            "wer": 0.0,
            "cer": 0.0,
        },
        {
            "item_id": "2",
            "status": "ok",
            "language": "en",
            "channel": 1,
            "source": "/b.wav",
            "reference": "a b",
            "transcript": "a x",
            "wer": 0.5,
            "cer": 1 / 3,
        },
        {
            "item_id": "3",
            "status": "ok",
            "language": "en",
            "channel": None,
            "source": "/c.wav",
            "reference": None,
            "transcript": "zzz",
            "wer": None,
            "cer": None,
        },
    ]
    summary = summarise(rows)
    assert summary is not None
    assert summary["items"] == 2 and summary["reference_words"] == 6
    assert summary["wer"] == pytest.approx(
        round(jiwer.wer(["a b c d", "a b"], ["a b c d", "a x"]), 4)
    )
    assert summary["wer"] == pytest.approx(1 / 6, abs=1e-4)  # pooled, not the mean 0.25
    assert set(summary["by_channel"]) == {"mixed", "ch1"}
    assert [w["item_id"] for w in summary["worst"]] == ["2", "1"]
    assert summarise([rows[2]]) is None


def _track(hz: list[int]) -> list[Burst]:
    return [Burst(0.2 + 0.5 * i, 0.3, f) for i, f in enumerate(hz)]


@pytest.fixture(scope="session")
def scored_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic job from a CSV list with inline references, a reference file and metadata."""
    root = tmp_path_factory.mktemp("score")
    media = root / "media"
    media.mkdir()
    tones = {"a.wav": [440, 440, 660], "b.wav": [880, 550], "c.wav": [440], "d.wav": [660]}
    for name, hz in tones.items():
        write_audio(media / name, [tone_track(_track(hz), 2.0, RATE)], RATE)
    (root / "refs").mkdir()
    (root / "refs" / "b.txt").write_text("Tone880, tone 550!\n", encoding="utf-8")
    with (root / "list.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "language", "reference", "reference_path", "team"])
        writer.writerow(["media/a.wav", "en", "Tone440 tone440 tone660.", "", "sales"])
        writer.writerow(["media/b.wav", "en", "", "refs/b.txt", "support"])
        writer.writerow(["media/c.wav", "es", "tone440 tone441", "", "sales"])
        writer.writerow(["media/d.wav", "en", "", "", "support"])  # no reference
    manifest = write_manifest(root, inputs=[{"list": "list.csv"}])
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["ok"] == 4, result.report
    return root


def test_run_stores_wer_and_cer_equal_to_jiwer(scored_job: Path) -> None:
    rows = by_source(scored_job / "out", ROW, name_only=True)
    for name in ("a.wav", "b.wav", "c.wav"):
        language, transcript, reference, wer, cer, metadata = rows[name]
        ref, hyp = (
            normalise(str(reference), str(language)),
            normalise(str(transcript), str(language)),
        )
        assert wer == pytest.approx(jiwer.wer(ref, hyp))
        assert cer == pytest.approx(jiwer.cer(ref, hyp))
        assert "reference" not in dict(metadata) and "reference_path" not in dict(metadata)  # type: ignore[arg-type]
    assert rows["a.wav"][3] == 0.0  # "Tone440 tone440 tone660." is what was said
    assert rows["b.wav"][2] == "Tone880, tone 550!\n"  # read from its file
    assert rows["b.wav"][3] == 0.0  # numbers are words on both sides: "tone 550" = "tone550"
    # Spanish numbers: "tone cuatrocientos cuarenta" against the same plus
    # "tone cuatrocientos cuarenta y uno": 5 deletions in 8 words.
    assert rows["c.wav"][3] == pytest.approx(0.625)
    assert rows["d.wav"][2:5] == (None, None, None)
    assert dict(rows["d.wav"][5]) == {"team": "support"}  # type: ignore[arg-type]


def test_report_summarises_accuracy_per_language_and_channel(scored_job: Path) -> None:
    report = json.loads((scored_job / "out" / "_reports" / "test-job" / "latest.json").read_text())
    accuracy = report["accuracy"]
    assert accuracy["items"] == 3
    assert set(accuracy["by_language"]) == {"en", "es"}
    assert accuracy["by_language"]["es"]["wer"] == pytest.approx(0.625)
    assert set(accuracy["by_channel"]) == {"mixed"}
    assert accuracy["worst"][0]["source"].endswith("c.wav")
    markdown = (scored_job / "out" / "_reports" / "test-job" / "latest.md").read_text()
    assert "## Accuracy against references" in markdown and "| es | 1 | 62.5% |" in markdown


def test_score_command_after_the_fact_gives_the_same_figures(scored_job: Path) -> None:
    references = scored_job / "later.jsonl"
    lines = [
        {"path": "media/a.wav", "reference": "Tone440 tone440 tone660."},
        {"path": str(scored_job / "media" / "b.wav"), "reference_path": "refs/b.txt"},
        {"path": "media/c.wav", "reference": "tone440 tone441"},
        {"path": "media/missing.wav", "reference": "never transcribed"},
    ]
    references.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = run_cli(
        "score",
        str(scored_job / "out"),
        "--job",
        "test-job",
        "--references",
        str(references),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    stored = by_source(scored_job / "out", ROW, name_only=True)
    by_name = {Path(i["source"]).name: i for i in body["items"]}
    assert set(by_name) == {"a.wav", "b.wav", "c.wav"}
    for name, item in by_name.items():
        assert item["wer"] == pytest.approx(stored[name][3])
        assert item["cer"] == pytest.approx(stored[name][4])
    report = json.loads((scored_job / "out" / "_reports" / "test-job" / "latest.json").read_text())
    assert body["accuracy"]["wer"] == report["accuracy"]["wer"]
    assert "1 ok item(s) have no reference" in done.stderr
    table = run_cli(
        "score", str(scored_job / "out"), "--job", "test-job", "--references", str(references)
    )
    assert table.returncode == 0 and "Items, worst first" in table.stdout
    rows = [line for line in table.stdout.splitlines() if line.startswith("| /")]
    assert [Path(line.split(" | ")[0][2:]).name for line in rows] == ["c.wav", "a.wav", "b.wav"]


def test_score_needs_a_reference_column(tmp_path: Path, scored_job: Path) -> None:
    bad = tmp_path / "refs.csv"
    bad.write_text("path,text\nmedia/a.wav,hello\n")
    done = run_cli("score", str(scored_job / "out"), "--job", "test-job", "--references", str(bad))
    assert done.returncode == 2
    assert f"{bad}: line 2: needs a 'reference' or 'reference_path'" in done.stderr


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells, split at pipes that are not escaped."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def test_a_pipe_in_a_file_name_keeps_the_tables_shape(tmp_path: Path) -> None:
    (tmp_path / "media").mkdir()
    track = tone_track([Burst(0.2, 0.3, 440)], 1.0, RATE)
    write_audio(tmp_path / "media" / "c|d.wav", [track], RATE)
    (tmp_path / "media" / "a|b.wav").write_text("not audio\n")
    (tmp_path / "list.csv").write_text(
        'path,reference\n"media/c|d.wav",tone440\n"media/a|b.wav",x\n'
    )
    manifest = write_manifest(tmp_path, inputs=[{"list": "list.csv"}])
    result = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert result.report["items"]["failed"] == 1, result.report
    markdown = (tmp_path / "out" / "_reports" / "test-job" / "latest.md").read_text()
    scored = run_cli(
        "score",
        str(tmp_path / "out"),
        "--job",
        "test-job",
        "--references",
        str(tmp_path / "list.csv"),
    )
    assert scored.returncode == 0, scored.stderr
    for text in (markdown, scored.stdout):
        rows = [_cells(line) for line in text.splitlines() if "|b.wav" in line or "|d.wav" in line]
        assert rows, text
        for cells in rows:
            assert len(cells) in (3, 4), cells  # failures: kind, source, message; accuracy: 4
            assert any(cell.endswith(("a\\|b.wav", "c\\|d.wav")) for cell in cells), cells
