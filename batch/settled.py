"""Failed inputs that would fail the same way again: a rerun leaves them alone.

A file that is empty, not media, without audio or corrupt part-way (``decode_error``: a
truncated copy is streamed, and billed, up to where it breaks) fails the same way on every
run until the file itself changes. A rerun skips such an item while its source has not
changed since the failure was recorded; ``--retry-failed-input`` retries it anyway.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from batch.model import ItemStatus

# Input error kinds that depend only on the file's bytes (not on a store, a path or rights).
DETERMINISTIC_KINDS = frozenset({"empty", "not_media", "no_audio", "decode_error"})


def settled_failures(
    rows: Iterable[Mapping[str, Any]], changed_at: Callable[[str], float | None]
) -> set[str]:
    """The items whose latest transcripts row failed with a deterministic kind and whose
    source has not changed since that row was written. ``rows`` have item_id, source,
    status, error_kind and finished_at; ``changed_at(source)`` is when the file last
    changed (POSIX seconds), None when that cannot be told (a URL, a file gone): retried.
    Pure but for ``changed_at``."""
    latest: dict[str, Mapping[str, Any]] = {}
    for row in rows:
        seen = latest.get(row["item_id"])
        if seen is None or row["finished_at"] >= seen["finished_at"]:
            latest[row["item_id"]] = row
    settled = set()
    for item_id, row in latest.items():
        if row["status"] != ItemStatus.FAILED or row["error_kind"] not in DETERMINISTIC_KINDS:
            continue
        changed = changed_at(str(row["source"]))
        failed_at: datetime = row["finished_at"]
        if changed is not None and changed <= failed_at.timestamp():
            settled.add(item_id)
    return settled


def local_changed_at(source: str) -> float | None:
    """When a local file's bytes or metadata last changed (the later of mtime and ctime: a
    file copied over with its old mtime kept still counts as changed); None for a URL or
    a file that cannot be looked at."""
    if "://" in source:
        return None
    try:
        info = os.stat(source)
    except (OSError, ValueError):
        return None
    return max(info.st_mtime, info.st_ctime)
