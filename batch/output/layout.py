"""Where things live in an output, and the local-filesystem primitives both backends share.

Layout under ``output.path``::

    transcripts/ words/ utterances/    the tables (Parquet files, or Delta tables)
    _pulse_batch.json                  format, schema version and partitioning (local only)
    _locks/                            job and shard locks of local outputs (`batch.output.locks`;
                                       they stay, with a README-DO-NOT-DELETE.txt beside them)
    _locks/<job>.commit.lock           held while a batch commits or recovery runs (Parquet)
    _locks/<job>/*.lease               job and shard locks on object storage (`batch.output.lease`)
    _staging/<job>/...                 batches being committed (local Parquet)
    _reports/<job>/<run_id>.json|.md   run reports, and latest.json|.md

Nothing outside `batch.output` knows these names. Every OS, Arrow or Delta error met here is
translated into `OutputError` naming the path and the operation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pyarrow as pa

from batch.errors import ManifestError, OutputError, PulseBatchError
from batch.output import store_errors
from batch.output.schema import SCHEMA_VERSION
from batch.output.store_errors import one_line

logger = logging.getLogger(__name__)

MARKER: Final = "_pulse_batch.json"
FORMATS: Final = ("parquet", "delta")


@dataclass(frozen=True)
class Location:
    """An output: a local folder, or a URL (``s3://bucket/prefix``) for Delta outputs."""

    url: str
    local: Path | None

    @classmethod
    def of(cls, where: str | Path) -> Location:
        text = str(where)
        if "://" in text and not text.startswith("file://"):
            return cls(text.rstrip("/"), None)
        path = Path(text.removeprefix("file://")).resolve()
        return cls(str(path), path)

    @property
    def is_remote(self) -> bool:
        return self.local is None

    def child(self, *parts: str) -> str:
        return "/".join([self.url, *parts])


@contextlib.contextmanager
def translated(operation: str, path: Path | str) -> Iterator[None]:
    """Turn OS and Arrow errors into `OutputError` (our own errors pass through)."""
    try:
        yield
    except PulseBatchError:
        raise
    except OSError as exc:
        where = exc.filename or path
        reason = one_line(exc.strerror or str(exc)) or type(exc).__name__
        if exc.errno is not None:
            reason = f"{reason} ({errno.errorcode.get(exc.errno, exc.errno)})"
        raise OutputError(where, operation, reason) from exc
    except pa.ArrowException as exc:
        raise OutputError(path, operation, one_line(f"{type(exc).__name__}: {exc}")) from exc
    except _sdk_errors() as exc:  # no credentials: botocore's own errors are not OSErrors
        raise OutputError(path, operation, store_errors.reason(exc, str(path))) from exc


def _sdk_errors() -> tuple[type[Exception], ...]:
    """The storage SDKs' error roots that are not `OSError` (botocore is an extra)."""
    try:
        from botocore.exceptions import BotoCoreError  # type: ignore[import-untyped]
    except ImportError:
        return ()
    return (BotoCoreError,)


# --- atomic files ------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")


def _write_tmp(path: Path, data: bytes) -> Path:
    tmp = _tmp_name(path)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: readers see the old or the new file, never a part."""
    tmp = _write_tmp(path, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist, atomically (a hard link
    fails when the name is taken). Returns False when another process created it first."""
    tmp = _write_tmp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


# --- locks -------------------------------------------------------------------------


class Busy(Exception):
    """Another process holds the lock (not an OSError: no output failure)."""


FileId = tuple[int, int]  # (st_dev, st_ino): which file a name points at


def file_id(path: Path) -> FileId | None:
    """The identity of the file at ``path`` now, None if there is none."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return None
    return (found.st_dev, found.st_ino)


@contextlib.contextmanager
def exclusive(path: Path, note: str | None, *, wait: bool = False) -> Iterator[FileId]:
    """An OS lock on ``path`` for the block; yields the locked file's identity. Without
    ``wait``, raises `Busy` if another process holds it. The kernel drops it when its
    process dies: a killed run leaves no live lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(str(path)) from None
        try:
            if note is not None:  # who holds it, for the message a second run gets
                handle.seek(0)
                handle.truncate()
                handle.write(note)
                handle.flush()
            held = os.fstat(handle.fileno())
            yield (held.st_dev, held.st_ino)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def holder_note() -> str:
    return f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"


def is_locked(path: Path) -> bool:
    try:
        with exclusive(path, None):
            return False
    except Busy:
        return True


@contextlib.contextmanager
def shared(path: Path) -> Iterator[FileId]:
    """A shared OS lock: any number of holders, but none while `exclusive` holds it.
    Raises `Busy` if an exclusive holder has it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(str(path)) from None
        try:
            held = os.fstat(handle.fileno())
            yield (held.st_dev, held.st_ino)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def commit_lock(root: Path, job: str) -> contextlib.AbstractContextManager[FileId]:
    """Held (waiting for it) while a batch of ``job`` commits, so that runs of one job's
    shards never rewrite the same file at once."""
    return exclusive(root / "_locks" / f"{job}.commit.lock", None, wait=True)


def layout_lock(root: Path) -> contextlib.AbstractContextManager[FileId]:
    """Held (waiting for it) while the marker is created or the output upgraded."""
    return exclusive(root / "_locks" / "_layout.lock", holder_note(), wait=True)


# --- the layout marker ---------------------------------------------------------------


def read_marker(root: Path) -> dict[str, Any] | None:
    marker = root / MARKER
    try:
        found = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ManifestError(
            marker, "is not valid JSON; restore it or use a new output.path"
        ) from None
    if not isinstance(found, dict):
        raise ManifestError(marker, "is not a pulse-batch layout marker; use a new output.path")
    return found


def marker_format(found: dict[str, Any]) -> str:
    return str(found.get("format", "parquet"))  # version 1 outputs were always Parquet


def check_layout(root: Path, partition_by: Sequence[str], fmt: str) -> dict[str, Any]:
    """Record the format and partitioning on first use (created atomically: of two jobs
    racing on a new output, one creates the marker and the other reads it); refuse a
    different one later. Returns the marker found or created."""
    wanted: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "format": fmt,
        "partition_by": list(partition_by),
    }
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ManifestError(root, "output.path exists and is not a folder") from None
    found = read_marker(root)
    if found is None:
        if create_exclusive(root / MARKER, json.dumps(wanted, indent=2).encode()):
            return wanted
        found = read_marker(root) or wanted
    if marker_format(found) != fmt:
        raise ManifestError(
            root,
            f"output was written as {marker_format(found)}; this manifest asks output.format "
            f"{fmt}. Use a new output.path (or the format it was written with).",
        )
    if found.get("partition_by") != list(partition_by):
        raise ManifestError(
            root,
            f"output was written with partition_by {found.get('partition_by')}; "
            f"this manifest asks {list(partition_by)}. Use a new output.path.",
        )
    version = int(found.get("schema_version", 1))
    if version > SCHEMA_VERSION:
        raise ManifestError(
            root,
            f"output has schema version {version}, newer than this pulse-batch "
            f"({SCHEMA_VERSION}); upgrade pulse-batch or use a new output.path",
        )
    return found


def set_marker_version(root: Path, found: dict[str, Any]) -> None:
    write_atomic(root / MARKER, json.dumps({**found, "schema_version": SCHEMA_VERSION}).encode())
