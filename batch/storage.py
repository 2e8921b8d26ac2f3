"""Reach inputs wherever fsspec reaches: object storage and web URLs, read in ranges.

An input *location* is a string: a local path, or a URL (``s3://``, ``gs://``, ``az://``,
``abfs://``, ``file://``, ``https://``) kept exactly as the manifest or list names it. Remote
media is never downloaded first: `open_input` returns a seekable file object that fetches
``BLOCK_BYTES`` ranges as PyAV reads, so memory stays flat whatever the object's size.

Credentials and endpoints come only from each cloud SDK's own environment and config (for S3:
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
profiles). The manifest's ``storage_options`` may only hold non-secret settings, and a URL that
carries a credential is refused, because a location is written to tables, logs and reports.

Errors: a URL we cannot serve (unknown scheme, missing extra, credentials in it, a glob that
cannot be listed) is a `ManifestError`; one object that cannot be read is an `InputError`
with the same kinds as local files (``not_found``, ``permission``, ``empty``, ...), or
``read_error`` when the store failed. `read_failure` tells the store failing *for now* (a
dropped connection, a 5xx, throttling, a timeout: `InputUnavailable`, which the job retries
with backoff once the SDK's own retries are spent) from an answer that will not change (404,
403: no retry). `store_answer` reads an SDK's error for that, by type names and fields, so
no SDK needs to be installed or imported to recognise its errors.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from batch.errors import InputError, InputUnavailable, ManifestError

logger = logging.getLogger(__name__)

# Range size for remote reads: big enough to amortise a request, small enough to stream.
BLOCK_BYTES: Final = 1 << 20

StorageOptions = Mapping[str, Any]


@dataclass(frozen=True)
class Backend:
    """How one URL scheme is served: the fsspec package and the extra that installs it."""

    module: str | None  # None: ships with fsspec itself
    extra: str | None
    globs: bool = True


_BACKENDS: Final = {
    "s3": Backend("s3fs", "s3"),
    "gs": Backend("gcsfs", "gcs"),
    "gcs": Backend("gcsfs", "gcs"),
    "az": Backend("adlfs", "azure"),
    "abfs": Backend("adlfs", "azure"),
    "abfss": Backend("adlfs", "azure"),
    "file": Backend(None, None),
    # A web server has no listing to glob; fsspec's HTTP reader needs aiohttp.
    "https": Backend("aiohttp", "http", globs=False),
    "http": Backend("aiohttp", "http", globs=False),
}
_URL: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB_CHARS: Final = re.compile(r"[*?\[]")
# Setting or query names that hold credentials. Matched as substrings, case-insensitively.
_SECRET_WORDS: Final = ("key", "secret", "token", "password", "credential", "auth", "sig", "sas")


# The SDKs' secret-bearing variables, so log handlers can scrub their values as well.
CREDENTIAL_ENV: Final = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",  # what adlfs and deltalake read
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
)


def credentials_in_env(environ: Mapping[str, str]) -> list[str]:
    """The values of the storage SDKs' secret variables that are set (for scrubbing logs)."""
    return [environ[name] for name in CREDENTIAL_ENV if environ.get(name)]


def scheme(location: str) -> str | None:
    """The URL scheme, lower-cased, or None for a local path."""
    match = _URL.match(location)
    return match.group(1).lower() if match else None


def is_url(location: str) -> bool:
    return scheme(location) is not None


def _looks_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def check_url(url: str, *, glob: bool = False) -> None:
    """Refuse, with what to do, a URL this installation cannot read or must not store.

    Pure apart from asking the import system whether the scheme's package is installed.
    Raises ``ValueError`` with a message for a person (the manifest wraps it).
    """
    name = scheme(url)
    if name is None:
        return
    backend = _BACKENDS.get(name)
    if backend is None:
        known = ", ".join(f"{s}://" for s in _BACKENDS)
        raise ValueError(f"{url}: {name}:// URLs are not supported; use a local path or {known}")
    if glob and not backend.globs:
        raise ValueError(f"{url}: {name}:// has no listing to glob; name each file with path:")
    parts = urlsplit(url)
    if parts.password is not None:
        raise ValueError(
            f"{name}://…: a password in the URL would be written to tables and logs; give "
            "credentials through the storage SDK's environment or config instead"
        )
    if any(_looks_secret(key) for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        raise ValueError(
            f"{name}://{parts.netloc}{parts.path}: the query string looks like a signature or "
            "token, which would be written to tables and logs; give credentials through the "
            "storage SDK's environment or config instead"
        )
    if backend.module is not None and not _installed(backend.module):
        raise ValueError(
            f"{url}: reading {name}:// URLs needs the {backend.extra} extra: "
            f"pip install 'pulse-batch[{backend.extra}]'"
        )


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: present in sys.modules as None
        return False


def check_storage_options(options: Mapping[str, Any], where: str = "storage_options") -> None:
    """Refuse keys that look like credentials, at any depth. Raises ``ValueError``."""
    for key, value in options.items():
        if _looks_secret(str(key)):
            raise ValueError(
                f"{where}.{key} looks like a credential; credentials come only from the "
                "storage SDK's environment or config (for S3: AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE), never from the manifest"
            )
        if isinstance(value, Mapping):
            check_storage_options(value, f"{where}.{key}")


def join(base: str, relative: str) -> str:
    """``relative`` (a list row's path) against the folder of ``base`` (the list's URL)."""
    if is_url(relative) or relative.startswith("/"):
        return relative
    folder = base.rsplit("/", 1)[0]
    return f"{folder}/{relative}"


def _filesystem(url: str, options: StorageOptions) -> tuple[Any, str]:
    """The fsspec filesystem for ``url`` and the path within it. Raises `ManifestError`."""
    import fsspec.core  # only when a URL is used: local jobs do not pay for the import

    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        extra = _BACKENDS[scheme(url) or ""].extra
        raise ManifestError(
            url, f"needs the {extra} extra: pip install 'pulse-batch[{extra}]'"
        ) from exc
    except (ValueError, TypeError, OSError) as exc:
        # A constructor refusing its configuration (no account, a bad option name).
        raise ManifestError(url, f"cannot set up its storage client: {_reason(exc)}") from None
    return fs, str(path)


def _reason(exc: BaseException) -> str:
    """A short description of a storage error: its type and first line, never its arguments'
    repr (which for some SDKs includes the request, headers and all)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text[:200]
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


def glob(pattern: str, options: StorageOptions) -> list[str]:
    """Every file matching a URL pattern, as URLs spelled like the pattern, sorted.

    Raises `ManifestError` when the store cannot be listed (no bucket, no permission,
    unreachable): the job cannot know its inputs.
    """
    fs, stripped = _filesystem(pattern, options)
    fs.invalidate_cache()  # a long-lived process must see objects added since last listing
    try:
        found = fs.glob(stripped, detail=True)
    except (OSError, ValueError) as exc:
        raise ManifestError(pattern, f"cannot list: {_reason(exc)}") from None
    if not found and scheme(pattern) != "file":
        _check_container(fs, stripped, pattern)
    url_root, stripped_root = _literal_prefix(pattern), _literal_prefix(stripped)
    urls = []
    for path, info in found.items():
        if info.get("type") != "file":
            continue
        if path.startswith(stripped_root):
            urls.append(url_root + path[len(stripped_root) :])
        else:  # a backend that normalised the prefix: fall back to scheme + path
            urls.append(f"{scheme(pattern)}://{path.lstrip('/')}")
    return sorted(urls)


def _check_container(fs: Any, stripped: str, pattern: str) -> None:
    """Object stores list a missing bucket as empty; say so rather than find no files."""
    container = stripped.split("/", 1)[0]
    try:
        fs.ls(container, detail=False)
    except FileNotFoundError:
        raise ManifestError(pattern, f"bucket or container {container!r} not found") from None
    except PermissionError:
        raise ManifestError(
            pattern, f"access to {container!r} denied; check the credentials in the environment"
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(pattern, f"cannot list: {_reason(exc)}") from None


def _literal_prefix(pattern: str) -> str:
    """``pattern`` up to the last ``/`` before its first glob character."""
    match = _GLOB_CHARS.search(pattern)
    head = pattern if match is None else pattern[: match.start()]
    return head[: head.rfind("/") + 1]


def check_reachable(url: str, options: StorageOptions) -> None:
    """Build the URL's storage client once, so a configuration error stops planning with a
    clear message instead of failing every item. Raises `ManifestError`."""
    _filesystem(url, options)


@contextmanager
def open_input(url: str, options: StorageOptions) -> Iterator[Any]:
    """A seekable binary file object reading ``url`` in ``BLOCK_BYTES`` ranges.

    Raises `InputError`: ``not_found``, ``permission``, ``not_media`` (a folder), ``empty``,
    or ``read_error`` (the store could not be reached or answered oddly).
    """
    try:
        fs, path = _filesystem(url, options)
    except ManifestError as exc:
        raise InputError("read_error", url, str(exc).removeprefix(f"{url}: ")) from None
    try:
        info = fs.info(path)
    except Exception as exc:  # every SDK has its own error tree: mapped below
        raise read_failure(url, exc) from None
    if info.get("type") == "directory":
        raise InputError("not_media", url, "is a folder, not a media file")
    if info.get("size") == 0:
        raise InputError("empty", url, "object is empty (0 bytes)")
    try:
        handle = fs.open(path, "rb", block_size=BLOCK_BYTES, cache_type="readahead")
    except Exception as exc:
        raise read_failure(url, exc) from None
    with handle:
        yield handle


def read_bytes(url: str, options: StorageOptions) -> bytes:
    """A small object (a list file) in full. Raises `ManifestError`."""
    try:
        with open_input(url, options) as handle:
            data: bytes = handle.read()
            return data
    except InputError as exc:
        raise ManifestError(url, str(exc).removeprefix(f"{url}: ")) from None
    except OSError as exc:
        raise ManifestError(url, f"cannot read: {_reason(exc)}") from None


# Failures a later attempt can get past, by class name anywhere in the error's MRO, so no
# SDK must be installed to recognise them: Python's own (ConnectionError covers resets and
# refusals), botocore's (HTTPClientError, IncompleteReadError, its own ConnectionError),
# aiohttp's (ClientConnectionError, ClientPayloadError), azure-core's
# (ServiceRequestError, ServiceResponseError), google-auth's (TransportError), http.client's.
_TRANSIENT_TYPES: Final = frozenset(
    {
        "ConnectionError",
        "TimeoutError",
        "HTTPClientError",
        "IncompleteReadError",
        "IncompleteRead",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServiceRequestError",
        "ServiceResponseError",
        "TransportError",
    }
)
# Error codes with which S3 (and its clones), Azure and GCS say "not now".
_TRANSIENT_CODES: Final = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ServerBusy",
        "OperationTimedOut",
    }
)
_TRANSIENT_STATUSES: Final = frozenset({408, 425, 429})
_DEFINITE_STATUSES: Final = frozenset({401, 403, 404})


@dataclass(frozen=True)
class StoreAnswer:
    """What a storage error says: the HTTP status and error code of the store's answer
    (None when there was no answer) and whether a later attempt can get past it."""

    status: int | None
    code: str | None
    transient: bool


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The error and what it wraps (a short chain: fsspec's, the SDK's, the socket's)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def _status_and_code(error: BaseException) -> tuple[int | None, str | None]:
    response = getattr(error, "response", None)  # botocore's ClientError
    if isinstance(response, Mapping):
        meta, body = response.get("ResponseMetadata") or {}, response.get("Error") or {}
        status = meta.get("HTTPStatusCode")
        code = body.get("Code")
        return (status if isinstance(status, int) else None), (str(code) if code else None)
    for name in ("status", "status_code", "code"):  # aiohttp, azure-core, gcsfs
        value = getattr(error, name, None)
        if isinstance(value, int) and 100 <= value <= 599:
            code = getattr(error, "error_code", None)  # azure-core's storage code
            return value, str(code) if code else None
    return None, None


def store_answer(exc: BaseException) -> StoreAnswer:
    """Read a storage SDK's error (and what it wraps). Pure: looks only at the objects."""
    status: int | None = None
    code: str | None = None
    typed_transient = False
    for error in _chain(exc):
        found_status, found_code = _status_and_code(error)
        status, code = status or found_status, code or found_code
        names = {cls.__name__ for cls in type(error).__mro__}
        typed_transient = typed_transient or bool(names & _TRANSIENT_TYPES)
    if status in _DEFINITE_STATUSES:
        return StoreAnswer(status, code, transient=False)  # the store answered: no
    answered_later = status is not None and (status >= 500 or status in _TRANSIENT_STATUSES)
    transient = typed_transient or answered_later or code in _TRANSIENT_CODES
    return StoreAnswer(status, code, transient)


def read_failure(url: str, exc: BaseException) -> InputError:
    """Translate a storage SDK's error into an item error: `InputUnavailable` (the job
    retries the item) when the store failed for now, else the kinds local files use. The
    message names the URL and the error's type and first line, never a credential."""
    answer = store_answer(exc)
    if answer.status in (401, 403):
        return InputError(
            "permission", url, f"access denied (HTTP {answer.status}); check the credentials"
        )
    if answer.status == 404:
        return InputError("not_found", url, "object not found; check the URL")
    if answer.transient:
        said = " ".join(str(part) for part in (answer.status, answer.code) if part is not None)
        detail = f"HTTP {said}: {_reason(_root(exc))}" if said else _reason(_root(exc))
        return InputUnavailable(
            url, f"the store failed for now ({detail}); tried again up to run.max_attempts times"
        )
    cause = exc.__cause__
    if isinstance(cause, OSError) and not isinstance(cause, FileNotFoundError):
        return InputError("read_error", url, f"could not read from storage ({_reason(cause)})")
    if isinstance(exc, FileNotFoundError):
        return InputError("not_found", url, "object not found; check the URL")
    if isinstance(exc, PermissionError):
        return InputError(
            "permission", url, "access denied; check the credentials in the environment"
        )
    return InputError("read_error", url, f"could not read from storage ({_reason(exc)})")


def _root(exc: BaseException) -> BaseException:
    """The error that says most: the SDK's own beneath fsspec's translation (fsspec's HTTP
    reader, for one, reports an unreachable server as "not found")."""
    chain = list(_chain(exc))
    if isinstance(exc, FileNotFoundError) and len(chain) > 1:
        return chain[1]
    return exc
