"""How far a list file may reach: pure rules on where its rows point.

Whoever can write a list can make the runner read what its rows name, with the runner's own
credentials, into a session (``path``) or into ``transcripts.reference``
(``reference_path``). So:

- a list at a URL (``s3://bucket/...``) names only objects in the same store (same scheme
  and bucket or host) in ``path`` and ``reference_path``: no local paths, no ``file://``;
- a list's ``reference_path`` stays under the list's own folder (for a URL list: its store),
  or under the list input's ``reference_root`` when the manifest gives one.

A row that reaches further is refused: `refusal` says why, and the planner makes the row a
failed item (``bad_path``) that never opens a session.
"""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from batch import storage
from batch.errors import quoted
from batch.model import Reference


def refusal(
    list_location: str, path: str, reference: Reference | None, reference_root: str | None
) -> str | None:
    """Why the row of the list at ``list_location`` naming ``path`` (and ``reference``,
    both already made absolute against the list's folder) must not be read, or None.
    ``reference_root`` is an absolute local folder or a URL prefix."""
    if storage.is_url(list_location):
        store = _store(list_location)
        if not _in_store(path, store):
            return (
                f"a list at {store} may name only objects under {store}; this row's path "
                f"names {quoted(path)}"
            )
    if reference is None or reference.path is None:
        return None
    target = reference.path
    home = _store(list_location) if storage.is_url(list_location) else _folder(list_location)
    if _under(target, home) or (reference_root is not None and _under(target, reference_root)):
        return None
    allowed = home if reference_root is None else f"{home} or {reference_root}"
    return (
        f"its reference_path {quoted(target)} is outside {allowed}; references are read only "
        "from under the list's folder (its store, for a list at a URL): move the file there, "
        "or allow its folder with reference_root on the list input"
    )


def _store(url: str) -> str:
    """``scheme://bucket/`` (or host) of a URL."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}/"


def _in_store(location: str, store: str) -> bool:
    return storage.is_url(location) and _store(location) == store


def _folder(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


def _under(target: str, root: str) -> bool:
    """``target`` is ``root`` or below it: URLs by prefix (with no ``..`` step), local paths
    (and ``file://`` URLs) after following symlinks, so a link cannot lead outside."""
    if storage.is_url(root) and storage.scheme(root) != "file":
        prefix = root if root.endswith("/") else f"{root}/"
        steps = urlsplit(target).path.split("/")
        return target.startswith(prefix) and ".." not in steps
    local_root = _local(root)
    local_target = _local(target)
    if local_root is None or local_target is None:
        return False
    real_root, real_target = os.path.realpath(local_root), os.path.realpath(local_target)
    return os.path.commonpath([real_root, real_target]) == real_root


def _local(location: str) -> str | None:
    """A local path for a local path or a ``file://`` URL; None for other URLs."""
    if not storage.is_url(location):
        return location
    if storage.scheme(location) == "file":
        return unquote(urlsplit(location).path)
    return None
