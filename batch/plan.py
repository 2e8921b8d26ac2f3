"""Plan a job: expand inputs into items with stable ids, and order the work.

`expand_sources` is file-system I/O (globs, list files); `make_items` is pure (the ids
are `batch.model.item_id`). A listed path that does not exist, is a symlink loop or a link
to a missing file, holds a NUL byte or is too long is not a crash: it becomes an item that fails
(``not_found``, ``symlink_loop``, ``bad_path``) without opening a session; so does such a
link matched by a glob. Globs follow symlinked folders but never walk a
real folder twice, so a loop cannot hang planning.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batch import identity, reach, storage
from batch.decode import ProbeInfo, probe
from batch.errors import InputError, ManifestError, quoted
from batch.lists import read_local, read_rows
from batch.manifest import ChannelNames, GlobInput, ListInput, LoadedManifest, PathInput
from batch.model import ChannelSpec, Item, Reference, Source, item_id
from batch.pulse.protocol import LANGUAGES
from batch.retry import Backoff, RetryPolicy
from batch.walk import walk_glob

logger = logging.getLogger(__name__)


def storable(text: str) -> str:
    """``text`` as valid UTF-8 for the tables: a non-UTF-8 file name's stray bytes (held as
    surrogates by Python) become ``\\xNN`` escapes instead of failing a Parquet write."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def locate(text: str, folder: str) -> Source:
    """A listed path, made absolute against ``folder`` (a local folder or a URL ending in
    ``/``), checked without following it into a loop: a NUL byte, a name too long, a
    symlink loop become the source's ``problem``. URLs are kept as listed."""
    if storage.is_url(text):
        return Source(text)
    if storage.is_url(folder):
        return Source(storage.join(folder, text))
    # Absolute by string operations only, so even a path the OS refuses has a full name.
    absolute = os.path.normpath(os.path.join(folder, text))
    shown = storable(absolute).replace("\x00", "\\x00")
    if "\x00" in text:
        problem = "the path holds a NUL byte; check the list for a stray binary field"
        return Source(shown, problem=InputError("bad_path", shown, problem))
    listed = Path(absolute)
    try:
        os.stat(listed)
    except FileNotFoundError:
        if os.path.islink(listed):  # the prober would name the target, not the link
            return Source(shown, problem=InputError("not_found", shown, _dangling(listed)))
        # Otherwise the prober says not_found, as for any missing file.
    except PermissionError:
        pass  # the prober says permission
    except OSError as exc:
        kind = {errno.ELOOP: "symlink_loop", errno.ENAMETOOLONG: "bad_path"}.get(
            exc.errno or 0, "permission"
        )
        why = {
            "symlink_loop": "is a symlink loop (it points back at itself); fix the link",
            "bad_path": "is too long for the file system; check the list for a joined field",
        }.get(kind, f"cannot be read: {exc.strerror}")
        return Source(shown, problem=InputError(kind, shown, why))
    except ValueError as exc:  # e.g. a lone surrogate the OS cannot encode
        return Source(shown, problem=InputError("bad_path", shown, str(exc)))
    try:
        resolved = listed.resolve()
    except (OSError, RuntimeError) as exc:  # a loop found while resolving (3.11: RuntimeError)
        why = f"is a symlink loop (it points back at itself); fix the link ({exc})"
        return Source(str(listed), problem=InputError("symlink_loop", shown, why))
    return Source(str(listed), resolved=str(resolved))


def _dangling(link: Path) -> str:
    try:
        target = storable(os.readlink(link))
    except OSError:
        target = "its target"
    return f"is a symlink to {target}, which does not exist; fix or remove the link"


def _channels_value(raw: Any, where: str, list_path: str) -> ChannelSpec | None:
    if raw is None or raw == "":
        return None
    text = str(raw).strip()
    if text in ("mix", "split"):
        return text
    if text.isdigit():
        return int(text)
    raise ManifestError(list_path, f"{where}: channels must be mix, split or a channel index")


def _list_bytes(location: str, options: storage.StorageOptions) -> bytes:
    if storage.is_url(location):
        return storage.read_bytes(location, options)
    return read_local(Path(location), what="list file")


def _folder_of(location: str) -> str:
    """The folder a list file's relative paths resolve against: a local path or a URL
    ending in ``/``."""
    if storage.is_url(location):
        return location[: location.rfind("/") + 1]
    return str(Path(location).parent)


def read_list_rows(location: str) -> Iterator[dict[str, Any]]:
    """A local list file's rows as dicts (``__line__`` holds the line number), read as job
    inputs are, for other readers of list files (`pulse-batch score`)."""
    name = urlsplit(location).path if storage.is_url(location) else location
    for number, row in read_rows(location, _list_bytes(location, {}), name):
        yield {"__line__": number, **row}


def reference_of(row: Mapping[str, Any], resolve: Callable[[str], str]) -> Reference | None:
    """The reference a list row gives, if any: ``reference`` text, or ``reference_path``
    (``resolve`` turns it into a location: relative to the list file's folder)."""
    text = row.get("reference")
    if text is not None and str(text) != "":
        return Reference(text=str(text))
    raw = row.get("reference_path")
    if raw is not None and str(raw) != "":
        return Reference(path=resolve(str(raw)))
    return None


def _sources_from_list(
    location: str, entry: ListInput, reference_root: str | None
) -> Iterator[Source]:
    name = urlsplit(location).path if storage.is_url(location) else location
    options = entry.storage_options
    declared = frozenset(str(c).strip() for c in entry.metadata_columns)
    for number, row in read_rows(location, _list_bytes(location, options), name, declared):
        where = f"line {number}"
        raw_path = row.pop("path", None)
        if raw_path is None or str(raw_path).strip() == "":
            raise ManifestError(location, f"{where}: the 'path' column is empty")
        language = str(row.pop("language", None) or "").strip() or None
        if language is not None and language not in LANGUAGES:
            raise ManifestError(location, f"{where}: language {quoted(language)} is not supported")
        channels = _channels_value(row.pop("channels", None), where, location)
        reference = reference_of(row, functools.partial(_listed_location, _folder_of(location)))
        row.pop("reference", None)
        row.pop("reference_path", None)
        metadata = {
            storable(str(k)): "" if v is None else storable(v if isinstance(v, str) else str(v))
            for k, v in row.items()
        }
        try:
            storage.check_url(str(raw_path))
        except ValueError as exc:
            raise ManifestError(location, f"{where}: {exc}") from None
        found = locate(str(raw_path), _folder_of(location))
        refused = reach.refusal(location, found.path, reference, reference_root)
        if refused is not None:
            shown = storable(found.path)
            found = Source(shown, problem=InputError("bad_path", shown, refused))
        yield replace(
            found,
            language=language,
            channels=channels,
            metadata=metadata,
            storage_options=options,
            reference=reference,
            origin=f"{name}: {where}",
        )


def _listed_location(folder: str, listed: str) -> str:
    """A path a list file names (a ``reference_path``), absolute like its ``path`` column."""
    return locate(listed, folder).path


def expand_sources(loaded: LoadedManifest) -> list[Source]:
    """Every input file, globs sorted; the same real file asked for twice with the same
    effective options is kept once. Raises `ManifestError` for a glob or list that matches
    nothing (unless the entry says ``allow_empty: true``) and for unreadable list files."""
    base = str(loaded.base_dir)
    sources: list[Source] = []
    for index, entry in enumerate(loaded.manifest.inputs):
        found: list[Source] = []
        if isinstance(entry, GlobInput):
            found = [
                replace(locate(m, base), language=entry.language, channels=entry.channels,
                        storage_options=entry.storage_options)
                for m in _not_own_files(_glob(entry.glob, base, entry.storage_options), loaded)
            ]  # fmt: skip
            what = f"glob {entry.glob!r} matched no files"
        elif isinstance(entry, PathInput):
            found = [
                replace(locate(entry.path, base), language=entry.language, channels=entry.channels,
                        storage_options=entry.storage_options)
            ]  # fmt: skip
            what = ""
        elif isinstance(entry, ListInput):
            location = locate(entry.list, base).path
            root = entry.reference_root
            found = list(_sources_from_list(location, entry, root and locate(root, base).path))
            what = f"list {entry.list!r} has no rows"
        if not found and not getattr(entry, "allow_empty", False):
            raise ManifestError(
                loaded.path,
                f"inputs.{index}: {what}; fix the entry, or add allow_empty: true to it "
                "if an empty match is expected",
            )
        if not found:
            logger.info("inputs.%d: %s (allow_empty)", index, what)
        sources.extend(found)
    _check_storage_clients(sources)
    if loaded.manifest.run.identity == "content":
        sources = [_by_content(source) for source in sources]
    return _unique(sources, loaded)


def _by_content(source: Source) -> Source:
    """``source`` known by a digest of its bytes; a file that cannot be read fails as
    its probe would have (no path-based id is made for it: that would bill it twice)."""
    if source.problem is not None:
        return source
    try:
        return replace(source, content=identity.digest(source.path, source.storage_options))
    except InputError as unreadable:
        return replace(source, problem=unreadable)


def _glob(pattern: str, base: str, options: dict[str, Any]) -> list[str]:
    if storage.is_url(pattern):
        return storage.glob(pattern, options)
    return [str(path) for path in walk_glob(Path(base) / pattern)]


def _not_own_files(matches: list[str], loaded: LoadedManifest) -> list[str]:
    """Leave out the manifest and everything under the job's own output folder: a glob
    over the folder that holds them (``**/*``) must not take last night's reports, tables
    and locks for recordings, failing more of them every run."""
    local_output = loaded.output_location == str(loaded.output_dir)
    own = (str(loaded.output_dir),) if local_output else ()
    manifest = os.path.join(loaded.base_dir, loaded.path.name)
    kept = [
        m
        for m in matches
        if storage.is_url(m)
        or not (os.path.abspath(m) == manifest or _under(os.path.abspath(m), own))
    ]
    if len(kept) < len(matches):
        logger.info("glob: left out %d file(s) of the job itself", len(matches) - len(kept))
    return kept


def _under(path: str, folders: tuple[str, ...]) -> bool:
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


def _check_storage_clients(sources: Iterable[Source]) -> None:
    """Set up each URL scheme's client once before probing: a configuration problem (no
    account name, a bad option) stops planning with one message, not one per item."""
    checked: set[tuple[str | None, str]] = set()
    for source in sources:
        if not storage.is_url(source.path):
            continue
        key = (storage.scheme(source.path), json.dumps(source.storage_options, sort_keys=True))
        if key not in checked:
            checked.add(key)
            storage.check_reachable(source.path, source.storage_options)


def _unique(sources: list[Source], loaded: LoadedManifest) -> list[Source]:
    """Drop exact repeats early (so a file is probed once); `make_items` drops the rest of
    the items equal in effect by their ids."""
    pulse, run = loaded.manifest.pulse, loaded.manifest.run
    first: dict[tuple[str, str, ChannelSpec], Source] = {}
    unique = []
    for source in sources:
        effective = (source.language or pulse.language, _spec(source, run.channels))
        key = (source.identity, *effective)
        kept = first.get(key)
        if kept is None:
            first[key] = source
            unique.append(source)
        elif (kept.metadata, kept.reference) != (source.metadata, source.reference):
            logger.warning("%s", differing_rows(kept, source))
        else:
            logger.info("%s is listed more than once with the same options: kept once", source.path)
    return unique


def differing_rows(kept: Source, dropped: Source) -> str:
    """The warning for one file listed twice (same options) with other metadata or
    reference: both rows, and which one the item keeps. Pure."""

    def row(source: Source) -> str:
        reference = " and a reference" if source.reference is not None else ""
        return f"{source.origin or 'inputs'} ({quoted(source.metadata)}{reference})"

    return (
        f"{dropped.path} is listed twice with different metadata: {row(kept)} and "
        f"{row(dropped)}; one item is made, with the first row's; remove or merge the other"
    )


def _spec(source: Source, default: ChannelSpec) -> ChannelSpec:
    return source.channels if source.channels is not None else default


Prober = Callable[[str, int | None, storage.StorageOptions], ProbeInfo]


def make_items(
    sources: Iterable[Source],
    loaded: LoadedManifest,
    prober: Prober = probe,
    done: frozenset[str] = frozenset(),
    wanted: Callable[[str], bool] | None = None,
) -> list[Item]:
    """Items for every source, probing each once; bad files become failed items. Items
    equal in effect (same real file, channel and resolved options: the same ``item_id``)
    are one item, the first listed.

    Sources whose id is in ``done`` (already ok) are not probed: a nightly rerun over a
    growing archive costs one probe per new file, not per file. Only items whose id
    ``wanted`` accepts are returned (a shard's slice); when the id is known before probing
    (every ``channels`` choice but split), the others are not probed either.
    """
    manifest = loaded.manifest
    items: dict[str, Item] = {}

    def add(item: Item) -> None:
        if item.item_id in items:
            logger.info(
                "%s%s is listed more than once with options equal in effect: kept once",
                item.source,
                "" if item.channel is None else f" channel {item.channel}",
            )
            return
        items[item.item_id] = item

    for source in sources:
        options = manifest.pulse.options(source.language)
        spec = _spec(source, manifest.run.channels)
        shown = storable(source.path)
        reference = source.reference
        if reference is not None and spec == "split":
            # One reference holds both sides of a call: scoring each channel against it
            # would be meaningless. List one row per channel (channels: 0, 1) instead.
            logger.warning("%s: a reference is not scored under channels: split", shown)
            reference = None
        base = Item(
            "",
            shown,
            None,
            None,
            options,
            source.metadata,
            open_path=source.path if shown != source.path else None,
            storage_options=source.storage_options,
            reference=reference,
        )
        if spec != "split":  # the id does not depend on the file's channel count
            channel = None if spec == "mix" else int(spec)
            known = item_id(source.identity, channel, options)
            if wanted is not None and not wanted(known):
                continue
            if known in done:
                add(replace(base, item_id=known, channel=channel))
                continue
        try:
            if source.problem is not None:
                raise source.problem
            info = _probe(prober, source, manifest.run.stream_index)
        except InputError as unusable:
            channel = _channel_list(spec, None)[0]
            ident = item_id(source.identity, channel, options)
            add(replace(base, item_id=ident, channel=channel, error=unusable))
            continue
        for channel in _channel_list(spec, info):
            problem = None
            if channel is not None and channel >= info.channels:
                problem = InputError(
                    "no_audio", shown, f"has {info.channels} channel(s); channel {channel} asked"
                )
            name = _channel_name(manifest.run.channel_names, channel, info.channels)
            add(
                replace(
                    base,
                    item_id=item_id(source.identity, channel, options),
                    channel=channel,
                    channel_name=name,
                    duration_s=info.duration_s,
                    error=problem,
                )
            )
    kept = list(items.values())
    return kept if wanted is None else [i for i in kept if wanted(i.item_id)]


# A probe that the store behind a URL failed for now (`InputUnavailable`, retryable in the
# error tree) is tried this many times, a growing pause apart, before the item is planned as
# failed (`read_error`; a rerun tries again).
_PROBES = RetryPolicy(3, Backoff(0.5, 2.0))


def _probing_again(error: BaseException, attempt: int, delay_s: float) -> None:
    logger.info("%s; probing it again", error)


def _probe(prober: Prober, source: Source, stream_index: int | None) -> ProbeInfo:
    """``prober`` on ``source``, again while the store fails for now. Raises `InputError`."""
    return _PROBES.call(
        lambda: prober(source.path, stream_index, source.storage_options),
        on_retry=_probing_again,
    )


def _channel_list(spec: ChannelSpec, info: ProbeInfo | None) -> list[int | None]:
    if spec == "mix":
        return [None]
    if spec == "split":
        return list(range(max(1, info.channels))) if info is not None else [0]
    return [int(spec)]


def _channel_name(names: ChannelNames | None, channel: int | None, channels: int) -> str | None:
    """The name of ``channel`` of a file with ``channels`` channels. A list names the
    channels of files with two or more; a mono file is named only by a mapping's ``mono``."""
    if names is None or channel is None:
        return None
    if channels == 1:
        return names.get("mono") if isinstance(names, dict) else None
    if isinstance(names, dict):
        return names.get(channel)
    return names[channel] if channel < len(names) else None


def longest_first(items: Iterable[Item]) -> list[Item]:
    """Longest recordings start first, so no long file starts last and holds the job up.
    Items already known bad come before all (they cost nothing and report at once)."""
    return sorted(items, key=lambda item: (item.error is None, -(item.duration_s or 0.0)))
