"""Inputs from object storage and the web: real S3 API (moto server) and a real HTTP server
with Range support, both on loopback; real PyAV decodes reading ranges; Parquet read back."""

from __future__ import annotations

import http.server
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from batch.decode import DecodedAudio, WireFormat, probe
from batch.errors import ManifestError
from batch.manifest import LoadedManifest, load_manifest, parse_manifest
from batch.plan import expand_sources, make_items
from batch.storage import BLOCK_BYTES
from tests.conftest import run_cli, write_manifest
from tests.media import DEMO_CLIPS, SPEECH, Burst, onsets_s, tone_track, write_audio
from tests.s3server import FAKE_KEY_ID, FAKE_SECRET, S3Bucket
from tests.tables import by_source

BURSTS = [Burst(0.5, 0.3, 440), Burst(1.5, 0.3, 880)]

ROW = "status, error_kind, transcript, item_id"  # a transcripts row, by source


def _clip(path: Path, seconds: float = 2.5, rate: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_audio(path, [tone_track(BURSTS, seconds, rate)], rate)


def _loaded(folder: Path, inputs: list[dict[str, object]]) -> LoadedManifest:
    return load_manifest(write_manifest(folder, inputs=inputs))


def _assert_no_secret(*texts: str, folder: Path) -> None:
    for text in texts:
        assert FAKE_SECRET not in text
    for path in (p for p in folder.rglob("*") if p.is_file()):
        assert FAKE_SECRET.encode() not in path.read_bytes(), path


def test_glob_a_bucket_end_to_end(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    for name in ("a.wav", "sub/b.wav"):
        s3_bucket.upload(_clip(tmp_path / "src" / name), f"media/{name}")
    s3_bucket.put("media/notes.wav", b"RIFF but not really a wave file at all" * 20)
    s3_bucket.put("media/skip.txt", b"not matched by the glob")
    bucket = s3_bucket.name
    manifest = write_manifest(
        tmp_path,
        inputs=[
            {"glob": f"s3://{bucket}/media/**/*.wav"},
            {"path": f"s3://{bucket}/media/gone.wav"},
        ],
    )
    # The endpoint and keys reach the subprocess only through the standard AWS_* variables.
    done = run_cli("run", "-v", str(manifest), env=s3_bucket.env)
    assert done.returncode == 1, done.stderr  # two items failed
    rows = by_source(tmp_path / "out", ROW)
    url = f"s3://{bucket}/media/"
    assert {s: r[:2] for s, r in rows.items()} == {
        f"{url}a.wav": ("ok", None),
        f"{url}sub/b.wav": ("ok", None),
        f"{url}notes.wav": ("failed", "not_media"),
        f"{url}gone.wav": ("failed", "not_found"),
    }
    assert rows[f"{url}a.wav"][2] == "tone440 tone880"
    # Decoded from ranges, never by fetching whole objects.
    media_gets = [r for r in s3_bucket.requests() if r.method == "GET" and r.key().endswith(".wav")]
    assert media_gets and all(r.range for r in media_gets)

    # Same URL, same options: same id; so a rerun has nothing left to do.
    again = run_cli("run", str(manifest), env=s3_bucket.env)
    summary = again.stdout.splitlines()[-1]
    assert " ok=0 failed=2 skipped=2 " in summary, summary  # bad inputs are tried again
    assert by_source(tmp_path / "out", ROW) == rows
    _assert_no_secret(done.stdout, done.stderr, again.stdout, again.stderr, folder=tmp_path)


def test_validate_and_dry_run_read_urls(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    s3_bucket.upload(_clip(tmp_path / "a.wav", seconds=3.0), "in/a.wav")
    manifest = write_manifest(tmp_path, inputs=[{"glob": f"s3://{s3_bucket.name}/in/*.wav"}])
    valid = run_cli("validate", str(manifest), env=s3_bucket.env)
    assert valid.returncode == 0, valid.stderr
    assert "1 item(s), 3.0 s of audio; 0 known bad" in valid.stdout
    dry = run_cli("run", "--dry-run", str(manifest), env=s3_bucket.env)
    assert dry.returncode == 0, dry.stderr
    assert f"s3://{s3_bucket.name}/in/a.wav" in dry.stdout + dry.stderr
    probed = run_cli("probe", "--json", f"s3://{s3_bucket.name}/in/a.wav", env=s3_bucket.env)
    assert probed.returncode == 0, probed.stderr
    assert json.loads(probed.stdout)[0]["sample_rate"] == 16000
    _assert_no_secret(valid.stdout, dry.stdout, dry.stderr, probed.stdout, folder=tmp_path)


def test_decoding_reads_ranges_and_never_the_whole_object(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    # About 5.8 MB: several range blocks.
    local = _clip(tmp_path / "long.wav", seconds=180.0, rate=16000)
    size = local.stat().st_size
    url = s3_bucket.upload(local, "long.wav")

    info = probe(url)
    assert abs((info.duration_s or 0) - 180.0) < 0.01
    probe_bytes = sum(r.bytes_sent for r in s3_bucket.requests() if r.method == "GET")
    assert probe_bytes <= BLOCK_BYTES * 2 < size  # a look at the header, not the file

    before = len(s3_bucket.requests())
    audio = DecodedAudio(url, WireFormat("linear16", 16000))
    pcm = b"".join(audio)
    gets = [r for r in s3_bucket.requests()[before:] if r.method == "GET"]
    assert abs(audio.duration_s - 180.0) < 0.01
    assert onsets_s(pcm[: 16000 * 2 * 2], 16000) == pytest.approx([0.5, 1.5], abs=0.02)
    # Every read was a bounded range; together they read the object about once.
    assert len(gets) >= size // (2 * BLOCK_BYTES)
    assert all(r.range and r.bytes_sent <= 2 * BLOCK_BYTES for r in gets)
    assert sum(r.bytes_sent for r in gets) < 2 * size


def test_a_list_in_the_bucket_resolves_relative_rows_there(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    s3_bucket.upload(_clip(tmp_path / "a.wav"), "batch/clips/a.wav")
    other = s3_bucket.upload(_clip(tmp_path / "b.wav"), "elsewhere/b.wav")
    s3_bucket.put("batch/list.csv", f"path,customer\nclips/a.wav,acme\n{other},zed\n".encode())
    loaded = _loaded(tmp_path, [{"list": s3_bucket.url("batch/list.csv")}])
    sources = expand_sources(loaded)
    assert [(s.path, s.metadata) for s in sources] == [
        (s3_bucket.url("batch/clips/a.wav"), {"customer": "acme"}),
        (other, {"customer": "zed"}),
    ]
    items = make_items(sources, loaded)
    assert [i.error for i in items] == [None, None]
    assert [i.duration_s for i in items] == pytest.approx([2.5, 2.5])


def test_ids_are_stable_for_a_url_and_follow_its_spelling(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    url = s3_bucket.upload(_clip(tmp_path / "a.wav"), "a.wav")
    by_path = _loaded(tmp_path, [{"path": url}])
    first = make_items(expand_sources(by_path), by_path)
    loaded = _loaded(tmp_path, [{"glob": s3_bucket.url("*.wav")}])
    second = make_items(expand_sources(loaded), loaded)
    assert [i.source for i in second] == [url]
    assert first[0].item_id == second[0].item_id


def test_file_urls_keep_their_spelling(tmp_path: Path) -> None:
    _clip(tmp_path / "media" / "a.wav")
    loaded = _loaded(tmp_path, [{"glob": f"file://{tmp_path}/media/*.wav"}])
    items = make_items(expand_sources(loaded), loaded)
    assert [(i.source, i.error) for i in items] == [(f"file://{tmp_path}/media/a.wav", None)]
    pcm = b"".join(DecodedAudio(items[0].source, WireFormat("linear16", 16000)))
    assert onsets_s(pcm, 16000) == pytest.approx([0.5, 1.5], abs=0.02)


def test_a_bucket_that_cannot_be_listed_is_a_manifest_error(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    loaded = _loaded(tmp_path, [{"glob": f"s3://no-such-{s3_bucket.name}/*.wav"}])
    with pytest.raises(ManifestError, match=f"s3://no-such-{s3_bucket.name}/"):
        expand_sources(loaded)


def test_a_missing_extra_names_the_extra_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # as if pulse-batch[s3] were not installed
    with pytest.raises(ManifestError, match=re.escape("pip install 'pulse-batch[s3]'")):
        parse_manifest(
            {"version": 1, "job": "j", "inputs": [{"glob": "s3://media/*.wav"}]}, tmp_path / "m"
        )


def test_a_missing_extra_fails_validate_with_exit_2(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, inputs=[{"path": "s3://media/a.wav"}])
    blocked = (
        "import sys, runpy; sys.modules['s3fs'] = None; sys.argv = ['batch', 'validate', "
        f"{str(manifest)!r}]; runpy.run_module('batch', run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    # Printed as written (brackets are not console markup), whatever the wrapping.
    assert "pip install 'pulse-batch[s3]'" in " ".join(done.stderr.split())


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"storage_options": {"secret": FAKE_SECRET}}, "storage_options.secret"),
        ({"storage_options": {"key": FAKE_KEY_ID}}, "storage_options.key"),
        (
            {"storage_options": {"client_kwargs": {"aws_secret_access_key": FAKE_SECRET}}},
            "storage_options.client_kwargs.aws_secret_access_key",
        ),
        ({"storage_options": {"account_key": FAKE_SECRET}}, "storage_options.account_key"),
        ({"path": f"s3://{FAKE_KEY_ID}:{FAKE_SECRET}@media/a.wav"}, "password in the URL"),
        ({"path": f"https://host/a.wav?X-Amz-Signature={FAKE_SECRET}"}, "signature or token"),
    ],
)
def test_credentials_in_the_manifest_are_refused_without_echoing_them(
    entry: dict[str, object], named: str, tmp_path: Path
) -> None:
    source = {"path": "s3://media/a.wav", **entry}
    with pytest.raises(ManifestError) as refused:
        parse_manifest({"version": 1, "job": "j", "inputs": [source]}, tmp_path / "m")
    assert named in str(refused.value)
    assert FAKE_SECRET not in str(refused.value)


def test_non_secret_storage_options_are_used(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    url = s3_bucket.upload(_clip(tmp_path / "a.wav"), "a.wav")
    options = {"default_block_size": 65536, "client_kwargs": {"region_name": "us-east-1"}}
    loaded = _loaded(tmp_path, [{"path": url, "storage_options": options}])
    items = make_items(expand_sources(loaded), loaded)
    assert items[0].error is None and items[0].storage_options == options
    audio = DecodedAudio(
        url, WireFormat("linear16", 16000), storage_options=items[0].storage_options
    )
    assert onsets_s(b"".join(audio), 16000) == pytest.approx([0.5, 1.5], abs=0.02)


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder with single byte ranges (RFC 9110 §14), which http.server lacks."""

    ranges: list[str | None]

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        path = Path(self.translate_path(self.path))
        if self.path.startswith("/private/"):
            self.send_error(403)
            return
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        wanted = self.headers.get("Range")
        self.ranges.append(wanted if body else "HEAD")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            data = data[start : end + 1]
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def range_server(tmp_path: Path) -> Iterator[tuple[str, list[str | None]]]:
    folder = tmp_path / "site"
    folder.mkdir()
    ranges: list[str | None] = []

    class Handler(_RangeHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)  # type: ignore[misc]

    Handler.ranges = ranges
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", ranges
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_web_url_is_one_item_read_in_ranges(
    range_server: tuple[str, list[str | None]], tmp_path: Path
) -> None:
    base, ranges = range_server
    _clip(tmp_path / "site" / "call.wav", seconds=3.0)
    _clip(tmp_path / "site" / "private" / "secret.wav")
    names = ("call.wav", "gone.wav", "private/secret.wav")
    manifest = write_manifest(tmp_path, inputs=[{"path": f"{base}/{name}"} for name in names])
    done = run_cli("run", str(manifest))
    assert done.returncode == 1, done.stderr
    rows = by_source(tmp_path / "out", ROW)
    assert {s: r[:3] for s, r in rows.items()} == {
        f"{base}/call.wav": ("ok", None, "tone440 tone880"),
        f"{base}/gone.wav": ("failed", "not_found", None),
        f"{base}/private/secret.wav": ("failed", "permission", None),
    }
    gets = [r for r in ranges if r != "HEAD"]
    assert gets and all(r is not None and r.startswith("bytes=") for r in gets)


def test_a_web_url_cannot_be_globbed(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="name each file with path:"):
        parse_manifest(
            {"version": 1, "job": "j", "inputs": [{"glob": "https://host/*.wav"}]}, tmp_path / "m"
        )


@pytest.mark.whisper
def test_real_speech_from_a_bucket(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    name = "cancel.wav"
    url = s3_bucket.upload(DEMO_CLIPS / name, f"calls/{name}")
    manifest = write_manifest(
        tmp_path, inputs=[{"path": url}], pulse={"endpoint": "local", "local_engine": "whisper"}
    )
    done = run_cli("run", str(manifest), env=s3_bucket.env)
    assert done.returncode == 0, done.stderr
    (status, _, transcript, _) = by_source(tmp_path / "out", ROW)[url]
    assert status == "ok"
    assert str(transcript).lower().strip(" .") == SPEECH[name]
    _assert_no_secret(done.stdout, done.stderr, folder=tmp_path)


def test_an_unreachable_server_is_a_read_error(tmp_path: Path) -> None:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]  # closed again below: nothing listens there
    loaded = _loaded(tmp_path, [{"path": f"http://127.0.0.1:{port}/a.wav"}])
    items = make_items(expand_sources(loaded), loaded)
    assert items[0].error is not None and items[0].error.kind == "read_error"
    assert f"http://127.0.0.1:{port}/a.wav" in str(items[0].error)
