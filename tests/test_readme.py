"""The README's quick start, run as written, so the front page cannot rot: its `make`
commands exist, `make install` stays free of test tools, the demo `make run` runs (its
`pulse-batch` lines, read from `make -n run`, in-process against the embedded server) and
writes what the README shows (transcripts, redaction, numerals, subtitles, scores), and the
README's DuckDB and Python snippets return rows from what the demo wrote."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.conftest import run_cli
from tests.media import SPEECH, spoken_words, word_error_rate
from tests.needs import need_module
from tests.runcli import CliResult
from tests.tables import sql

pytestmark = pytest.mark.whisper

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def _blocks(section: str, language: str) -> list[str]:
    """The fenced ``language`` code blocks under the README's ``## section`` heading."""
    text = README.read_text(encoding="utf-8")
    _, found, rest = text.partition(f"\n## {section}\n")
    assert found, f"README.md has no '## {section}' section"
    body = rest.split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w*)\n(.*?)^```$", body, flags=re.MULTILINE | re.DOTALL)
    return [code for lang, code in blocks if lang == language]


def _make_dry_run(target: str) -> list[str]:
    """The commands `make -n -B target` would run, whether or not its stamps are fresh (make
    itself is the point here)."""
    done = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), target], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"make -n {target}: {done.stderr}"
    return done.stdout.splitlines()


def test_the_quick_start_commands_are_make_targets() -> None:
    (block,) = _blocks("Quick start", "bash")
    assert re.findall(r"^make (\S+)", block, flags=re.MULTILINE) == ["install", "test", "run"]
    named = set(re.findall(r"`make ([a-z-]+)`", README.read_text(encoding="utf-8")))
    assert {"lint", "docs", "test-all", "bench", "clean"} <= named
    for target in sorted(named | {"install", "test", "run"}):
        assert _make_dry_run(target) is not None


def test_make_install_installs_no_test_tools() -> None:
    commands = "\n".join(_make_dry_run("install"))
    assert "'.[recognizer,s3,gcs,azure,http,delta]'" in commands
    for tool in ("npm", "node", "azurite", "apt-get", "espeak", "dev]", "dev,"):
        assert tool not in commands, f"make install runs {tool}: a test tool"


@dataclass(frozen=True)
class Demo:
    """Where `make run`'s lines ran, and what each one said."""

    folder: Path
    said: dict[str, CliResult]  # by command: run, export, score (the last export kept)

    @property
    def out(self) -> Path:
        return self.folder / "jobs" / "out"


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """A copy of `jobs/` where `make run`'s own `pulse-batch` lines have run (unpaced, so
    the demo's 27 s of audio take a few seconds). Made once per session: the tests only
    read it (and xdist may interleave other modules)."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(ROOT / "jobs" / "demo", folder / "jobs" / "demo")
    manifest = (ROOT / "jobs" / "demo.yaml").read_text(encoding="utf-8")
    assert "pace: 1.0" in manifest
    (folder / "jobs" / "demo.yaml").write_text(manifest.replace("pace: 1.0", "pace: 0"))
    lines = [line for line in _make_dry_run("run") if line.startswith(".venv/bin/pulse-batch ")]
    assert [shlex.split(line)[1] for line in lines] == ["run", "export", "export", "score"]
    said = {}
    before = Path.cwd()
    os.chdir(folder)
    try:
        for line in lines:
            args = shlex.split(line)[1:]
            said[args[0]] = done = run_cli(*args)
            assert done.returncode == 0, (line, done.output)
    finally:
        os.chdir(before)
    yield Demo(folder, said)


def test_the_demo_writes_what_make_run_says(demo: Demo) -> None:
    exports = demo.out / "_exports" / "demo"
    names = sorted([f"{Path(name).stem}" for name in SPEECH] + ["payment"])
    assert sorted(p.stem for p in (exports / "srt").glob("*.srt")) == names
    assert sorted(p.stem for p in (exports / "vtt").glob("*.vtt")) == names
    assert "Accuracy" in (demo.out / "_reports" / "demo" / "latest.md").read_text(encoding="utf-8")
    assert "Job: WER" in demo.said["score"].stdout


def test_the_demo_transcribes_redacts_and_scores_its_clips(demo: Demo) -> None:
    """The recognizer, redaction and numerals at work, as the README shows them."""
    rows = sql(
        demo.out,
        "select source, status, transcript, reference, wer, redacted_entities from {transcripts}",
    )
    assert len(rows) == len(SPEECH) + 1
    for source, status, transcript, reference, wer, entities in rows:
        assert status == "ok"
        name = Path(str(source)).name
        if name == "payment.ogg":
            assert entities == ["[CREDITCARDNUMBER_1]", "[CVV_1]"], transcript
            assert "4929" not in transcript and "25,000 dollars" in transcript
            # Its reference is the redacted text: nothing else may be stored.
            assert wer is not None and float(str(wer)) <= 0.1, (transcript, reference)
            continue
        assert entities == []
        assert word_error_rate(SPEECH[name], str(transcript)) <= 0.1
        # The hand-written references say what the clips were made to say.
        assert spoken_words(str(reference)) == spoken_words(SPEECH[name])
        assert wer is not None and float(str(wer)) <= 0.1
    report = json.loads((demo.out / "_reports" / "demo" / "latest.json").read_text())
    assert report["accuracy"]["items"] == 4 and report["accuracy"]["wer"] <= 0.1


def test_the_readme_queries_return_rows(demo: Demo, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(demo.folder)
    (sql,) = _blocks("Reading the tables", "sql")
    statements = [s for s in sql.split(";") if s.strip()]
    assert len(statements) == 2
    transcripts, words = (duckdb.sql(s).fetchall() for s in statements)
    assert len(transcripts) == 4 and {row[1] for row in transcripts} == {"ok"}
    assert len(words) > 30 and all(isinstance(row[2], str) for row in words)

    polars_snippet, pandas_snippet = _blocks("Reading the tables", "python")
    frames = _run_snippet(polars_snippet)
    assert {name: len(frame) > 0 for name, frame in frames.items()} == {
        "t": True,
        "w": True,
        "words_per_call": True,
    }
    assert frames["words_per_call"].height == 4
    need_module("pandas", "the dev extra has it: run `make test`")
    frames = _run_snippet(pandas_snippet)
    assert list(frames) == ["transcripts"] and len(frames["transcripts"]) == 4


def _run_snippet(snippet: str) -> dict[str, Any]:
    """Run one of the README's Python snippets; the data frames it made, by name."""
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    return {
        name: value
        for name, value in namespace.items()
        if type(value).__name__ == "DataFrame" and not name.startswith("_")
    }


def test_the_first_manifest_validates_and_plans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (manifest,) = _blocks("Your first manifest", "yaml")
    (commands,) = _blocks("Your first manifest", "bash")
    (tmp_path / "recordings").mkdir()
    shutil.copy(ROOT / "jobs" / "demo" / "clips" / "cancel.wav", tmp_path / "recordings")
    (tmp_path / "calls.yaml").write_text(manifest)
    monkeypatch.chdir(tmp_path)
    validate, dry_run = (shlex.split(line, comments=True) for line in commands.splitlines()[:2])
    assert validate == ["pulse-batch", "validate", "calls.yaml"]
    done = run_cli(*validate[1:])
    assert done.returncode == 0, done.output
    assert "recordings/**/*.wav" in done.output and "cancel.wav" in done.output
    assert dry_run == ["pulse-batch", "run", "calls.yaml", "--dry-run"]
    done = run_cli(*dry_run[1:])
    assert done.returncode == 0, done.output
    assert "cancel.wav" in done.output
