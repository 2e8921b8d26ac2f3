"""The loopback S3 fixture itself: a real S3 API that standard clients reach via ``AWS_*``."""

from __future__ import annotations

from pathlib import Path

import av
import s3fs

from tests.media import Burst, tone_track, write_format
from tests.s3server import FAKE_SECRET, S3Bucket


def test_bucket_is_reachable_through_the_standard_environment(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    local = tmp_path / "a.txt"
    local.write_bytes(b"hello")
    url = s3_bucket.upload(local, "dir/a.txt")
    assert url == f"s3://{s3_bucket.name}/dir/a.txt"
    # No endpoint or key given here: s3fs/botocore find them in os.environ.
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert fs.cat(f"{s3_bucket.name}/dir/a.txt") == b"hello"
    assert s3_bucket.keys() == ["dir/a.txt"]
    assert s3_bucket.env["AWS_SECRET_ACCESS_KEY"] == FAKE_SECRET


def test_each_test_gets_an_empty_bucket(s3_bucket: S3Bucket) -> None:
    assert s3_bucket.keys() == []


def test_request_log_shows_range_reads(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    path = write_format(
        tmp_path / "long.wav", "wav_s16", [tone_track([Burst(1, 1, 440)], 30, 16000)], 16000
    )
    s3_bucket.upload(path)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, default_block_size=64 * 1024)
    with fs.open(f"{s3_bucket.name}/long.wav", "rb") as f, av.open(f) as container:
        assert container.streams.audio[0].sample_rate == 16000
    gets = [r for r in s3_bucket.requests() if r.method == "GET" and r.key() == "long.wav"]
    assert gets and all(r.range for r in gets)
    assert sum(r.bytes_sent for r in gets) < path.stat().st_size / 2
