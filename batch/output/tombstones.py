"""Tombstones: the items of a job that were forgotten (`pulse-batch forget`), so that later
runs do not transcribe them again.

::

    _forgotten/<job>/<item_id>.json     {"item_id": ..., "forgotten_at": ..., "reason": ...}

One small file (an object, on object storage) per item, written whole or not at all (an
atomic rename locally, one PUT on a bucket): writing one twice is harmless, so a forget that
was killed and is run again converges. A tombstone holds no content and no source path (a
file name may itself be personal data, such as a caller's name): only the item id, a hash
of the source's identity and options, when, and the reason the operator gave.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Final

from batch.errors import OutputError
from batch.output import layout, store_errors
from batch.output.layout import Location, translated
from batch.output.reports import _remote_fs

FOLDER: Final = "_forgotten"


@dataclass(frozen=True)
class Tombstone:
    item_id: str
    forgotten_at: str  # ISO 8601, UTC
    reason: str = ""


def _folder(location: Location, job: str) -> str:
    return location.child(FOLDER, job)


@contextlib.contextmanager
def _translated(operation: str, location: Location, folder: str) -> Iterator[None]:
    """`layout.translated`; a store's refusal (an `OSError` from fsspec) said as what it
    means, as the tables' own errors are (`batch.output.store_errors`)."""
    with translated(operation, folder):
        try:
            yield
        except OSError as exc:
            if location.local is not None:
                raise
            said = f"{exc} {exc.__cause__ or ''}"  # s3fs keeps the error code in the cause
            raise OutputError(folder, operation, store_errors.reason(said, folder)) from exc


def _remote(location: Location) -> Any:
    fs = _remote_fs(location)
    fs.invalidate_cache()  # another process may have written or removed some since
    return fs


def read(location: Location, job: str) -> dict[str, Tombstone]:
    """The job's tombstones by item id (none when the job has none)."""
    folder = _folder(location, job)
    found: dict[str, Tombstone] = {}
    with _translated("read the tombstones in", location, folder):
        if location.local is not None:
            local = location.local / FOLDER / job
            texts = [p.read_bytes() for p in sorted(local.glob("*.json"))]
        else:
            fs = _remote(location)
            texts = [fs.cat_file(path) for path in sorted(fs.glob(f"{folder}/*.json"))]
    for text in texts:
        data = json.loads(text)
        found[str(data["item_id"])] = Tombstone(
            str(data["item_id"]), str(data["forgotten_at"]), str(data.get("reason") or "")
        )
    return found


def write(location: Location, job: str, stones: Iterable[Tombstone]) -> None:
    """Write (or rewrite) one tombstone per item."""
    folder = _folder(location, job)
    with _translated("write a tombstone to", location, folder):
        fs: Any = None if location.local is not None else _remote(location)
        for stone in stones:
            data = json.dumps(asdict(stone)).encode()
            if location.local is not None:
                local = location.local / FOLDER / job
                local.mkdir(parents=True, exist_ok=True)
                layout.write_atomic(local / f"{stone.item_id}.json", data)
            else:
                with fs.open(f"{folder}/{stone.item_id}.json", "wb") as handle:
                    handle.write(data)


def remove(location: Location, job: str, item_ids: Iterable[str]) -> None:
    """Remove the tombstones of ``item_ids`` (``run --force`` brings the items back)."""
    folder = _folder(location, job)
    with _translated("remove a tombstone from", location, folder):
        fs: Any = None if location.local is not None else _remote(location)
        for item_id in item_ids:
            if location.local is not None:
                (location.local / FOLDER / job / f"{item_id}.json").unlink(missing_ok=True)
            else:
                path = f"{folder}/{item_id}.json"
                if fs.exists(path):
                    fs.rm_file(path)
