"""Job and shard locks on object storage: leases by conditional writes, against real stores
on loopback: moto's S3 server and Azurite (Azure Blob), which both refuse a write whose
condition fails. The GCS emulator ignores ``ifGenerationMatch``: the GCS store is tested
below only where no refused condition is needed (see `test_gcs_*`)."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from batch.errors import LockedError, OutputError, ShardCountConflict
from batch.output.lease import Holder, Lease, decide, job_lease, lease_live
from batch.output.lease_stores import (
    AzureStore,
    GcsStore,
    LeaseStore,
    S3Store,
    azure_client,
    gcs_client,
    s3_client,
    store_for,
)
from batch.shard import Shard
from tests.conftest import wait_for
from tests.emulators import AzContainer, GcsBucket
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


@dataclass(frozen=True)
class Place:
    """A store under test: its lease store, URLs in it, and the SDK's own unconditional
    writes (as a stray writer or a clean-up job would make them)."""

    store: LeaseStore
    url: Callable[[str], str]
    put: Callable[[str, bytes], None]
    delete: Callable[[str], None]

    def holder(self, key: str) -> Holder | None:
        found = self.store.read(self.url(key))
        return None if found is None else Holder.from_bytes(found[0])


def _s3_place(bucket: S3Bucket) -> Place:
    client = s3_client()  # from the AWS_* environment the s3_bucket fixture set
    name = bucket.url("").split("://", 1)[1].split("/", 1)[0]

    def put(key: str, body: bytes) -> None:
        client.put_object(Bucket=name, Key=key, Body=body)

    def delete(key: str) -> None:
        client.delete_object(Bucket=name, Key=key)

    return Place(S3Store(client), bucket.url, put, delete)


def _az_place(container: AzContainer) -> Place:
    sdk = container.client()

    def put(key: str, body: bytes) -> None:
        sdk.upload_blob(key, body, overwrite=True)

    def delete(key: str) -> None:
        sdk.delete_blob(key)

    return Place(AzureStore(azure_client(container.url())), container.url, put, delete)


@pytest.fixture(params=["s3", "az"])
def place(request: pytest.FixtureRequest) -> Place:
    """A bucket of the loopback S3 server, or a container of Azurite: both refuse a write
    whose condition fails. Clients come from the environment the fixtures set."""
    if request.param == "s3":
        return _s3_place(request.getfixturevalue("s3_bucket"))
    return _az_place(request.getfixturevalue("az_container"))


def test_a_lease_is_taken_once_renewed_and_released(place: Place) -> None:
    url = place.url("out/_locks/j/shard-0-of-2.lease")
    first = Lease(place.store, url, "shard 0/2")
    first.acquire()
    second = Lease(place.store, url, "shard 0/2")
    with pytest.raises(LockedError, match=rf"is held \(shard 0/2: pid \d+ on {HOST}"):
        second.acquire()
    assert first.renew()
    first.release()
    assert place.holder("out/_locks/j/shard-0-of-2.lease") is None
    second.acquire()  # free again
    assert not first.renew()  # no longer ours


def test_a_lapsed_lease_is_taken_over_once_and_its_old_holder_cannot_renew(
    place: Place,
) -> None:
    url = place.url("out/_locks/j/job.lease")
    now = [1000.0]
    old = Lease(place.store, url, "old", ttl_s=60, clock=lambda: now[0])
    old.host = "another-host"  # a holder this host cannot check: only time frees it
    old.acquire()
    racers = [Lease(place.store, url, f"new{i}", ttl_s=60, clock=lambda: now[0]) for i in range(2)]
    with pytest.raises(LockedError):
        racers[0].acquire()
    now[0] += 61  # the old holder stopped renewing
    racers[0].acquire()
    with pytest.raises(LockedError, match="new0"):
        racers[1].acquire()
    assert not old.renew()  # it learns it lost the lease
    old.release()  # its delete is refused: the lease stays the new holder's
    assert racers[0].still_mine() and not old.still_mine()


def test_an_orphaned_lease_of_this_host_is_taken_at_once(place: Place) -> None:
    """A lease far from running out whose holder on this host is gone is taken over at once;
    the same lease held by a live process of this host is not."""
    key = "out/_locks/j/shard-1-of-2.lease"
    live = Holder(HOST, os.getppid(), "shard 1/2 of a live run", expires_at=4e9)
    place.put(key, live.to_bytes())
    with pytest.raises(LockedError, match="shard 1/2 of a live run"):
        Lease(place.store, place.url(key), "rerun").acquire()
    assert place.holder(key) == live

    dead = Holder(HOST, _gone_pid(), "shard 1/2 of a killed run", expires_at=4e9)
    place.put(key, dead.to_bytes())
    rerun = Lease(place.store, place.url(key), "rerun")
    rerun.acquire()
    taken = place.holder(key)
    assert taken is not None and (taken.host, taken.pid, taken.note) == (HOST, os.getpid(), "rerun")
    assert rerun.renew()  # the lease is the rerun's now


def test_job_and_shard_leases_exclude_as_the_local_locks_do(place: Place) -> None:
    store, out = place.store, place.url("out")
    with job_lease(out, "j", Shard(0, 2), store):
        with (
            pytest.raises(LockedError, match="shard 0/2 of job 'j' is already running"),
            job_lease(out, "j", Shard(0, 2), store),
        ):
            pass
        with job_lease(out, "j", Shard(1, 2), store):  # another shard runs beside it
            pass
        with (
            pytest.raises(LockedError, match="shards of job 'j' are running"),
            job_lease(out, "j", None, store),
        ):
            pass
        assert lease_live(out, "j", Shard(0, 2), store)
        assert not lease_live(out, "j", Shard(1, 2), store)
    with (
        job_lease(out, "j", None, store),
        pytest.raises(LockedError, match="running unsharded"),
        job_lease(out, "j", Shard(1, 2), store),
    ):
        pass
    with job_lease(out, "j", Shard(1, 2), store):  # released on leaving
        pass
    with job_lease(out, "j", None, store), job_lease(out, "other", None, store):
        pass  # another job runs beside it into the same output


def test_a_deleted_or_taken_lease_fails_the_holders_check(place: Place) -> None:
    store, out = place.store, place.url("out")
    key = "out/_locks/j/job.lease"
    with job_lease(out, "j", None, store, ttl_s=0.4) as check:  # renewed every 0.1 s
        check()  # ours: nothing raised
        place.delete(key)
        # Its holder writes it again at its next renewal: no second run can start now.
        assert wait_for(lambda: place.holder(key) is not None, 5)
        check()
        with pytest.raises(LockedError, match="already running"), job_lease(out, "j", None, store):
            pass
    with job_lease(out, "j", None, store) as check:  # renewed every 15 s
        place.delete(key)
        with pytest.raises(OutputError, match="lease was deleted or taken over"):
            check()
        with job_lease(out, "j", None, store) as thief_check:  # a second run could start
            thief_check()
            with pytest.raises(OutputError, match="nothing more is committed"):
                check()  # but the first one's next commit is refused
    with (
        job_lease(out, "j", Shard(0, 2), store),
        pytest.raises(ShardCountConflict, match="this is shard 1/3"),
        job_lease(out, "j", Shard(1, 3), store),
    ):
        pass


# --- Google Cloud Storage: as far as the emulator is honest ------------------------------
# gcp-storage-emulator ignores ifGenerationMatch (a create over an existing object, or a
# replace or delete at a stale generation, succeeds), so a lease refused by its condition
# (a second taker, a stale renewal) cannot be shown here. These tests run only sequences
# in which every condition holds, so each passes on real GCS for the same reasons; and the
# emulator's request log shows that each write asks for its condition.


def _gcs(bucket: GcsBucket) -> tuple[GcsStore, str]:
    return GcsStore(gcs_client()), bucket.url("out")


def _requests(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("gcp_storage_emulator")]


def test_gcs_a_lease_is_written_renewed_and_released_with_generation_conditions(
    gcs_bucket: GcsBucket, caplog: pytest.LogCaptureFixture
) -> None:
    store, out = _gcs(gcs_bucket)
    url = f"{out}/_locks/j/job.lease"
    lease = Lease(store, url, "job 'j'")
    with caplog.at_level(logging.INFO, "gcp_storage_emulator"):
        lease.acquire()
        first = lease.version
        blob = gcs_bucket.client().bucket(gcs_bucket.name).get_blob("out/_locks/j/job.lease")
        assert str(blob.generation) == first
        holder = Holder.from_bytes(blob.download_as_bytes())
        assert holder is not None and (holder.host, holder.pid) == (HOST, os.getpid())
        assert lease_live(out, "j", None, store)
        assert lease.renew() and lease.version != first and lease.still_mine()
        renewed = lease.version
        lease.release()
    assert store.read(url) is None and not lease_live(out, "j", None, store)
    writes = [line for line in _requests(caplog) if line.startswith(('"POST /upload', '"DELETE'))]
    assert [re.findall(r"[?&]ifGenerationMatch=(\d+)[& ]", line) for line in writes] == [
        ["0"],  # take: only if absent
        [first],  # renew: only if still the generation we wrote
        [renewed],  # release: likewise
    ], writes


def test_gcs_a_killed_or_lapsed_holder_is_not_live(gcs_bucket: GcsBucket) -> None:
    store, out = _gcs(gcs_bucket)
    blob = gcs_bucket.client().bucket(gcs_bucket.name).blob("out/_locks/j/shard-0-of-2.lease")
    blob.upload_from_string(Holder(HOST, os.getppid(), "live", 4e9).to_bytes())
    assert lease_live(out, "j", Shard(0, 2), store)
    blob.upload_from_string(Holder(HOST, _gone_pid(), "killed", 4e9).to_bytes())
    assert not lease_live(out, "j", Shard(0, 2), store)
    blob.upload_from_string(Holder("another-host", 1, "lapsed", 1000.0).to_bytes())
    assert not lease_live(out, "j", Shard(0, 2), store)


def test_gcs_shards_of_another_count_and_a_whole_run_are_refused(gcs_bucket: GcsBucket) -> None:
    """Refusals that come from reading and listing the other leases, not from a condition."""
    store, out = _gcs(gcs_bucket)
    with job_lease(out, "j", Shard(0, 2), store):
        with (
            pytest.raises(ShardCountConflict, match=r"as shard 0/2 .*this is shard 1/3"),
            job_lease(out, "j", Shard(1, 3), store),
        ):
            pass
        with (
            pytest.raises(LockedError, match="shards of job 'j' are running"),
            job_lease(out, "j", None, store),
        ):
            pass
    with (
        job_lease(out, "j", None, store),
        pytest.raises(LockedError, match="running unsharded"),
        job_lease(out, "j", Shard(1, 2), store),
    ):
        pass
    assert store.list_prefix(f"{out}/_locks/") == []  # every lease released


def test_no_credentials_for_a_lease_say_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """No store is reached: google-auth finds no credentials on this machine (no metadata
    server is asked), and no ``AZURE_STORAGE_*`` variable names an account."""
    for name in [n for n in os.environ if n.startswith(("AZURE_", "GOOGLE_", "STORAGE_EMU"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    monkeypatch.setenv("GCE_METADATA_HOST", "127.0.0.1:9")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")
    monkeypatch.setenv("CLOUDSDK_CONFIG", "/nonexistent/pulse-batch-tests/gcloud")
    with pytest.raises(OutputError, match="no Google Cloud Storage credentials were found; set"):
        store_for("gs://b/lake")
    with pytest.raises(OutputError, match="no Azure credentials were found; set AZURE_STORAGE"):
        store_for("az://c/lake")
    assert store_for("file:///tmp/lake") is None


def test_a_write_whose_answer_was_lost_is_known_as_ours(s3_bucket: S3Bucket) -> None:
    """The store applied the write, its answer was lost, and the SDK's retry was refused
    (the object exists, or is no longer at the version the retry names): the lease must see
    its own holder note there, not refuse itself or give itself up."""
    key = "out/_locks/j/job.lease"
    lease = Lease(S3Store(s3_client()), s3_bucket.url(key), "job 'j'")
    lost = s3_bucket.fault(key, method="PUT", status=500, code="InternalError", served=True)
    lease.acquire()  # not "is held (job 'j': pid <ours>...)"
    assert lost.applied == 1 and lease.still_mine()
    s3_bucket.fault(key, method="PUT", status=500, code="InternalError", served=True)
    assert lease.renew() and lease.still_mine()  # not "lost the lock"
