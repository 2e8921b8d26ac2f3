"""Leases: the job and shard locks of an output on object storage (S3, GCS, Azure Blob).

An object store has no OS lock that dies with its process, so a lock is a small object
holding who took it and until when, written with the store's conditional writes
(`batch.output.lease_stores`; a version is an ETag or a GCS generation):

- take: create only if absent; one of any number of racing takers wins, the others are
  refused;
- renew: rewrite only if it is still at the version we wrote, every ``ttl_s / 4``;
- take over: a lease that ran out (or whose holder on this host is gone) is replaced only
  if unchanged since it was read: two takers never both win;
- release: delete only if still ours.

A killed holder's lease runs out after ``ttl_s`` (immediately for a rerun on the same
host, which can see the process is gone). `decide` is the pure part: given what the lease
object says, may we take it?
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from batch.errors import LockedError, OutputError, ShardCountConflict
from batch.output.lease_stores import LeaseStore
from batch.shard import Shard

logger = logging.getLogger(__name__)

DEFAULT_TTL_S: Final = 60.0


@dataclass(frozen=True)
class Holder:
    """What a lease object says."""

    host: str
    pid: int
    note: str
    expires_at: float  # seconds since the epoch

    def describe(self) -> str:
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires_at))
        return f"{self.note}: pid {self.pid} on {self.host}, lease until {until}"

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        try:
            raw = json.loads(data)
            return cls(
                str(raw["host"]), int(raw["pid"]), str(raw["note"]), float(raw["expires_at"])
            )
        except (ValueError, KeyError, TypeError):
            return None  # not ours, or torn: treat as free once its object is replaced


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def decide(holder: Holder | None, now: float, host: str, pid_alive: Callable[[int], bool]) -> bool:
    """Whether a lease object saying ``holder`` may be taken over. Pure but for
    ``pid_alive``: a lease that ran out, an unreadable one, or one held by a process of this
    host that is gone."""
    if holder is None or holder.expires_at <= now:
        return True
    return holder.host == host and not pid_alive(holder.pid)


class Lease:
    """One lease object in ``store``; see the module docstring. Not reentrant."""

    def __init__(
        self,
        store: LeaseStore,
        url: str,
        note: str,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.url = url
        self.note = note
        self.ttl_s = ttl_s
        self.clock = clock
        self.host = socket.gethostname()
        self.version: str | None = None  # of the object we last wrote
        self._guard = threading.Lock()  # the renewer thread and `still_mine` share version

    def _mine(self) -> bytes:
        return Holder(self.host, os.getpid(), self.note, self.clock() + self.ttl_s).to_bytes()

    def _create(self) -> bool:
        body = self._mine()
        return self._wrote(body, self.store.create_if_absent(self.url, body))

    def _replace(self, version: str) -> bool:
        body = self._mine()
        return self._wrote(body, self.store.replace_if_version(self.url, body, version))

    def _wrote(self, body: bytes, version: str | None) -> bool:
        """Whether our write of ``body`` is the object now. A refused write may have been
        ours all the same: the store applied it, its answer was lost, and the SDK's retry
        was refused (the object existed, or had left the version named): our note is
        there. (A note names its host, pid and expiry: no other run's is equal.)"""
        if version is None:
            found = self.store.read(self.url)
            version = found[1] if found is not None and found[0] == body else None
        if version is not None:
            self.version = version
        return version is not None

    def _read(self) -> tuple[Holder | None, str] | None:
        found = self.store.read(self.url)
        return None if found is None else (Holder.from_bytes(found[0]), found[1])

    def held_by(self) -> Holder | None:
        """The live holder of this lease, if any (None when free or run out)."""
        found = self._read()
        if found is None or found[0] is None:
            return None
        holder = found[0]
        return None if decide(holder, self.clock(), self.host, _pid_alive) else holder

    def acquire(self) -> None:
        """Take the lease, or raise `LockedError` naming its holder."""
        for _ in range(3):  # bounded: each round either wins, loses to a live holder, or races
            if self._create():
                return
            found = self._read()
            if found is None:
                continue  # released between our write and our read: try again
            holder, version = found
            if not decide(holder, self.clock(), self.host, _pid_alive):
                assert holder is not None
                raise LockedError(f"{self.url} is held ({holder.describe()})")
            if self._replace(version):
                logger.info("took over a lapsed lock %s", self.url)
                return
        raise LockedError(f"{self.url}: other processes are taking this lock at this moment")

    def renew(self) -> bool:
        """Extend the lease; False if it is no longer ours (someone took over a lapsed one)."""
        with self._guard:
            if self.version is None:
                return False
            if self._replace(self.version):
                return True
            if self._read() is None and self._create():
                # Deleted (by a clean-up job?) and taken by nobody since: ours again, so a
                # second run cannot start beside this one.
                logger.warning("%s was deleted while held; wrote it again", self.url)
                return True
            return False

    def still_mine(self) -> bool:
        """Whether the lease object is still the one we wrote (not deleted, not taken over)."""
        with self._guard:
            if self.version is None:
                return False
            found = self.store.read(self.url)
            return found is not None and found[1] == self.version

    def release(self) -> None:
        if self.version is None:
            return
        with contextlib.suppress(Exception):  # a lapsed lease may already be someone else's
            self.store.delete_if_version(self.url, self.version)
        self.version = None


@contextlib.contextmanager
def held(lease: Lease) -> Iterator[Lease]:
    """Hold ``lease`` for the block, renewing it in a daemon thread every ``ttl_s / 4``."""
    lease.acquire()
    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(lease.ttl_s / 4):
            try:
                if not lease.renew():
                    logger.error("lost the lock %s: another process took it over", lease.url)
                    return
            except OutputError as error:  # a passing store error: try again next round
                logger.warning("could not renew %s: %s", lease.url, error)

    renewer = threading.Thread(target=keep, name="pulse-batch-lease", daemon=True)
    renewer.start()
    try:
        yield lease
    finally:
        stop.set()
        renewer.join(timeout=10)
        lease.release()


_SHARD_KEY: Final = re.compile(r"shard-(\d+)-of-(\d+)\.lease")


def _live_shards(store: LeaseStore, url: str, job: str) -> list[tuple[Shard, Holder]]:
    """The job's shards whose leases are held by live processes."""
    live = []
    for found in store.list_prefix(f"{url}/_locks/{job}/shard-"):
        match = _SHARD_KEY.fullmatch(found.rsplit("/", 1)[-1])
        if match is None:
            continue
        holder = Lease(store, found, "").held_by()
        if holder is not None:
            live.append((Shard(int(match[1]), int(match[2])), holder))
    return live


def _lease_url(url: str, job: str, shard: Shard | None) -> str:
    name = "job.lease" if shard is None else f"shard-{shard.index}-of-{shard.count}.lease"
    return f"{url}/_locks/{job}/{name}"


def lease_live(url: str, job: str, shard: Shard | None, store: LeaseStore) -> bool:
    """Whether the job's (or the shard's) lease is held by a live process."""
    lock = Lease(store, _lease_url(url, job, shard), "")
    return lock.held_by() is not None


@contextlib.contextmanager
def job_lease(
    url: str, job: str, shard: Shard | None, store: LeaseStore, ttl_s: float = DEFAULT_TTL_S
) -> Iterator[Callable[[], None]]:
    """The job lock of an output at ``url`` (``s3://bucket/prefix``, ``gs://``, ``az://``)
    in ``store``: a whole-job run holds
    ``_locks/<job>/job.lease``; shard I of N holds ``_locks/<job>/shard-I-of-N.lease``, and
    refuses to start beside a whole-job run, beside shards of another count
    (`ShardCountConflict`), and a whole-job run beside live shards. Each looks for the
    others after taking its own lease, so of two starting at once neither misses the other.
    Yields the check to make before each commit: it raises `OutputError` once the lease is
    no longer ours. Raises `LockedError`."""
    job_lock = Lease(store, _lease_url(url, job, None), f"job {job!r}", ttl_s)
    if shard is None:
        _refuse_shards(store, url, job)
        with _named(job_lock, f"job {job!r} is already running into {url}") as mine:
            _refuse_shards(store, url, job)
            yield _checker(mine)
        return
    _refuse_whole(job_lock, url, job)
    what = f"shard {shard.label} of job {job!r}"
    lease = Lease(store, _lease_url(url, job, shard), what, ttl_s)
    with _named(lease, f"{what} is already running into {url}") as mine:
        _refuse_whole(job_lock, url, job)
        for other, holder in _live_shards(store, url, job):
            if other.count != shard.count:
                raise ShardCountConflict(
                    f"job {job!r} is running into {url} as shard {other.label} "
                    f"({holder.describe()}), but this is shard {shard.label}: shards of "
                    "different counts would run some items twice. Wait for them to finish, "
                    f"or run with --shard I/{other.count}"
                )
        yield _checker(mine)


def _refuse_shards(store: LeaseStore, url: str, job: str) -> None:
    live = _live_shards(store, url, job)
    if live:
        raise LockedError(
            f"shards of job {job!r} are running into {url} ({live[0][1].describe()}); "
            "wait for them to finish"
        )


def _refuse_whole(job_lock: Lease, url: str, job: str) -> None:
    whole = job_lock.held_by()
    if whole is not None:
        raise LockedError(
            f"job {job!r} is running unsharded into {url} ({whole.describe()}); a shard "
            "cannot run beside it: wait for it to finish"
        )


def _checker(lease: Lease) -> Callable[[], None]:
    def check() -> None:
        if not lease.still_mine():
            raise OutputError(
                lease.url,
                "commit to",
                "this run's lease was deleted or taken over by another process (another run "
                "may have started beside it); stopped, nothing more is committed",
            )

    return check


@contextlib.contextmanager
def _named(lease: Lease, what: str) -> Iterator[Lease]:
    try:
        context = held(lease)
        context.__enter__()
    except LockedError as exc:
        raise LockedError(f"{what}: {exc}; wait for it to finish") from None
    try:
        yield lease
    finally:
        context.__exit__(None, None, None)
