"""Leases on S3 objects: the job and shard locks of an output on object storage.

An object store has no OS lock that dies with its process, so a lock is a small object
holding who took it and until when, written with S3 conditional writes:

- take: create only if absent (``If-None-Match: *``); one of any number of racing takers
  wins, the others get 412;
- renew: rewrite only if it is still ours (``If-Match`` our ETag), every ``ttl_s / 4``;
- take over: a lease that ran out (or whose holder on this host is gone) is replaced only
  if unchanged since it was read (``If-Match`` its ETag): two takers never both win;
- release: delete only if still ours.

A killed holder's lease runs out after ``ttl_s`` (immediately for a rerun on the same
host, which can see the process is gone). `decide` is the pure part: given what the lease
object says, may we take it?
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

from batch.errors import LockedError, OutputError, ShardCountConflict
from batch.output import store_errors
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


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> (bucket, key)."""
    rest = url.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    return bucket, key


def s3_client() -> Any:
    """A botocore S3 client from the standard AWS environment (endpoint, region,
    credentials chain); botocore comes with the ``s3`` extra. Each is made from a new
    session (the environment is read again) sharing one loader of botocore's service
    descriptions: parsing those is most of a client's cost (0.1-0.3 s)."""
    try:
        import botocore.session  # type: ignore[import-untyped]
    except ImportError:
        raise OutputError(
            "s3://", "lock", "S3 outputs need the s3 extra: pip install 'pulse-batch[s3]'"
        ) from None
    session = botocore.session.get_session()
    loader = _botocore_loader(session.get_config_variable("data_path"))
    session.register_component("data_loader", loader)
    return session.create_client("s3")


@functools.cache
def _botocore_loader(data_path: str | None) -> Any:
    """botocore's loader of its JSON service descriptions (from ``AWS_DATA_PATH`` too), made
    once per search path: it keeps what it parsed."""
    import botocore.loaders  # type: ignore[import-untyped]

    return botocore.loaders.create_loader(data_path)


class S3Lease:
    """One lease object; see the module docstring. Not reentrant."""

    def __init__(
        self,
        client: Any,
        url: str,
        note: str,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.url = url
        self.bucket, self.key = split_url(url)
        self.note = note
        self.ttl_s = ttl_s
        self.clock = clock
        self.host = socket.gethostname()
        self.etag: str | None = None
        self._guard = threading.Lock()  # the renewer thread and `still_mine` share etag

    def _mine(self) -> bytes:
        return Holder(self.host, os.getpid(), self.note, self.clock() + self.ttl_s).to_bytes()

    def _code(self, error: Exception) -> str:
        response = getattr(error, "response", None) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def _put(self, **condition: str) -> bool:
        """A conditional put of our holder note; False when the condition did not hold."""
        try:
            answer = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=self._mine(), **condition
            )
        except Exception as error:
            refused = (
                "PreconditionFailed",
                "ConditionalRequestConflict",
                "412",
                "NoSuchKey",
                "404",
            )
            if self._code(error) in refused:  # (If-Match on a deleted object: 404)
                return False
            raise OutputError(self.url, "take the lock", self._reason(error)) from error
        self.etag = str(answer["ETag"])
        return True

    def _reason(self, error: Exception) -> str:
        return store_errors.reason(self._code(error) or type(error).__name__, self.url)

    def _read(self) -> tuple[Holder | None, str] | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as error:
            if self._code(error) in ("NoSuchKey", "404"):
                return None
            raise OutputError(self.url, "read the lock", self._reason(error)) from error
        return Holder.from_bytes(answer["Body"].read()), str(answer["ETag"])

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
            if self._put(IfNoneMatch="*"):
                return
            found = self._read()
            if found is None:
                continue  # released between our put and our read: try again
            holder, etag = found
            if not decide(holder, self.clock(), self.host, _pid_alive):
                assert holder is not None
                raise LockedError(f"{self.url} is held ({holder.describe()})")
            if self._put(IfMatch=etag):
                logger.info("took over a lapsed lock %s", self.url)
                return
        raise LockedError(f"{self.url}: other processes are taking this lock at this moment")

    def renew(self) -> bool:
        """Extend the lease; False if it is no longer ours (someone took over a lapsed one)."""
        with self._guard:
            if self.etag is None:
                return False
            if self._put(IfMatch=self.etag):
                return True
            if self._read() is None and self._put(IfNoneMatch="*"):
                # Deleted (by a clean-up job?) and taken by nobody since: ours again, so a
                # second run cannot start beside this one.
                logger.warning("%s was deleted while held; wrote it again", self.url)
                return True
            return False

    def still_mine(self) -> bool:
        """Whether the lease object is still the one we wrote (not deleted, not taken over)."""
        with self._guard:
            if self.etag is None:
                return False
            found = self._read()
            return found is not None and found[1] == self.etag

    def release(self) -> None:
        if self.etag is None:
            return
        with contextlib.suppress(Exception):  # a lapsed lease may already be someone else's
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
        self.etag = None


@contextlib.contextmanager
def held(lease: S3Lease) -> Iterator[S3Lease]:
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


def _live_shards(client: Any, url: str, job: str) -> list[tuple[Shard, Holder]]:
    """The job's shards whose leases are held by live processes."""
    bucket, key = split_url(f"{url}/_locks/{job}/shard-")
    try:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=key)
    except Exception as error:
        raise OutputError(url, "list the locks", store_errors.reason(error, url)) from error
    live = []
    for entry in listed.get("Contents", []):
        match = _SHARD_KEY.fullmatch(str(entry["Key"]).rsplit("/", 1)[-1])
        if match is None:
            continue
        holder = S3Lease(client, f"s3://{bucket}/{entry['Key']}", "").held_by()
        if holder is not None:
            live.append((Shard(int(match[1]), int(match[2])), holder))
    return live


def _lease_url(url: str, job: str, shard: Shard | None) -> str:
    name = "job.lease" if shard is None else f"shard-{shard.index}-of-{shard.count}.lease"
    return f"{url}/_locks/{job}/{name}"


def lease_live(url: str, job: str, shard: Shard | None, client: Any = None) -> bool:
    """Whether the job's (or the shard's) lease is held by a live process."""
    lock = S3Lease(client or s3_client(), _lease_url(url, job, shard), "")
    return lock.held_by() is not None


@contextlib.contextmanager
def job_lease(
    url: str, job: str, shard: Shard | None, client: Any = None, ttl_s: float = DEFAULT_TTL_S
) -> Iterator[Callable[[], None]]:
    """The job lock of an output at ``url`` (``s3://bucket/prefix``): a whole-job run holds
    ``_locks/<job>/job.lease``; shard I of N holds ``_locks/<job>/shard-I-of-N.lease``, and
    refuses to start beside a whole-job run, beside shards of another count
    (`ShardCountConflict`), and a whole-job run beside live shards. Each looks for the
    others after taking its own lease, so of two starting at once neither misses the other.
    Yields the check to make before each commit: it raises `OutputError` once the lease is
    no longer ours. Raises `LockedError`."""
    client = client or s3_client()
    job_lock = S3Lease(client, _lease_url(url, job, None), f"job {job!r}", ttl_s)
    if shard is None:
        _refuse_shards(client, url, job)
        with _named(job_lock, f"job {job!r} is already running into {url}") as mine:
            _refuse_shards(client, url, job)
            yield _checker(mine)
        return
    _refuse_whole(job_lock, url, job)
    what = f"shard {shard.label} of job {job!r}"
    lease = S3Lease(client, _lease_url(url, job, shard), what, ttl_s)
    with _named(lease, f"{what} is already running into {url}") as mine:
        _refuse_whole(job_lock, url, job)
        for other, holder in _live_shards(client, url, job):
            if other.count != shard.count:
                raise ShardCountConflict(
                    f"job {job!r} is running into {url} as shard {other.label} "
                    f"({holder.describe()}), but this is shard {shard.label}: shards of "
                    "different counts would run some items twice. Wait for them to finish, "
                    f"or run with --shard I/{other.count}"
                )
        yield _checker(mine)


def _refuse_shards(client: Any, url: str, job: str) -> None:
    live = _live_shards(client, url, job)
    if live:
        raise LockedError(
            f"shards of job {job!r} are running into {url} ({live[0][1].describe()}); "
            "wait for them to finish"
        )


def _refuse_whole(job_lock: S3Lease, url: str, job: str) -> None:
    whole = job_lock.held_by()
    if whole is not None:
        raise LockedError(
            f"job {job!r} is running unsharded into {url} ({whole.describe()}); a shard "
            "cannot run beside it: wait for it to finish"
        )


def _checker(lease: S3Lease) -> Callable[[], None]:
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
def _named(lease: S3Lease, what: str) -> Iterator[S3Lease]:
    try:
        context = held(lease)
        context.__enter__()
    except LockedError as exc:
        raise LockedError(f"{what}: {exc}; wait for it to finish") from None
    try:
        yield lease
    finally:
        context.__exit__(None, None, None)
