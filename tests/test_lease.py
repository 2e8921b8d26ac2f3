"""Job and shard locks on object storage: leases by S3 conditional writes, against the
loopback S3 server (moto server mode)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

import pytest

from batch.errors import LockedError, OutputError, ShardCountConflict
from batch.output.lease import Holder, S3Lease, decide, job_lease, s3_client
from batch.shard import Shard
from tests.conftest import wait_for
from tests.s3server import S3Bucket

HOST = socket.gethostname()


def _gone_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(child.stdout)


def test_decide_takes_over_only_a_lapsed_or_orphaned_lease() -> None:
    alive = {1: True, 2: False}.__getitem__
    live = Holder(HOST, 1, "x", expires_at=100.0)
    assert not decide(live, 50.0, HOST, alive)
    assert decide(live, 100.0, HOST, alive)  # ran out
    assert decide(None, 50.0, HOST, alive)  # unreadable or free
    orphan = Holder(HOST, 2, "x", expires_at=100.0)
    assert decide(orphan, 50.0, HOST, alive)  # its process on this host is gone
    elsewhere = Holder("another-host", 2, "x", expires_at=100.0)
    assert not decide(elsewhere, 50.0, HOST, alive)  # cannot tell: wait for it to run out


def _client(bucket: S3Bucket) -> Any:
    return s3_client()  # from the AWS_* environment the s3_bucket fixture set


def test_a_lease_is_taken_once_renewed_and_released(s3_bucket: S3Bucket) -> None:
    client = _client(s3_bucket)
    url = s3_bucket.url("out/_locks/j/shard-0-of-2.lease")
    first = S3Lease(client, url, "shard 0/2")
    first.acquire()
    second = S3Lease(client, url, "shard 0/2")
    with pytest.raises(LockedError, match=rf"is held \(shard 0/2: pid \d+ on {HOST}"):
        second.acquire()
    assert first.renew()
    first.release()
    second.acquire()  # free again
    assert not first.renew()  # no longer ours


def test_a_lapsed_lease_is_taken_over_once_and_its_old_holder_cannot_renew(
    s3_bucket: S3Bucket,
) -> None:
    client = _client(s3_bucket)
    url = s3_bucket.url("out/_locks/j/job.lease")
    now = [1000.0]
    old = S3Lease(client, url, "old", ttl_s=60, clock=lambda: now[0])
    old.host = "another-host"  # a holder this host cannot check: only time frees it
    old.acquire()
    racers = [S3Lease(client, url, f"new{i}", ttl_s=60, clock=lambda: now[0]) for i in range(2)]
    with pytest.raises(LockedError):
        racers[0].acquire()
    now[0] += 61  # the old holder stopped renewing
    racers[0].acquire()
    with pytest.raises(LockedError, match="new0"):
        racers[1].acquire()
    assert not old.renew()  # it learns it lost the lease


def test_an_orphaned_lease_of_this_host_is_taken_at_once(s3_bucket: S3Bucket) -> None:
    """A lease far from running out whose holder on this host is gone is taken over at once;
    the same lease held by a live process of this host is not."""
    client = _client(s3_bucket)
    url = s3_bucket.url("out/_locks/j/shard-1-of-2.lease")
    bucket, key = url.removeprefix("s3://").split("/", 1)

    def holder_now() -> Holder | None:
        return Holder.from_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    live = Holder(HOST, os.getppid(), "shard 1/2 of a live run", expires_at=4e9)
    client.put_object(Bucket=bucket, Key=key, Body=live.to_bytes())
    with pytest.raises(LockedError, match="shard 1/2 of a live run"):
        S3Lease(client, url, "rerun").acquire()
    assert holder_now() == live

    dead = Holder(HOST, _gone_pid(), "shard 1/2 of a killed run", expires_at=4e9)
    client.put_object(Bucket=bucket, Key=key, Body=dead.to_bytes())
    rerun = S3Lease(client, url, "rerun")
    rerun.acquire()
    taken = holder_now()
    assert taken is not None and (taken.host, taken.pid, taken.note) == (HOST, os.getpid(), "rerun")
    assert rerun.renew()  # the lease is the rerun's now


def test_job_and_shard_leases_exclude_as_the_local_locks_do(s3_bucket: S3Bucket) -> None:
    client = _client(s3_bucket)
    out = s3_bucket.url("out").rstrip("/")
    with job_lease(out, "j", Shard(0, 2), client):
        with (
            pytest.raises(LockedError, match="shard 0/2 of job 'j' is already running"),
            job_lease(out, "j", Shard(0, 2), client),
        ):
            pass
        with job_lease(out, "j", Shard(1, 2), client):  # another shard runs beside it
            pass
        with (
            pytest.raises(LockedError, match="shards of job 'j' are running"),
            job_lease(out, "j", None, client),
        ):
            pass
    with (
        job_lease(out, "j", None, client),
        pytest.raises(LockedError, match="running unsharded"),
        job_lease(out, "j", Shard(1, 2), client),
    ):
        pass
    with job_lease(out, "j", Shard(1, 2), client):  # released on leaving
        pass
    with job_lease(out, "j", None, client), job_lease(out, "other", None, client):
        pass  # another job runs beside it into the same output


def _exists(client: Any, bucket: str, key: str) -> bool:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=key)
    return bool(listed.get("Contents"))


def test_a_deleted_or_taken_lease_fails_the_holders_check(s3_bucket: S3Bucket) -> None:
    client = _client(s3_bucket)
    out = s3_bucket.url("out").rstrip("/")
    bucket, key = s3_bucket.url("out/_locks/j/job.lease").split("://", 1)[1].split("/", 1)
    with job_lease(out, "j", None, client, ttl_s=0.4) as check:  # renewed every 0.1 s
        check()  # ours: nothing raised
        client.delete_object(Bucket=bucket, Key=key)
        # Its holder writes it again at its next renewal: no second run can start now.
        assert wait_for(lambda: _exists(client, bucket, key), 5)
        check()
        with pytest.raises(LockedError, match="already running"), job_lease(out, "j", None, client):
            pass
    with job_lease(out, "j", None, client) as check:  # renewed every 15 s
        client.delete_object(Bucket=bucket, Key=key)
        with pytest.raises(OutputError, match="lease was deleted or taken over"):
            check()
        with job_lease(out, "j", None, client) as thief_check:  # a second run could start
            thief_check()
            with pytest.raises(OutputError, match="nothing more is committed"):
                check()  # but the first one's next commit is refused
    with (
        job_lease(out, "j", Shard(0, 2), client),
        pytest.raises(ShardCountConflict, match="this is shard 1/3"),
        job_lease(out, "j", Shard(1, 3), client),
    ):
        pass
