"""Plan a job: expand inputs into items with stable ids, and order the work.

`expand_sources` is file-system I/O (globs, list files; URLs through `batch.storage`);
`make_items` and `item_id` are pure. An explicit path that does not exist is not a crash: it
becomes an item that fails with ``not_found`` without opening a session.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from batch import storage
from batch.decode import ProbeInfo, probe
from batch.errors import InputError, ManifestError
from batch.manifest import GlobInput, ListInput, LoadedManifest, PathInput
from batch.pulse.protocol import LANGUAGES, PulseOptions

logger = logging.getLogger(__name__)

ChannelSpec = str | int  # "mix", "split" or a channel index


@dataclass(frozen=True)
class Source:
    """One input file as the manifest names it, with per-item overrides.

    ``path`` is an absolute local path or a URL exactly as listed."""

    path: str
    language: str | None = None
    channels: ChannelSpec | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """One unit of transcription: a file, or one channel of it, with fixed options."""

    item_id: str
    source: str
    channel: int | None  # None: all channels mixed down
    channel_name: str | None
    options: PulseOptions
    metadata: dict[str, str] = field(default_factory=dict)
    duration_s: float | None = None  # from the container; exact duration comes from decoding
    error: InputError | None = None  # known bad before any session is opened
    # Non-secret fsspec settings for a URL source; never part of the id (they say how to
    # reach the file, not which file it is).
    storage_options: dict[str, Any] = field(default_factory=dict)


def item_id(source: str, channel: int | None, options: PulseOptions) -> str:
    """Same source, channel and options: same id, run after run and machine after machine."""
    identity = {"source": source, "channel": channel, "options": asdict(options)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode())
    return digest.hexdigest()[:20]


def _list_lines(location: str, options: storage.StorageOptions) -> io.StringIO:
    """The list file's lines, local or at a URL. Raises `ManifestError`."""
    if storage.is_url(location):
        data = storage.read_bytes(location, options)
    else:
        list_path = Path(location)
        if not list_path.exists():
            raise ManifestError(list_path, "list file not found")
        data = list_path.read_bytes()
    try:
        return io.StringIO(data.decode("utf-8"), newline="")
    except UnicodeDecodeError:
        raise ManifestError(location, "list file is not UTF-8 text") from None


def _read_list(location: str, options: storage.StorageOptions) -> Iterator[dict[str, Any]]:
    lines = _list_lines(location, options)
    name = urlsplit(location).path if storage.is_url(location) else location
    if Path(name).suffix.lower() in (".jsonl", ".ndjson"):
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(location, f"line {number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ManifestError(location, f"line {number}: expected a JSON object")
            yield {"__line__": number, **row}
    else:
        for number, row in enumerate(csv.DictReader(lines), start=2):
            yield {"__line__": number, **row}


def _channels_value(raw: Any, where: str, list_path: str) -> ChannelSpec | None:
    if raw is None or raw == "":
        return None
    text = str(raw).strip()
    if text in ("mix", "split"):
        return text
    if text.isdigit():
        return int(text)
    raise ManifestError(list_path, f"{where}: channels must be mix, split or a channel index")


def _sources_from_list(location: str, options: dict[str, Any]) -> Iterator[Source]:
    for row in _read_list(location, options):
        where = f"line {row.pop('__line__')}"
        raw_path = row.pop("path", None)
        if not raw_path:
            raise ManifestError(location, f"{where}: needs a non-empty 'path' column")
        language = row.pop("language", None) or None
        if language is not None and language not in LANGUAGES:
            raise ManifestError(location, f"{where}: language {language!r} is not supported")
        channels = _channels_value(row.pop("channels", None), where, location)
        metadata = {str(k): "" if v is None else str(v) for k, v in row.items()}
        try:
            storage.check_url(str(raw_path))
        except ValueError as exc:
            raise ManifestError(location, f"{where}: {exc}") from None
        yield Source(
            path=_resolve(str(raw_path), _folder_of(location)),
            language=language,
            channels=channels,
            metadata=metadata,
            storage_options=options,
        )


def _folder_of(location: str) -> str:
    """The folder a list file's relative paths resolve against: a local path or a URL
    ending in ``/``."""
    if storage.is_url(location):
        return location[: location.rfind("/") + 1]
    return str(Path(location).parent)


def _resolve(listed: str, folder: str) -> str:
    """A listed path as its absolute location: URLs as listed, local paths resolved against
    ``folder`` (the manifest's, or the list file's, local or a URL)."""
    if storage.is_url(listed):
        return listed
    if storage.is_url(folder):
        return storage.join(folder, listed)
    path = Path(listed)
    return str((path if path.is_absolute() else Path(folder) / path).resolve())


def expand_sources(loaded: LoadedManifest) -> list[Source]:
    """Every input file, globs sorted, duplicates (same resolved path or same URL) dropped.

    Raises `ManifestError` for a list file that cannot be read, a URL glob that cannot be
    listed, or a storage client that cannot be set up.
    """
    base = str(loaded.base_dir)
    sources: list[Source] = []
    for entry in loaded.manifest.inputs:
        if isinstance(entry, GlobInput):
            matches = _glob(entry.glob, base, entry.storage_options)
            if not matches:
                logger.warning("glob %r matched no files", entry.glob)
            sources.extend(
                Source(m, entry.language, entry.channels, storage_options=entry.storage_options)
                for m in matches
            )
        elif isinstance(entry, PathInput):
            resolved = _resolve(entry.path, base)
            sources.append(
                Source(
                    resolved, entry.language, entry.channels, storage_options=entry.storage_options
                )
            )
        elif isinstance(entry, ListInput):
            location = _resolve(entry.list, base)
            sources.extend(_sources_from_list(location, entry.storage_options))
    _check_storage_clients(sources)
    # The same file asked for twice with the same options is one item; with a different
    # language or channel choice it is different work, and stays.
    seen: set[tuple[str, str | None, ChannelSpec | None]] = set()
    unique = []
    for source in sources:
        key = (source.path, source.language, source.channels)
        if key in seen:
            logger.info("%s is listed more than once with the same options: kept once", source.path)
            continue
        seen.add(key)
        unique.append(source)
    return unique


def _glob(pattern: str, base: str, options: dict[str, Any]) -> list[str]:
    if storage.is_url(pattern):
        return storage.glob(pattern, options)
    full = pattern if Path(pattern).is_absolute() else str(Path(base) / pattern)
    matches = (Path(p) for p in glob.glob(full, recursive=True))
    return sorted(str(p.resolve()) for p in matches if p.is_file())


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


Prober = Callable[[str, int | None, storage.StorageOptions], ProbeInfo]


def make_items(
    sources: Iterable[Source],
    loaded: LoadedManifest,
    prober: Prober = probe,
    done: frozenset[str] = frozenset(),
    wanted: Callable[[str], bool] | None = None,
) -> list[Item]:
    """Items for every source, probing each once; bad files become failed items.

    Sources whose id is in ``done`` (already ok) are not probed: a nightly rerun over a
    growing archive costs one probe per new file, not per file. Only items whose id
    ``wanted`` accepts are returned (a shard's slice); when the id is known before probing
    (every ``channels`` choice but split), the others are not probed either.
    """
    manifest = loaded.manifest
    items: list[Item] = []
    for source in sources:
        options = manifest.pulse.options(source.language)
        spec = source.channels if source.channels is not None else manifest.run.channels
        path = source.path
        if spec != "split":  # the id does not depend on the file's channel count
            channel = None if spec == "mix" else int(spec)
            known = item_id(path, channel, options)
            if wanted is not None and not wanted(known):
                continue
            if known in done:
                items.append(
                    Item(
                        known,
                        path,
                        channel,
                        None,
                        options,
                        source.metadata,
                        storage_options=source.storage_options,
                    )
                )
                continue
        try:
            info = prober(path, manifest.run.stream_index, source.storage_options)
        except InputError as unusable:
            channel = _channel_list(spec, None)[0]
            items.append(
                Item(
                    item_id(path, channel, options),
                    path,
                    channel,
                    None,
                    options,
                    source.metadata,
                    None,
                    unusable,
                    storage_options=source.storage_options,
                )
            )
            continue
        for channel in _channel_list(spec, info):
            problem = None
            if channel is not None and channel >= info.channels:
                problem = InputError(
                    "no_audio", path, f"has {info.channels} channel(s); channel {channel} asked"
                )
            items.append(
                Item(
                    item_id=item_id(path, channel, options),
                    source=path,
                    channel=channel,
                    channel_name=_channel_name(manifest.run.channel_names, channel),
                    options=options,
                    metadata=source.metadata,
                    duration_s=info.duration_s,
                    error=problem,
                    storage_options=source.storage_options,
                )
            )
    return items if wanted is None else [i for i in items if wanted(i.item_id)]


def _channel_list(spec: ChannelSpec, info: ProbeInfo | None) -> list[int | None]:
    if spec == "mix":
        return [None]
    if spec == "split":
        return list(range(max(1, info.channels))) if info is not None else [0]
    return [int(spec)]


def _channel_name(names: list[str] | None, channel: int | None) -> str | None:
    if names is None or channel is None or channel >= len(names):
        return None
    return names[channel]


def longest_first(items: Iterable[Item]) -> list[Item]:
    """Longest recordings start first, so no long file starts last and holds the job up.
    Items already known bad come before all (they cost nothing and report at once)."""
    return sorted(items, key=lambda item: (item.error is None, -(item.duration_s or 0.0)))
