"""Inputs written to hurt: YAML alias bombs, huge values in messages, credentials in the
endpoint, list cells of any size, misspelt list columns, headers that lie about the audio,
lists that point outside their store or folder. Real files, the CLI in-process."""

from __future__ import annotations

import io
import json
import struct
import time
import wave
from pathlib import Path

import anyio
import av
import numpy as np
import pytest

from batch import job as jobs
from batch import plausible
from batch.decode import probe
from batch.errors import InputError, ManifestError
from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from tests.conftest import run_cli, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.s3server import S3Bucket
from tests.tables import by_source

ENDPOINT = "wss://waves-api.smallest.ai/api/v1/pulse/get_text"


def _manifest(folder: Path, text: str) -> Path:
    path = folder / "job.yaml"
    path.write_text(text)
    return path


def _validate(manifest: Path) -> tuple[int, str]:
    done = run_cli("validate", str(manifest))
    return done.returncode, done.output


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


# --- headers that lie about the audio -----------------------------------------------------


def _one_hz_wav(path: Path) -> Path:
    """A WAV whose header says 1 Hz: 32,000 samples probe as 32,000 s."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(1)
        out.writeframes(np.random.default_rng(1).integers(-3000, 3000, 32000, "<i2").tobytes())
    return path


def _lying_mp3(path: Path) -> Path:
    """A 2 s MP3 whose Xing frame count says 10 million frames (about 100 hours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=16000, layout="mono")
        pcm = (tone_track([Burst(0.2, 1.0, 440)], 2.0, 16000) * 20000).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    data = bytearray(buffer.getvalue())
    tag = max(data.find(b"Xing"), data.find(b"Info"))
    assert tag > 0 and data[tag + 7] & 1  # the frame-count field is present
    data[tag + 8 : tag + 12] = struct.pack(">I", 10_000_000)
    path.write_bytes(bytes(data))
    return path


def test_headers_that_lie_fail_their_rows_at_plan_time(tmp_path: Path) -> None:
    _one_hz_wav(tmp_path / "media" / "one_hz.wav")
    _lying_mp3(tmp_path / "media" / "liar.mp3")
    write_audio(
        tmp_path / "media" / "fine.wav", [tone_track([Burst(0.1, 0.2, 440)], 1, 8000)], 8000
    )
    manifest = write_manifest(tmp_path, inputs=[{"glob": "media/*"}])
    items = {Path(i.source).name: i for i in jobs.plan_items(load_manifest(manifest))}
    one_hz, liar = items["one_hz.wav"].error, items["liar.mp3"].error
    assert one_hz is not None and one_hz.kind == "not_media"
    assert "sample rate is 1 Hz, below the 2000 Hz" in str(one_hz)
    assert liar is not None and liar.kind == "decode_error"
    assert "more than its" in str(liar) and "header is wrong" in str(liar)
    assert items["fine.wav"].error is None


def test_a_lying_header_behind_a_url_is_caught_by_the_object_size(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    url = s3_bucket.upload(_lying_mp3(tmp_path / "liar.mp3"), "liar.mp3")
    with pytest.raises(InputError) as caught:
        probe(url)
    assert caught.value.kind == "decode_error"


def test_plausible_bounds_are_pure() -> None:
    plausible.check("a.wav", 8000, 3600.0, 8000 * 2 * 3600)  # an hour of 8 kHz PCM
    plausible.check("a.opus", 16000, 3600.0, 40_000)  # an hour of near-silent Opus (DTX)
    plausible.check("a.wav", 0, None, None)  # nothing said: decoding decides
    with pytest.raises(InputError, match="1999 Hz"):
        plausible.check("a.wav", 1999, 1.0, 10_000)
    with pytest.raises(InputError, match="3,600 s"):
        plausible.check("a.mp3", 16000, 3600.0, 20_000)


# --- lists that reach outside ---------------------------------------------------------------

SECRET = "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG"


def _clip(path: Path, hz: int = 440) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_audio(path, [tone_track([Burst(0.1, 0.3, hz)], 1.0, 8000)], 8000)


def _transcripts(out: Path) -> dict[str, tuple[object, ...]]:
    return by_source(out, "status, error_kind, error, reference", name_only=True)


def test_a_local_list_reads_references_only_under_its_folder(tmp_path: Path) -> None:
    secret = tmp_path / "home" / ".aws" / "credentials"
    secret.parent.mkdir(parents=True)
    secret.write_text(SECRET)
    jobdir = tmp_path / "job"
    for name in ("a", "b", "c", "d", "e"):
        _clip(jobdir / f"{name}.wav")
    (jobdir / "refs").mkdir()
    (jobdir / "refs" / "a.txt").write_text("tone")
    (jobdir / "refs" / "link.txt").symlink_to(secret)
    rows = [
        {"path": "a.wav", "reference_path": "refs/a.txt"},
        {"path": "b.wav", "reference_path": str(secret)},
        {"path": "c.wav", "reference_path": "../home/.aws/credentials"},
        {"path": "d.wav", "reference_path": "refs/link.txt"},
        {"path": "e.wav", "reference_path": secret.as_uri()},
    ]
    (jobdir / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = write_manifest(jobdir, inputs=[{"list": "list.jsonl"}])
    anyio.run(run_job, load_manifest(manifest), RunOptions())
    got = _transcripts(jobdir / "out")
    assert got["a.wav"][0] == "ok" and got["a.wav"][3] == "tone"
    for name in ("b.wav", "c.wav", "d.wav", "e.wav"):
        status, kind, error, reference = got[name]
        assert (status, kind, reference) == ("failed", "bad_path", None), name
        assert "is outside" in str(error) and "reference_root" in str(error)
    assert not any(SECRET in str(row) for row in got.values())
    # The manifest may allow another folder for references.
    allowed = write_manifest(
        jobdir, inputs=[{"list": "list.jsonl", "reference_root": str(secret.parent)}]
    )
    items = {Path(i.source).name: i for i in jobs.plan_items(load_manifest(allowed))}
    assert items["b.wav"].error is None and items["e.wav"].error is None
    assert items["d.wav"].error is None  # the link leads under the allowed root
    assert items["c.wav"].error is None


def test_a_list_in_a_bucket_names_only_objects_in_that_bucket(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    local = _clip(tmp_path / "local" / "private.wav")
    secret = tmp_path / "credentials"
    secret.write_text(SECRET)
    s3_bucket.upload(_clip(tmp_path / "a.wav"), "lists/clips/a.wav")
    other = s3_bucket.upload(_clip(tmp_path / "b.wav"), "elsewhere/b.wav")
    s3_bucket.put("lists/refs/a.txt", b"tone")
    rows = [
        {"path": "clips/a.wav", "reference_path": "refs/a.txt"},
        {"path": other},  # the same bucket: fine
        {"path": str(local)},
        {"path": local.as_uri()},
        {"path": f"s3://another-{s3_bucket.name}/x.wav"},
        {"path": "clips/a.wav", "reference_path": str(secret), "channels": "0"},
    ]
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    listed = s3_bucket.put("lists/list.jsonl", body)
    manifest = write_manifest(tmp_path, inputs=[{"list": listed}])
    items = jobs.plan_items(load_manifest(manifest))
    errors = {(i.source, i.channel): i.error for i in items}
    assert errors[(s3_bucket.url("lists/clips/a.wav"), None)] is None
    assert errors[(other, None)] is None
    refused = [e for e in errors.values() if e is not None]
    assert len(refused) == 4 and all(e.kind == "bad_path" for e in refused)
    assert all(f"may name only objects under s3://{s3_bucket.name}/" in str(e) for e in refused[:3])
    assert "reference_path" in str(errors[(s3_bucket.url("lists/clips/a.wav"), 0)])


# --- odd lists --------------------------------------------------------------------------------


def test_a_list_cell_of_any_size_is_read(tmp_path: Path) -> None:
    _clip(tmp_path / "a.wav")
    long_reference = "word " * 60_000  # 300,000 characters: a three-hour meeting
    (tmp_path / "l.csv").write_text(f'path,reference\na.wav,"{long_reference}"\n')
    manifest = write_manifest(tmp_path, inputs=[{"list": "l.csv"}])
    code, output = _validate(manifest)
    assert code == 0, output
    (item,) = jobs.plan_items(load_manifest(manifest))
    assert item.reference is not None and item.reference.text == long_reference


def test_a_misspelt_list_column_stops_validation_unless_declared(tmp_path: Path) -> None:
    _clip(tmp_path / "a.wav")
    (tmp_path / "l.csv").write_text("\npath,langauge,team\na.wav,es,sales\n")
    manifest = write_manifest(tmp_path, inputs=[{"list": "l.csv"}])
    code, output = _validate(manifest)
    assert code == 2
    assert "l.csv: line 2: column 'langauge' is not one the runner reads" in output
    assert "did you mean 'language'?" in output and "metadata_columns: ['langauge']" in output
    declared = write_manifest(
        tmp_path, inputs=[{"list": "l.csv", "metadata_columns": ["langauge"]}]
    )
    (item,) = jobs.plan_items(load_manifest(declared))
    assert item.metadata == {"langauge": "es", "team": "sales"}
    assert item.options.language == "en"


def test_a_misspelt_jsonl_key_names_its_line(tmp_path: Path) -> None:
    _clip(tmp_path / "a.wav")
    rows = [{"path": "a.wav", "team": "x"}, {"path": "a.wav", "Reference-Path": "r.txt"}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        ManifestError, match=r"line 2: column 'Reference-Path' .* did you mean 'reference_path'"
    ):
        jobs.plan_items(load_manifest(write_manifest(tmp_path, inputs=[{"list": "l.jsonl"}])))


# --- identity by content ----------------------------------------------------------------------


def test_a_recording_moved_inside_the_glob_is_not_billed_again(tmp_path: Path) -> None:
    _clip(tmp_path / "rec" / "incoming" / "a.wav", 440)
    _clip(tmp_path / "rec" / "incoming" / "b.wav", 880)
    run = {"identity": "content"}
    manifest = write_manifest(tmp_path, inputs=[{"glob": "rec/**/*.wav"}], run=run)
    first = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert (first.report["items"]["ok"], first.report["attempts"]) == (2, 2)
    (tmp_path / "rec" / "archive").mkdir()
    (tmp_path / "rec" / "incoming" / "a.wav").rename(tmp_path / "rec" / "archive" / "a.wav")
    second = anyio.run(run_job, load_manifest(manifest), RunOptions())
    assert second.report["attempts"] == 0, second.report
    got = _transcripts(tmp_path / "out")
    assert len(got) == 2 and all(row[0] == "ok" for row in got.values())
    # By path (the default) the moved file is a new item.
    content_ids = {i.item_id for i in jobs.plan_items(load_manifest(manifest))}
    by_path = write_manifest(tmp_path, inputs=[{"glob": "rec/**/*.wav"}])
    path_ids = {i.item_id for i in jobs.plan_items(load_manifest(by_path))}
    assert len(path_ids) == 2 and not path_ids & content_ids


def test_content_identity_of_an_unreadable_file_fails_its_row(tmp_path: Path) -> None:
    _clip(tmp_path / "media" / "a.wav")
    (tmp_path / "media" / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    manifest = write_manifest(
        tmp_path, inputs=[{"glob": "media/*.wav"}], run={"identity": "content"}
    )
    items = {Path(i.source).name: i for i in jobs.plan_items(load_manifest(manifest))}
    assert items["a.wav"].error is None
    gone = items["gone.wav"].error
    assert gone is not None and gone.kind == "not_found"


def test_content_identity_of_an_object_follows_its_bytes(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    local = _clip(tmp_path / "a.wav")
    s3_bucket.upload(local, "incoming/a.wav")
    run = {"identity": "content"}
    manifest = write_manifest(tmp_path, inputs=[{"glob": s3_bucket.url("**/*.wav")}], run=run)
    (before,) = jobs.plan_items(load_manifest(manifest))
    s3_bucket.upload(local, "archive/a.wav")
    s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="incoming/a.wav")
    (after,) = jobs.plan_items(load_manifest(manifest))
    assert after.source == s3_bucket.url("archive/a.wav")
    assert after.item_id == before.item_id and after.error is None
