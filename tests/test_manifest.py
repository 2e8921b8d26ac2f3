"""Manifest validation: every problem names the file, the key path and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.errors import ManifestError
from batch.manifest import load_manifest
from tests.conftest import run_cli

GOOD = """
version: 1
job: support-calls
inputs:
  - glob: "recordings/**/*.wav"
  - path: "extra/call-17.mp3"
  - list: "batch.csv"
pulse:
  endpoint: local
  keywords: ["invoice:5.0"]
  numerals: true
run:
  concurrency: 8
output:
  path: out
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_good_manifest_resolves_defaults_and_paths(tmp_path: Path) -> None:
    loaded = load_manifest(_write(tmp_path, GOOD))
    m = loaded.manifest
    assert (m.job, m.run.concurrency, m.run.pace, m.run.max_attempts) == (
        "support-calls",
        8,
        1.0,
        5,
    )
    assert m.pulse.numerals == "true"  # YAML's boolean read back as the protocol's word
    assert (m.pulse.sample_rate, m.pulse.encoding, m.pulse.word_timestamps) == (
        16000,
        "linear16",
        True,
    )
    assert loaded.output_dir == (tmp_path / "out").resolve()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("concurrency: 8", "concurency: 8"), "run.concurency: unknown key"),
        (("concurrency: 8", "concurrency: many"), "run.concurrency"),
        (
            ("endpoint: local", "endpoint: local\n  sample_rate: 44000"),
            "pulse.sample_rate: 44000 is not",
        ),
        (("endpoint: local", "endpoint: local\n  language: xx"), "pulse.language: 'xx' is not"),
        (("endpoint: local", "endpoint: local\n  diarize: maybe"), "pulse.diarize"),
        (("endpoint: local", "endpoint: http://x"), "pulse.endpoint: must be 'local' or a ws://"),
        (('["invoice:5.0"]', '["invoice"]'), "pulse.keywords"),
        (("job: support-calls", "job: support calls"), "job: use 1-128 letters"),
        (('- path: "extra/call-17.mp3"', '- file: "x.mp3"'), "inputs.1: each input needs one of"),
        (("version: 1", "version: 2"), "version"),
        (
            ("concurrency: 8", 'concurrency: "8"'),
            'run.concurrency: "8" is quoted text; write 8 without',
        ),
        (("concurrency: 8", "concurrency: true"), "run.concurrency: must be a valid integer"),
        (("concurrency: 8", "pace: .inf"), "run.pace: must be a finite number"),
        (("concurrency: 8", "chunk_bytes: 4095"), "splits linear16 samples"),
        (("concurrency: 8", "chunk_bytes: 4096\n  chunk_ms: 100"), "not both"),
        (("concurrency: 8", "channel_names: [a, b]"), "channel_names needs channels: split"),
        (("path: out", "path: out\n  partition_by: [status]"), "output.partition_by.0"),
        (('path: "extra/call-17.mp3"', 'path: ""'), "inputs.1.path: is empty"),
        (("path: out", "path: s3://bucket/out"), "format parquet needs a local folder"),
        (
            ("endpoint: local", "endpoint: local\n  encoding: opus\n  sample_rate: 44100"),
            "pulse: sample_rate 44100 cannot carry opus",
        ),
    ],
)
def test_bad_manifest_names_file_and_key(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    path = _write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    assert str(path) in str(caught.value)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("concurrency: 8", "concurency: 8"),
            "run.concurency: unknown key; did you mean `concurrency`?",
        ),
        (("run:", "runn:"), "runn: unknown key; did you mean `run`?"),
        (
            ("  numerals: true", "  languag: en"),
            "pulse.languag: unknown key; did you mean `language`?",
        ),
        (
            ('- glob: "recordings/**/*.wav"', '- glob: "recordings/**/*.wav"\n    recursiv: true'),
            "inputs.0.recursiv: unknown key; the keys here are allow_empty, channels, glob, "
            "language, storage_options\n",
        ),
        (('- path: "extra/call-17.mp3"', '- pth: "x.mp3"'), "did you mean `path` (not `pth`)?"),
        (("job: support-calls\n", ""), "job: required; add `job:` under the top level"),
        (("path: out", "path: out\n  currency: dollars"), "output.currency: use a three-letter"),
        (("run:\n  concurrency: 8", "run: 8"), "run: must be a mapping of keys"),
        (('- list: "batch.csv"', "- list: {path: x}"), "inputs.2.list: must be a valid string"),
    ],
)
def test_manifest_errors_speak_plainly(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    """A typo gets the closest key; pydantic's own words and the manifest's text stay out."""
    path = _write(tmp_path, GOOD.replace(*change))
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    message = f"{caught.value}\n"
    assert expected in message
    for leak in ("Field required", "should match pattern", "instance of", "support-calls", "{'"):
        assert leak not in message


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "nope.yaml")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load_manifest(_write(tmp_path, "version: [1"))


def test_cli_validate_exit_codes(tmp_path: Path) -> None:
    done = run_cli(
        "validate", str(_write(tmp_path, GOOD.replace("concurrency: 8", "concurency: 8")))
    )
    assert done.returncode == 2
    assert "run.concurency: unknown key" in done.stderr
    (tmp_path / "batch.csv").write_text("path,customer\nextra/call-18.wav,acme\n")
    # A glob matching nothing is an error naming the entry (a typo must not go green) ...
    empty = run_cli("validate", str(_write(tmp_path, GOOD)))
    assert empty.returncode == 2
    assert "inputs.0: glob 'recordings/**/*.wav' matched no files" in empty.stderr
    # ... unless the entry says an empty match is expected.
    allowed = GOOD.replace('"recordings/**/*.wav"', '"recordings/**/*.wav"\n    allow_empty: true')
    ok = run_cli("validate", str(_write(tmp_path, allowed)))
    assert ok.returncode == 0, ok.stderr
    assert "2 item(s)" in ok.stdout and "2 known bad" in ok.stdout


def test_channel_names_with_split_on_an_input_entry(tmp_path: Path) -> None:
    # channels: split on one entry is enough for run.channel_names to mean something.
    text = GOOD.replace('"extra/call-17.mp3"', '"extra/call-17.mp3"\n    channels: split')
    text = text.replace("concurrency: 8", "concurrency: 8\n  channel_names: [agent, customer]")
    loaded = load_manifest(_write(tmp_path, text))
    assert loaded.manifest.run.channel_names == ["agent", "customer"]


def test_cli_validate_shows_an_object_store_output_as_its_url(tmp_path: Path) -> None:
    (tmp_path / "batch.csv").write_text("path\nextra/call-18.wav\n")
    text = GOOD.replace('"recordings/**/*.wav"', '"recordings/**/*.wav"\n    allow_empty: true')
    text = text.replace("path: out", "path: s3://bucket/pulse\n  format: delta")
    done = run_cli("validate", str(_write(tmp_path, text)))
    assert done.returncode == 0, done.stderr
    assert "output: s3://bucket/pulse" in done.stdout  # not a local folder named s3:
    assert not (tmp_path / "s3:").exists()
