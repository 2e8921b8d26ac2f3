"""Reading inputs from object storage when the store misbehaves: a stalled read, throttling,
5xx answers, a missing or denied object. Real S3 API on loopback (moto server mode) with
faults injected on the wire (`tests.s3server.Fault`), real PyAV decodes, real sessions
against the local server, Parquet read back."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from batch.decode import DecodedAudio, WireFormat
from batch.errors import InputUnavailable, Scope, Verdict, classify
from batch.job import Observer, RunOptions, run_job
from batch.manifest import load_manifest
from batch.model import Item
from batch.plan import expand_sources, make_items
from batch.readahead import BATCH_AUDIO_S, ReadAhead
from batch.storage import read_failure, store_answer
from tests.conftest import TIME_UNIT_S, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.s3server import FAKE_SECRET, Fault, S3Bucket
from tests.tables import by_source

BURSTS = [Burst(0.5, 0.3, 440), Burst(1.5, 0.3, 880)]

ROW = "status, error_kind, error, attempts, transcript"  # a transcripts row, by source


def _clip(path: Path, seconds: float = 2.5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_audio(path, [tone_track(BURSTS, seconds, 16000)], 16000)


class _Watch(Observer):
    """Arms a stall on one object once planning is done (the planner's probe must not be
    held), and releases it when another item has finished."""

    def __init__(self, bucket: S3Bucket, stalled_key: str, quick_source: str) -> None:
        self.bucket = bucket
        self.stalled_key = stalled_key
        self.quick_source = quick_source
        self.quick_done = threading.Event()
        self.order: list[str] = []

    def planned(self, items: int, audio_s: float, skipped: int) -> None:
        self.fault = self.bucket.fault(
            self.stalled_key, release=self.quick_done, hold_s=30 * TIME_UNIT_S
        )

    def item_done(self, item: Item, ok: bool, audio_s: float, failure: str | None = None) -> None:
        self.order.append(item.source)
        if item.source == self.quick_source:
            self.quick_done.set()


def test_a_stalled_read_does_not_hold_up_another_session(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    # The stalled object's first range read is held until the other item has been streamed
    # (paced, 2 s of audio at 2x) and stored. Were reads done on the event loop, the held
    # read would stop every session: the other item could not finish, the hold would end
    # only at its 30 s bound, and `released` would say so. No timing is measured.
    slow = s3_bucket.upload(_clip(tmp_path / "src" / "slow.wav", 2.5), "slow.wav")
    quick = s3_bucket.upload(_clip(tmp_path / "src" / "quick.wav", 4.0), "quick.wav")
    # The client waits longer than the hold: s3fs's 15 s read timeout would end it first.
    patient = {"config_kwargs": {"read_timeout": 60 * TIME_UNIT_S}}
    manifest = write_manifest(
        tmp_path,
        inputs=[{"path": slow, "storage_options": patient}, {"path": quick}],
        run={"concurrency": 2, "pace": 2.0, "max_attempts": 1, "order": "listing"},
    )
    watch = _Watch(s3_bucket, "slow.wav", quick)
    result = anyio.run(run_job, load_manifest(manifest), RunOptions(), watch)
    assert watch.fault.applied == 1  # the stalled read happened
    assert watch.fault.released == [True], "the stall ran to its bound: the loop was blocked"
    assert watch.order == [quick, slow]
    assert result.report["items"]["ok"] == 2, result.report["failures"]
    rows = by_source(tmp_path / "out", ROW)
    assert rows[slow][4] == "tone440 tone880" and rows[quick][4] == "tone440 tone880"


def test_read_ahead_gives_the_same_chunks_and_positions_in_small_batches(tmp_path: Path) -> None:
    # Local files take the same worker-thread path: chunks, and the audio position after
    # each (what pacing waits for), are exactly those of reading the decoder directly.
    path = _clip(tmp_path / "a.wav", 6.0)
    wire = WireFormat("linear16", 16000, 4096)
    direct = DecodedAudio(path, wire)
    expected = [(chunk, direct.position_s) for chunk in direct]
    reader = ReadAhead(DecodedAudio(path, wire))
    batches = []
    for _ in range(len(expected) + 1):  # bounded: one chunk per batch at the least
        batch = reader.next_batch()
        if not batch:
            break
        batches.append(batch)
    assert [pair for batch in batches for pair in batch] == expected
    assert len(batches) > 1
    assert all(b[-1][1] - b[0][1] <= BATCH_AUDIO_S + 0.2 for b in batches)  # little is held


def _open_here(path: Path) -> bool:
    """Whether this process holds ``path`` open (Linux: its /proc fd links)."""
    fds = Path("/proc/self/fd")
    return any(os.path.realpath(fds / fd) == str(path.resolve()) for fd in os.listdir(fds))


def test_a_read_ahead_closed_mid_stream_releases_its_file(tmp_path: Path) -> None:
    path = _clip(tmp_path / "a.wav", 6.0)
    reader = ReadAhead(DecodedAudio(path, WireFormat("linear16", 16000, 4096)))
    assert reader.next_batch()
    assert _open_here(path)
    reader.close()
    assert not _open_here(path)
    assert reader.next_batch() == []  # nothing more is read once closed
    reader.close()  # twice is harmless


class _BlockingSource:
    """Chunks that wait on ``go`` before the second: a read that stalls."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.stalled = threading.Event()  # the read is waiting on ``go``
        self.finished = threading.Event()  # the generator's cleanup ran
        self.position_s = 0.0

    def __iter__(self) -> Iterator[bytes]:
        try:
            for index in range(100):
                if index == 1:
                    self.stalled.set()
                    self.go.wait(10 * TIME_UNIT_S)
                self.position_s = (index + 1) * 0.1
                yield b"\0" * 3200
        finally:
            self.finished.set()


def test_closing_during_a_stalled_read_cleans_up_when_the_read_returns() -> None:
    source = _BlockingSource()
    reader = ReadAhead(source)
    worker = threading.Thread(target=reader.next_batch)
    worker.start()
    assert source.stalled.wait(10 * TIME_UNIT_S)
    reader.close()  # the session ended while the read is stalled: not waited for
    assert worker.is_alive() and not source.finished.is_set()
    source.go.set()
    worker.join(10 * TIME_UNIT_S)
    assert source.finished.wait(10 * TIME_UNIT_S)  # closed by the worker, once it returned
    assert reader.next_batch() == []


# --- transient and permanent store failures ------------------------------------------

# No botocore retries of its own: each range read is tried s3fs's `retries` times, then
# fails to us. (A real deployment keeps both layers; the job's retry comes after them.)
_NO_SDK_RETRY = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


class _ArmAfterPlanning(Observer):
    """Runs ``arm`` once planning is done, so faults hit the sessions' reads only."""

    def __init__(self, arm: Callable[[], None]) -> None:
        self.arm = arm

    def planned(self, items: int, audio_s: float, skipped: int) -> None:
        self.arm()


def test_throttled_reads_are_retried_and_a_missing_object_is_not(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    from s3fs import S3FileSystem

    urls = {
        name: s3_bucket.upload(_clip(tmp_path / "src" / name), name)
        for name in ("throttled.wav", "down.wav", "deleted.wav")
    }
    faults: dict[str, Fault] = {}

    def arm() -> None:
        # Throttled for exactly one session's read (s3fs's own retries all answered
        # SlowDown), then served; down: 500 on every read; deleted after planning.
        faults["throttled"] = s3_bucket.fault(
            "throttled.wav", status=503, code="SlowDown", times=S3FileSystem.retries
        )
        faults["down"] = s3_bucket.fault("down.wav", status=500, code="InternalError", times=50)
        s3_bucket.client.delete_object(Bucket=s3_bucket.name, Key="deleted.wav")

    manifest = write_manifest(
        tmp_path,
        inputs=[{"path": url, "storage_options": _NO_SDK_RETRY} for url in urls.values()],
        run={"concurrency": 3, "max_attempts": 2, "backoff_initial_s": 0.05},
    )
    result = anyio.run(run_job, load_manifest(manifest), RunOptions(), _ArmAfterPlanning(arm))
    rows = by_source(tmp_path / "out", ROW)
    status, kind, error, attempts, transcript = rows[urls["throttled.wav"]]
    assert (status, attempts, transcript) == ("ok", 2, "tone440 tone880"), error
    assert faults["throttled"].applied == S3FileSystem.retries
    status, kind, error, attempts, _ = rows[urls["down.wav"]]
    assert (status, kind, attempts) == ("failed", "read_error", 2)  # every attempt used
    assert str(error).startswith(f"{urls['down.wav']}: the store failed for now")
    assert "InternalError" in str(error)
    status, kind, error, attempts, _ = rows[urls["deleted.wav"]]
    assert (status, kind, attempts) == ("failed", "not_found", 1)  # not retried
    assert error == f"{urls['deleted.wav']}: object not found; check the URL"
    assert result.report["retries"] == 2  # one for each retried item, none for the missing
    assert FAKE_SECRET not in json.dumps(result.report)


def test_a_denied_object_is_a_permission_failure_without_retry(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    url = s3_bucket.upload(_clip(tmp_path / "src" / "a.wav"), "a.wav")
    denied: list[Fault] = []

    def arm() -> None:
        for method in ("HEAD", "GET"):
            denied.append(
                s3_bucket.fault("a.wav", method=method, status=403, code="AccessDenied", times=50)
            )

    manifest = write_manifest(
        tmp_path,
        inputs=[{"path": url, "storage_options": _NO_SDK_RETRY}],
        run={"max_attempts": 3},
    )
    anyio.run(run_job, load_manifest(manifest), RunOptions(), _ArmAfterPlanning(arm))
    status, kind, error, attempts, _ = by_source(tmp_path / "out", ROW)[url]
    assert (status, kind, attempts) == ("failed", "permission", 1)
    assert str(error).startswith(f"{url}: access denied")
    assert sum(f.applied for f in denied) >= 1


def test_a_probe_the_store_fails_once_is_tried_again(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    url = s3_bucket.upload(_clip(tmp_path / "src" / "a.wav"), "a.wav")
    fault = s3_bucket.fault("a.wav", method="HEAD", status=503, code="SlowDown", times=1)
    loaded = load_manifest(
        write_manifest(tmp_path, inputs=[{"path": url, "storage_options": _NO_SDK_RETRY}])
    )
    (item,) = make_items(expand_sources(loaded), loaded)
    assert item.error is None and item.duration_s == pytest.approx(2.5, abs=0.01)
    assert fault.applied == 1


def _client_error(code: str, status: int, operation: str = "GetObject") -> Exception:
    from botocore.exceptions import ClientError

    response: Any = {"Error": {"Code": code, "Message": "m"}}
    response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return ClientError(response, operation)


def _translated(error: Exception, outer: Exception) -> Exception:
    """``outer`` raised from ``error``, as s3fs and fsspec translate SDK errors."""
    outer.__cause__ = error
    return outer


def test_store_errors_are_told_apart_by_what_they_say() -> None:
    import aiohttp
    from azure.core.exceptions import ServiceRequestError
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    transient = [
        _translated(_client_error("SlowDown", 503), OSError(5, "SlowDown")),
        _translated(_client_error("InternalError", 500), OSError(5, "InternalError")),
        _client_error("RequestTimeout", 400),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:9/b/k"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
        ConnectionResetError(104, "Connection reset by peer"),
        _translated(ConnectionRefusedError(111, "refused"), FileNotFoundError("http://h/a")),
        ServiceRequestError("connection aborted"),
        TimeoutError(),
    ]
    for error in transient:
        assert store_answer(error).transient, error
        assert isinstance(read_failure("s3://b/k", error), InputUnavailable), error
    permanent = {
        "not_found": _translated(_client_error("NoSuchKey", 404), FileNotFoundError("b/k")),
        "permission": _translated(_client_error("AccessDenied", 403), PermissionError("b/k")),
    }
    for kind, error in permanent.items():
        failure = read_failure("s3://b/k", error)
        assert failure.kind == kind and not isinstance(failure, InputUnavailable)
        assert not classify(failure).retry
    assert classify(read_failure("s3://b/k", transient[0])) == Verdict(True, Scope.ITEM)
    odd = read_failure(
        "s3://b/k", _translated(_client_error("InvalidRange", 416), OSError(22, "x"))
    )
    assert odd.kind == "read_error" and not isinstance(odd, InputUnavailable)


def test_the_speech_search_reads_again_when_throttled(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    # skip_silence decodes the whole item before any session: a throttled read there is
    # retried too (the tone bursts hold no speech, so the item is ok with no session).
    from s3fs import S3FileSystem

    url = s3_bucket.upload(_clip(tmp_path / "src" / "a.wav"), "a.wav")
    faults: list[Fault] = []

    def arm() -> None:
        faults.append(
            s3_bucket.fault("a.wav", status=503, code="SlowDown", times=S3FileSystem.retries)
        )

    manifest = write_manifest(
        tmp_path,
        inputs=[{"path": url, "storage_options": _NO_SDK_RETRY}],
        run={"skip_silence": True, "max_attempts": 2},
    )
    anyio.run(run_job, load_manifest(manifest), RunOptions(), _ArmAfterPlanning(arm))
    status, kind, error, _, _ = by_source(tmp_path / "out", ROW)[url]
    assert (status, kind) == ("ok", None), error
    assert faults[0].applied == S3FileSystem.retries  # the first pass failed, the second read
