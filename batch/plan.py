"""Plan a job: expand inputs into items with stable ids, and order the work.

`expand_sources` is file-system I/O (globs, list files); `make_items` and `item_id` are
pure. An explicit path that does not exist is not a crash: it becomes an item that fails
with ``not_found`` without opening a session.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from batch.decode import ProbeInfo, probe
from batch.errors import InputError, ManifestError
from batch.manifest import GlobInput, ListInput, LoadedManifest, PathInput
from batch.pulse.protocol import LANGUAGES, PulseOptions
from batch.score import Reference, reference_of

logger = logging.getLogger(__name__)

ChannelSpec = str | int  # "mix", "split" or a channel index


@dataclass(frozen=True)
class Source:
    """One input file as the manifest names it, with per-item overrides."""

    path: Path
    language: str | None = None
    channels: ChannelSpec | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    reference: Reference | None = None  # the true transcript, for WER/CER


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
    reference: Reference | None = None  # the true transcript, for WER/CER


def item_id(source: str, channel: int | None, options: PulseOptions) -> str:
    """Same source, channel and options: same id, run after run and machine after machine."""
    identity = {"source": source, "channel": channel, "options": asdict(options)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode())
    return digest.hexdigest()[:20]


def _read_list(list_path: Path) -> Iterator[dict[str, Any]]:
    if not list_path.exists():
        raise ManifestError(list_path, "list file not found")
    with list_path.open(encoding="utf-8", newline="") as handle:
        if list_path.suffix.lower() in (".jsonl", ".ndjson"):
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ManifestError(list_path, f"line {number}: not JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ManifestError(list_path, f"line {number}: expected a JSON object")
                yield {"__line__": number, **row}
        else:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                yield {"__line__": number, **row}


def read_list_rows(list_path: Path) -> Iterator[dict[str, Any]]:
    """A list file's rows as dicts (``__line__`` holds the line number), for other readers
    of list files (`pulse-batch score`)."""
    return _read_list(list_path)


def _channels_value(raw: Any, where: str, list_path: Path) -> ChannelSpec | None:
    if raw is None or raw == "":
        return None
    text = str(raw).strip()
    if text in ("mix", "split"):
        return text
    if text.isdigit():
        return int(text)
    raise ManifestError(list_path, f"{where}: channels must be mix, split or a channel index")


def _sources_from_list(list_path: Path) -> Iterator[Source]:
    for row in _read_list(list_path):
        where = f"line {row.pop('__line__')}"
        raw_path = row.pop("path", None)
        if not raw_path:
            raise ManifestError(list_path, f"{where}: needs a non-empty 'path' column")
        language = row.pop("language", None) or None
        if language is not None and language not in LANGUAGES:
            raise ManifestError(list_path, f"{where}: language {language!r} is not supported")
        channels = _channels_value(row.pop("channels", None), where, list_path)
        reference = reference_of(row, list_path.parent)
        row.pop("reference", None)
        row.pop("reference_path", None)
        metadata = {str(k): "" if v is None else str(v) for k, v in row.items()}
        path = Path(str(raw_path))
        yield Source(
            path=path if path.is_absolute() else list_path.parent / path,
            language=language,
            channels=channels,
            metadata=metadata,
            reference=reference,
        )


def expand_sources(loaded: LoadedManifest) -> list[Source]:
    """Every input file, globs sorted, duplicates (same resolved path) dropped."""
    base = loaded.base_dir
    sources: list[Source] = []
    for entry in loaded.manifest.inputs:
        if isinstance(entry, GlobInput):
            pattern = str(base / entry.glob) if not Path(entry.glob).is_absolute() else entry.glob
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matches:
                logger.warning("glob %r matched no files", entry.glob)
            sources.extend(Source(Path(m), entry.language, entry.channels) for m in matches)
        elif isinstance(entry, PathInput):
            path = Path(entry.path)
            resolved = path if path.is_absolute() else base / path
            sources.append(Source(resolved, entry.language, entry.channels))
        elif isinstance(entry, ListInput):
            sources.extend(_sources_from_list(base / entry.list))
    # The same file asked for twice with the same options is one item; with a different
    # language or channel choice it is different work, and stays.
    seen: set[tuple[Path, str | None, ChannelSpec | None]] = set()
    unique = []
    for source in sources:
        path = source.path.resolve()
        key = (path, source.language, source.channels)
        if key in seen:
            logger.info("%s is listed more than once with the same options: kept once", path)
            continue
        seen.add(key)
        unique.append(replace(source, path=path))
    return unique


Prober = Callable[[Path, int | None], ProbeInfo]


def make_items(
    sources: Iterable[Source],
    loaded: LoadedManifest,
    prober: Prober = probe,
    done: frozenset[str] = frozenset(),
) -> list[Item]:
    """Items for every source, probing each once; bad files become failed items.

    Sources whose id is in ``done`` (already ok) are not probed: a nightly rerun over a
    growing archive costs one probe per new file, not per file.
    """
    manifest = loaded.manifest
    items: list[Item] = []
    for source in sources:
        options = manifest.pulse.options(source.language)
        spec = source.channels if source.channels is not None else manifest.run.channels
        path = str(source.path)
        ref = source.reference
        if ref is not None and spec == "split":
            # One reference holds both sides of a call: scoring each channel against it
            # would be meaningless. List one row per channel (channels: 0, 1) instead.
            logger.warning("%s: a reference is not scored under channels: split", path)
            ref = None
        if spec != "split":  # the id does not depend on the file's channel count
            channel = None if spec == "mix" else int(spec)
            known = item_id(path, channel, options)
            if known in done:
                items.append(
                    Item(known, path, channel, None, options, source.metadata, reference=ref)
                )
                continue
        try:
            info = prober(source.path, manifest.run.stream_index)
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
                    ref,
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
                    reference=ref,
                )
            )
    return items


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
