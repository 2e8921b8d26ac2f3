"""Job manifests, version 1: strict validation at the edge, typed models inside.

`load_manifest` is the only entry point; every problem becomes a `ManifestError` naming the
file, the key path and what is allowed.
"""

from __future__ import annotations

import builtins
import dataclasses
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from batch import storage
from batch.errors import ManifestError, clip, quoted
from batch.lists import read_text
from batch.manifest_errors import describe
from batch.pulse import protocol
from batch.pulse.protocol import PulseOptions


def _one_of(allowed: tuple[Any, ...], what: str) -> Any:
    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(
                f"{quoted(value)} is not a supported {what}; use one of {list(allowed)}"
            )
        return value

    return check


# The protocol module holds the allowed values; the manifest only points at them.
Language = Annotated[str, AfterValidator(_one_of(protocol.LANGUAGES, "language"))]
Encoding = Annotated[str, AfterValidator(_one_of(protocol.ENCODINGS, "encoding"))]
SampleRate = Annotated[int, AfterValidator(_one_of(protocol.SAMPLE_RATES, "sample rate"))]
Channels = Literal["mix", "split"] | Annotated[int, Field(ge=0)]
PartitionColumn = Literal["job", "date", "language"]
# [agent, customer] names channels 0, 1, ... of files with two or more channels; a mapping
# may also say what a mono file's one channel is: {0: agent, 1: customer, mono: caller}.
ChannelNames = list[str] | dict[int | Literal["mono"], str]


class _Strict(BaseModel):
    # strict: "4" is not a number and true is not 1; no infinities or NaNs either.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _url_for_listing(value: str) -> str:
    storage.check_url(value, glob=True)
    return value


def _url_for_reading(value: str) -> str:
    if not value.strip():
        # An empty path would resolve to the manifest's own folder.
        raise ValueError("is empty; give a file path or URL")
    storage.check_url(value)
    return value


def _no_secrets(value: dict[str, Any]) -> dict[str, Any]:
    storage.check_storage_options(value)
    return value


# A local path or a URL the installed extras can read (checked here, before any I/O).
GlobPattern = Annotated[str, AfterValidator(_url_for_listing)]
Location = Annotated[str, AfterValidator(_url_for_reading)]
# Non-secret fsspec settings for URL inputs (region, anon, requester_pays, ...).
StorageOptions = Annotated[dict[str, Any], AfterValidator(_no_secrets)]


class GlobInput(_Strict):
    glob: GlobPattern
    language: Language | None = None
    channels: Channels | None = None
    storage_options: StorageOptions = {}
    # Matching nothing is an error (a typo in a nightly job must not go green) unless this.
    allow_empty: bool = False


class PathInput(_Strict):
    path: Location
    language: Language | None = None
    channels: Channels | None = None
    storage_options: StorageOptions = {}


class ListInput(_Strict):
    list: Location
    # For the list file, when it is a URL, and for every URL it lists.
    storage_options: StorageOptions = {}
    allow_empty: bool = False
    # Where else reference_path may point (a folder or URL prefix); by default references
    # are read only from under the list's own folder (for a list at a URL: its store).
    reference_root: Location | None = None
    # Columns kept as metadata although named like a column the runner reads (`channel`).
    metadata_columns: builtins.list[str] = []  # `list` is the field above


def _input_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((kind for kind in ("glob", "path", "list") if kind in value), None)
    return next((kind for kind in ("glob", "path", "list") if hasattr(value, kind)), None)


# Each entry is told apart by its key, so errors speak of the kind of entry it is.
Input = Annotated[
    Annotated[GlobInput, Tag("glob")]
    | Annotated[PathInput, Tag("path")]
    | Annotated[ListInput, Tag("list")],
    Discriminator(
        _input_kind,
        custom_error_type="input_kind",
        custom_error_message="each input needs one of the keys glob, path or list",
    ),
]


# Query parameter names as the service spells them; never anything key-like.
_PARAM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_SECRET_LIKE = re.compile(r"key|token|secret|auth|password|bearer", re.IGNORECASE)


def _no_credentials_in(endpoint: str) -> None:
    """Refuse a user, password or key-like query parameter in the endpoint URL: the URL is
    written to reports and logs, and the key travels only in the Authorization header.
    The message never repeats the URL (it would repeat the secret)."""
    parts = urlsplit(endpoint)
    if "@" in parts.netloc:
        raise ValueError(
            "holds credentials (user:password@ before the host), which would be written to "
            "reports and logs; remove them: the API key comes from the environment variable "
            "named by pulse.api_key_env"
        )
    secret = [
        k for k, _ in parse_qsl(parts.query, keep_blank_values=True) if _SECRET_LIKE.search(k)
    ]
    if secret:
        raise ValueError(
            f"has a query parameter that looks like a credential ({quoted(secret[0], 40)}); "
            "remove it: the API key comes from the environment variable named by "
            "pulse.api_key_env and travels only in the Authorization header"
        )


class PulseConfig(_Strict):
    endpoint: str = protocol.DEFAULT_URL
    # Which endpoint generation to speak: auto (by the URL's path) or forced.
    protocol: Literal["auto", "legacy", "unified", "current"] = "auto"
    api_key_env: str = "SMALLEST_API_KEY"
    # Which recognizer `endpoint: local` runs: the real offline model or the cheap one.
    local_engine: Literal["whisper", "synthetic", "synthetic-multilingual"] = "whisper"
    language: Language = "en"
    encoding: Encoding = "linear16"
    sample_rate: SampleRate = 16000
    word_timestamps: bool = True
    full_transcript: bool = False
    sentence_timestamps: bool = False
    redact_pii: bool = False
    redact_pci: bool = False
    numerals: Literal["true", "false", "auto"] = "auto"
    keywords: list[str] = []
    diarize: bool = False
    # More query parameters, passed through as given (strings): vad_events, punctuate, ...
    extra_params: dict[str, str] = {}

    @field_validator("numerals", mode="before")
    @classmethod
    def _numerals_text(cls, value: Any) -> Any:
        # YAML reads `numerals: true` as a boolean; the protocol wants the word.
        return str(value).lower() if isinstance(value, bool) else value

    @field_validator("keywords")
    @classmethod
    def _keywords_shape(cls, value: list[str]) -> list[str]:
        try:
            return [protocol.validate_keyword(k) for k in value]
        except protocol.ParamError as exc:
            raise ValueError(str(exc).split(": ", 1)[1]) from None

    @field_validator("endpoint")
    @classmethod
    def _endpoint_shape(cls, value: str) -> str:
        if value != "local" and not value.startswith(("ws://", "wss://")):
            raise ValueError("must be 'local' or a ws:// or wss:// URL")
        _no_credentials_in(value)
        return value

    @field_validator("extra_params")
    @classmethod
    def _extra_params_shape(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _PARAM_NAME.match(name):
                raise ValueError(f"{name!r} is not a query parameter name (a-z, 0-9, _)")
            if name in protocol.NAMED_OPTIONS:
                raise ValueError(
                    f"{name!r} is a named option: set pulse.{name} instead"
                    if name != "model"
                    else "'model' is chosen by the endpoint's protocol generation"
                )
            if _SECRET_LIKE.search(name):
                raise ValueError(
                    f"{name!r} looks like a credential; the API key travels only in the "
                    "Authorization header (pulse.api_key_env)"
                )
        return value

    @model_validator(mode="after")
    def _known_path(self) -> PulseConfig:
        if self.endpoint != "local" and self.protocol == "auto":
            try:
                protocol.generation_for(self.endpoint)
            except protocol.UnknownEndpointPath as exc:
                raise ValueError(f"endpoint: {exc}") from None
        return self

    @model_validator(mode="after")
    def _opus_rate(self) -> PulseConfig:
        if self.encoding in protocol.OPUS_ENCODINGS:
            rates = [r for r in protocol.SAMPLE_RATES if r in protocol.OPUS_SAMPLE_RATES]
            if self.sample_rate not in rates:
                rate = self.sample_rate
                raise ValueError(f"sample_rate {rate} cannot carry {self.encoding}; use {rates}")
        return self

    def options(self, language: str | None = None) -> PulseOptions:
        """The session options, field for field (an option added to the protocol's
        PulseOptions and to this model flows through without another copy)."""
        names = {f.name for f in dataclasses.fields(protocol.PulseOptions)} - {"extra"}
        values = self.model_dump(include=names)
        values.update(language=language or self.language, keywords=tuple(self.keywords))
        values.update(extra=dict(sorted(self.extra_params.items())))
        return protocol.PulseOptions(**values)


class RunConfig(_Strict):
    concurrency: int = Field(4, ge=1, le=1024)
    pace: float = Field(1.0, ge=0)
    max_attempts: int = Field(5, ge=1, le=100)
    # longest_first keeps a long recording from starting last and holding the job up.
    order: Literal["longest_first", "listing"] = "longest_first"
    channels: Channels = "mix"
    channel_names: ChannelNames | None = None
    stream_index: int | None = Field(None, ge=0)
    chunk_bytes: int = Field(4096, ge=64, le=1 << 20)
    chunk_ms: int | None = Field(None, ge=10, le=5000)
    connect_timeout_s: float = Field(10.0, gt=0)
    # Each message after the end signal must arrive within this.
    final_timeout_s: float = Field(30.0, gt=0)
    # Each send must be taken by the service within this (a peer that stopped reading).
    write_timeout_s: float = Field(30.0, gt=0)
    # What one session's service may send, per second of audio sent (batch.pulse.bounds).
    max_reply_chars_per_audio_s: float = Field(20_000.0, gt=0)
    max_replies_per_audio_s: float = Field(50.0, gt=0)
    # Session deadline = audio/pace x factor + slack (audio/1 when unpaced).
    session_deadline_factor: float = Field(1.5, ge=1)
    session_deadline_slack_s: float = Field(60.0, ge=0)
    backoff_initial_s: float = Field(0.5, ge=0)
    # Also caps a Retry-After: a service asking for days waits this long.
    backoff_max_s: float = Field(30.0, ge=0)
    stall_after_speech_s: float = Field(15.0, ge=0)  # fed unanswered: stalled (0: off)
    # The service refused this many sessions in a row with none of ours open: stop (exit 6).
    max_refusals_in_a_row: int = Field(30, ge=1)
    job_deadline_s: float | None = Field(None, gt=0)
    # Long recordings are cut at quiet points into pieces streamed on parallel sessions.
    split_long_files: bool = False
    split_threshold_s: float = Field(600.0, ge=10)
    piece_target_s: float = Field(300.0, ge=5)
    split_window_s: float = Field(15.0, gt=0)
    # Stream only the speech a voice-activity detector finds (padded), pauses shortened.
    skip_silence: bool = False
    # Short whole files with the same options share a session, ``finalize`` between them,
    # on the endpoints that have it (batch.reuse); false: one session per file.
    reuse_sessions: bool = True
    skip_silence_pad_s: float = Field(0.3, ge=0, le=5)
    skip_silence_gap_s: float = Field(0.5, gt=0, le=10)
    # What makes an item the same one run after run: its path, or its bytes (a recording
    # moved inside the glob is not billed again; each file is read once more per run).
    identity: Literal["path", "content"] = "path"
    # No new session starts once it could take the run's billed audio past this.
    max_billed_minutes: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if {"chunk_bytes", "chunk_ms"} <= self.model_fields_set:
            raise ValueError("give chunk_bytes or chunk_ms, not both")
        if self.split_long_files and self.piece_target_s >= self.split_threshold_s:
            raise ValueError("piece_target_s must be below split_threshold_s")
        return self


class OutputConfig(_Strict):
    # A local folder, or for format delta also a URL (s3://bucket/prefix, gs://, az://).
    path: str = "out"
    # parquet: hive-partitioned files on a local filesystem; delta: Delta Lake tables.
    format: Literal["parquet", "delta"] = "parquet"
    partition_by: list[PartitionColumn] = ["job", "date"]
    # Non-secret options for the Delta object store (region, endpoint...); credentials
    # come from the cloud SDK's own environment and config, never from the manifest.
    storage_options: Annotated[dict[str, str], AfterValidator(_no_secrets)] = {}
    # Rows are buffered and committed in batches: fewer, larger files.
    commit_every_items: int = Field(200, ge=1)
    commit_every_s: float = Field(60.0, gt=0)
    price_per_minute: float = Field(0.0, ge=0)
    currency: str = Field("USD", pattern=r"^[A-Za-z]{3}$")

    @model_validator(mode="after")
    def _partitions_unique(self) -> OutputConfig:
        if len(set(self.partition_by)) != len(self.partition_by):
            raise ValueError("partition_by lists a column twice")
        return self

    @model_validator(mode="after")
    def _parquet_is_local(self) -> OutputConfig:
        # Said at validation too, not only when a run opens the output.
        if self.format == "parquet" and _is_remote(self.path):
            raise ValueError(
                f"{self.path}: format parquet needs a local folder (object stores have no "
                "atomic rename to commit with); use format: delta for object storage"
            )
        return self


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class Manifest(_Strict):
    version: Literal[1]
    job: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    inputs: list[Input] = Field(min_length=1)
    pulse: PulseConfig = PulseConfig()
    run: RunConfig = RunConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _whole_samples_per_chunk(self) -> Manifest:
        width = protocol.PCM_SAMPLE_BYTES.get(self.pulse.encoding, 1)
        if self.run.chunk_bytes % width:
            raise ValueError(
                f"run.chunk_bytes {self.run.chunk_bytes} splits {self.pulse.encoding} samples "
                f"({width} bytes each); use a multiple of {width}"
            )
        return self

    @model_validator(mode="after")
    def _names_need_split(self) -> Manifest:
        # Channels are split by run.channels or by a glob/path entry's own channels.
        split = self.run.channels == "split" or any(
            getattr(entry, "channels", None) == "split" for entry in self.inputs
        )
        if self.run.channel_names is not None and not split:
            raise ValueError(
                "run.channel_names needs channels: split (in run, or on a glob or path input)"
            )
        return self

    @model_validator(mode="after")
    def _split_needs_pcm(self) -> Manifest:
        for key in ("split_long_files", "skip_silence"):
            if getattr(self.run, key) and self.pulse.encoding in protocol.OPUS_ENCODINGS:
                raise ValueError(
                    f"run.{key} works with PCM encodings (linear16, linear32, mulaw, "
                    "alaw); turn it off or change pulse.encoding"
                )
        return self


class LoadedManifest(BaseModel):
    """A validated manifest and the folder its relative paths resolve against."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    manifest: Manifest
    path: Path
    base_dir: Path

    @property
    def output_dir(self) -> Path:
        return (self.base_dir / self.manifest.output.path).resolve()

    @property
    def output_location(self) -> str:
        """output.path as a URL when it is one, else as an absolute local path."""
        path = self.manifest.output.path
        if _is_remote(path):
            return path
        return str(self.output_dir)


# A manifest is small: more values than this (counting every use of a YAML alias) is an
# alias bomb, and validating it would take minutes and gigabytes.
MAX_VALUES = 100_000
_PROBLEMS_SHOWN = 20
_PROBLEM_MAX_CHARS = 500


def _check_size(data: Any, source: Path) -> None:
    """Raise `ManifestError` when ``data`` expands to more than `MAX_VALUES` values.
    Counts without recursing, and stops at the limit (an alias cycle ends too)."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ManifestError(
                source,
                f"expands to more than {MAX_VALUES:,} values (YAML aliases repeating a large "
                "value?); a manifest needs far fewer: write the values out or use fewer aliases",
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def parse_manifest(data: Any, source: Path) -> Manifest:
    _check_size(data, source)
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = list(
            dict.fromkeys(clip(describe(e, Manifest), _PROBLEM_MAX_CHARS) for e in exc.errors())
        )
        more = len(problems) - _PROBLEMS_SHOWN
        shown = problems[:_PROBLEMS_SHOWN] + ([f"... and {more} more"] if more > 0 else [])
        lines = "\n  ".join(shown)
        raise ManifestError(source, f"invalid manifest:\n  {lines}") from None


def load_manifest(path: Path | str) -> LoadedManifest:
    """Read and validate a manifest file; raises `ManifestError` on any problem."""
    source = Path(path)
    if not source.exists():
        raise ManifestError(source, "no such manifest file")
    # UTF-8 (or UTF-16 with a byte-order mark), as YAML wants; other encodings are refused
    # with what the bytes look like, rather than read as something they may not be.
    text = read_text(source, what="manifest", latin1_ok=False)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ManifestError(source, f"not valid YAML: {clip(str(exc), 1000)}") from None
    except RecursionError:
        raise ManifestError(source, "nests too deeply to be a manifest") from None
    if not isinstance(data, dict):
        raise ManifestError(source, "a manifest is a YAML mapping with version, job and inputs")
    manifest = parse_manifest(data, source)
    return LoadedManifest(manifest=manifest, path=source, base_dir=source.resolve().parent)
