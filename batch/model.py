"""The model every stage shares: sources, items, references and an item's rows.

Plain dataclasses and one pure function, on the ground floor: this module imports nothing
of ours but `batch.errors` and `batch.pulse.protocol`, so plan, collect, score, export and
the output can all depend on it without depending on each other.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from batch.errors import InputError
from batch.pulse.protocol import PulseOptions

ChannelSpec = str | int  # "mix", "split" or a channel index


class ItemStatus(StrEnum):
    """An item's result in the tables' ``status`` column."""

    OK = "ok"
    FAILED = "failed"


class RunStatus(StrEnum):
    """How a run ended, in its report's ``status`` (``running`` until it ends)."""

    RUNNING = "running"
    COMPLETED = "completed"
    INTERRUPTED = "interrupted"  # SIGINT / SIGTERM
    ABORTED = "aborted"  # a fatal answer, or the service refusing or unreachable
    CAPPED = "capped"  # the spend cap was reached
    FAILED_OUTPUT = "failed_output"  # the output could not be written


@dataclass(frozen=True)
class Reference:
    """The true transcript of an item: given inline, or as a text file to read."""

    text: str | None = None
    path: str | None = None


@dataclass(frozen=True)
class Source:
    """One input file as the manifest names it, with per-item overrides.

    ``path`` is the path as listed (made absolute against the manifest's or list file's
    folder, symlinks not followed), or a URL as listed: what the tables' ``source`` column
    holds. ``resolved`` is the real file behind a local path, what the stable ``item_id``
    hashes (None for URLs, or when it cannot be resolved). ``problem`` is set when the path
    itself is unusable.
    """

    path: str
    language: str | None = None
    channels: ChannelSpec | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    resolved: str | None = None
    problem: InputError | None = None
    reference: Reference | None = None  # the true transcript, for WER/CER
    content: str | None = None  # a digest of the bytes, with run.identity: content
    origin: str | None = None  # where a list file names it ("calls.csv: line 3"), for messages

    @property
    def identity(self) -> str:
        return self.content or self.resolved or self.path


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
    # Where to open the file when ``source`` (text fit to store) cannot name it byte for
    # byte: a file name that is not valid UTF-8.
    open_path: str | None = None
    # Non-secret fsspec settings for a URL source; never part of the id (they say how to
    # reach the file, not which file it is).
    storage_options: dict[str, Any] = field(default_factory=dict)
    reference: Reference | None = None  # the true transcript, for WER/CER


def item_id(source: str, channel: int | None, options: PulseOptions) -> str:
    """Same source, channel and options: same id, run after run and machine after machine."""
    identity = {"source": source, "channel": channel, "options": asdict(options)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode())
    return digest.hexdigest()[:20]


@dataclass
class ItemRows:
    """One finished item's rows for each table (partition and bookkeeping columns included)."""

    transcript: dict[str, Any]
    words: list[dict[str, Any]] = field(default_factory=list)
    utterances: list[dict[str, Any]] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)

    def by_table(self) -> dict[str, list[dict[str, Any]]]:
        """Rows keyed by table name (the names of `batch.output.schema.COLUMNS`)."""
        return {
            "transcripts": [self.transcript],
            "segments": self.segments,
            "words": self.words,
            "utterances": self.utterances,
        }

    @property
    def item_id(self) -> str:
        return str(self.transcript["item_id"])

    @property
    def ok(self) -> bool:
        return bool(self.transcript.get("status") == ItemStatus.OK)
