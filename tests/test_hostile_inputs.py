"""Inputs written to hurt: YAML alias bombs, huge values in messages, credentials in the
endpoint, list cells of any size, misspelt list columns, headers that lie about the audio,
lists that point outside their store or folder. Real files, the CLI in-process."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batch.cli import app
from batch.errors import ManifestError
from batch.manifest import load_manifest

ENDPOINT = "wss://waves-api.smallest.ai/api/v1/pulse/get_text"


def _manifest(folder: Path, text: str) -> Path:
    path = folder / "job.yaml"
    path.write_text(text)
    return path


def _validate(manifest: Path) -> tuple[int, str]:
    done = CliRunner().invoke(app, ["validate", str(manifest)])
    return done.exit_code, done.output


ALIAS_BOMB = """version: 1
job: bomb
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
inputs: *h
"""


def test_an_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path: Path) -> None:
    started = time.monotonic()
    code, output = _validate(_manifest(tmp_path, ALIAS_BOMB))
    assert code == 2
    assert "expands to more than 100,000 values (YAML aliases" in output
    assert len(output) < 1000
    assert time.monotonic() - started < 5


def test_an_alias_cycle_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="expands to more than"):
        load_manifest(_manifest(tmp_path, "version: 1\njob: j\ninputs: &a [*a]\n"))
    with pytest.raises(ManifestError, match="nests too deeply"):
        load_manifest(_manifest(tmp_path, "version: 1\njob: j\ninputs: " + "[" * 5000))


def test_a_few_aliases_are_still_fine(tmp_path: Path) -> None:
    text = (
        "version: 1\njob: j\ninputs:\n  - glob: 'a/*.wav'\n    storage_options: &o {anon: true}\n"
        "  - glob: 'b/*.wav'\n    storage_options: *o\n"
    )
    loaded = load_manifest(_manifest(tmp_path, text))
    assert [e.storage_options for e in loaded.manifest.inputs] == [{"anon": True}] * 2


def test_messages_quote_huge_values_in_a_few_hundred_characters(tmp_path: Path) -> None:
    huge = "x" * 2_000_000
    text = (
        f"version: 1\njob: {huge}\ninputs: [{{glob: '{huge}'}}]\n"
        f"pulse: {{language: {huge}, keywords: [{huge}]}}\nrun: {{concurrency: [{huge}]}}\n"
    )
    with pytest.raises(ManifestError) as caught:
        load_manifest(_manifest(tmp_path, text))
    message = str(caught.value)
    assert "job: use 1-128 letters" in message and "pulse.language" in message
    assert "more characters)" in message
    assert all(len(line) < 600 for line in message.splitlines())
    assert len(message) < 4200


@pytest.mark.parametrize(
    ("endpoint", "secret"),
    [
        ("wss://user:s3cretpass@waves-api.smallest.ai/api/v1/pulse/get_text", "s3cretpass"),
        ("wss://tok3nvalue@waves-api.smallest.ai/api/v1/pulse/get_text", "tok3nvalue"),
        (f"{ENDPOINT}?api_key=s3cretkey&language=en", "s3cretkey"),
    ],
)
def test_credentials_in_the_endpoint_are_refused_and_never_repeated(
    tmp_path: Path, endpoint: str, secret: str
) -> None:
    text = f"version: 1\njob: j\ninputs: [{{glob: 'a/*.wav'}}]\npulse: {{endpoint: '{endpoint}'}}\n"
    code, output = _validate(_manifest(tmp_path, text))
    assert code == 2
    assert "pulse.endpoint:" in output and "pulse.api_key_env" in output
    assert secret not in output
    assert not (tmp_path / "out").exists()
