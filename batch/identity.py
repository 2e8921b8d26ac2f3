"""Identity by content: a recording is the same item wherever it moves.

By default an item is its path (the real file behind it): moving ``incoming/a.wav`` to
``archive/a.wav`` makes a new item, streamed and billed again. With ``run.identity:
content`` the item is a SHA-256 of the file's bytes instead, so a moved (or copied)
recording keeps its ``item_id`` and a rerun skips it. The cost: every input file is read
once more, in full, on every run (done ones too), before anything else happens; for
objects in a store that is one more download of each.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from batch import storage
from batch.errors import InputError

_BLOCK_BYTES = 1 << 20


def digest(location: str, options: storage.StorageOptions) -> str:
    """``content:sha256:<hex>`` of the bytes at ``location`` (a local path or a URL),
    read in blocks. Raises `InputError` (the kinds a probe would give) if it cannot be read."""
    hasher = hashlib.sha256()
    if storage.is_url(location):
        with storage.open_input(location, options) as handle:
            try:
                while block := handle.read(_BLOCK_BYTES):
                    hasher.update(block)
            except Exception as exc:  # each SDK has its own errors: mapped by storage
                raise storage.read_failure(location, exc) from exc
    else:
        _hash_local(Path(location), hasher)
    return f"content:sha256:{hasher.hexdigest()}"


def _hash_local(path: Path, hasher: hashlib._Hash) -> None:
    try:
        with path.open("rb") as handle:
            while block := handle.read(_BLOCK_BYTES):
                hasher.update(block)
    except FileNotFoundError:
        raise InputError("not_found", path, "file not found; check the path") from None
    except PermissionError:
        raise InputError("permission", path, "permission denied; check file access") from None
    except IsADirectoryError:
        raise InputError("not_media", path, "is a directory, not a media file") from None
    except OSError as exc:
        raise InputError("read_error", path, f"cannot read: {exc.strerror or exc}") from None
