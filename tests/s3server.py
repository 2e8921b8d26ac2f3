"""A real S3 API on loopback for tests: moto's server mode, as s3fs's own test suite uses.

``S3Server`` runs ``moto.server.ThreadedMotoServer`` on 127.0.0.1 on a free port and keeps a log
of every request it answered (method, path, Range header, status, bytes sent), so a test can
check that a reader used range requests instead of downloading whole objects.

A `Fault` makes the server misbehave for chosen requests, as a flaky store does: answer an
S3 error (``503 SlowDown``, ``500 InternalError``) instead of serving (or after serving: a
lost answer), or hold a request until the test releases it (a stalled read). Faults sit in
front of moto, on the wire: the client's SDK sees exactly what a real store would send.

``S3Bucket`` is one fresh bucket on that server with the standard ``AWS_*`` environment that
points at it. The fixtures in ``conftest.py`` (``s3_server``, ``s3_bucket``) put that
environment into ``os.environ`` for in-process code; pass ``bucket.env`` to a subprocess.
The secret access key is ``FAKE_SECRET``: grep outputs, logs and reports for it to prove that
no credential leaked.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

# Distinctive enough that finding it anywhere in test output can only mean a leak.
FAKE_SECRET = "pulse-fake-SECRET-4f7c2a9e-never-print-me"
FAKE_KEY_ID = "AKIAPULSEFAKEKEY0001"
FAKE_REGION = "us-east-1"

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class Request:
    """One request the server answered."""

    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int

    def bucket(self) -> str:
        """The bucket of a path-style request (``/bucket/key``), or ``""``."""
        return self.path.lstrip("/").split("/", 1)[0]

    def key(self) -> str:
        parts = self.path.lstrip("/").split("/", 1)
        return parts[1] if len(parts) == 2 else ""


@dataclass
class Fault:
    """The next ``times`` requests for ``key`` of ``bucket`` with ``method``: held until
    ``release`` is set (for at most ``hold_s``) then served, or, with ``status``, answered
    with that status and the S3 error ``code`` instead of being served (with ``served``:
    served first, so the store applied the request, and its answer replaced by the error,
    as when an answer is lost on the way back)."""

    bucket: str
    key: str
    method: str = "GET"
    times: int = 1
    status: int | None = None
    code: str = "SlowDown"
    release: threading.Event | None = None
    hold_s: float = 0.0
    served: bool = False
    applied: int = 0  # requests it applied to so far
    released: list[bool] = field(default_factory=list)  # per hold: released (not timed out)

    def matches(self, method: str, path: str) -> bool:
        wanted = f"/{self.bucket}/{self.key}"
        return self.applied < self.times and method == self.method and path == wanted

    def error_body(self) -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>'
            f"{self.code}</Code><Message>injected by the test server</Message>"
            f"<Resource>/{self.bucket}/{self.key}</Resource><RequestId>fault</RequestId></Error>"
        ).encode()


class _Recorder:
    """WSGI middleware that logs each request with the bytes of its response body, and
    applies the `Fault` s armed for it."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[Request] = []
        self.faults: list[Fault] = []

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.applied += 1
                    return fault
        return None

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        fault = self._fault_for(environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", ""))
        if fault is not None and fault.status is None and fault.release is not None:
            fault.released.append(fault.release.wait(fault.hold_s))
        if fault is not None and fault.status is not None:
            if fault.served:
                for _ in self.app(environ, lambda *args: None):
                    pass  # applied by moto; its answer is dropped
            body = fault.error_body()
            start_response(
                f"{fault.status} {fault.code}",
                [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
            )
            if fault.method == "HEAD":
                body = b""  # a HEAD answer has headers only, even an error's
            self._note(environ, fault.status, len(body))
            yield body
            return
        status = [0]

        def recording_start(status_line: str, headers: Any, *args: Any) -> Any:
            status[0] = int(status_line.split(" ", 1)[0])
            return start_response(status_line, headers, *args)

        sent = 0
        try:
            for chunk in self.app(environ, recording_start):
                sent += len(chunk)
                yield chunk
        finally:
            self._note(environ, status[0], sent)

    def _note(self, environ: dict[str, Any], status: int, sent: int) -> None:
        request = Request(
            method=environ.get("REQUEST_METHOD", ""),
            path=environ.get("PATH_INFO", ""),
            range=environ.get("HTTP_RANGE"),
            status=status,
            bytes_sent=sent,
        )
        with self.lock:
            self.log.append(request)


class _Dispatcher(DomainDispatcherApplication):
    """moto's dispatcher, remembering which backend serves each host name: moto works it
    out again for every request, under a lock, by listing its own package's folders and
    trying some hundreds of URL patterns (over half of its time per S3 request)."""

    def __init__(self) -> None:
        super().__init__(create_backend_app)
        self._backends: dict[str | None, Any] = {}

    def get_backend_for_host(self, host: str | None) -> Any:
        if host not in self._backends:  # (callers hold self.lock)
            self._backends[host] = super().get_backend_for_host(host)
        return self._backends[host]


class _QuietRequestHandler(MotoRequestHandler):
    """No access-log line per request (the recorder keeps the log): werkzeug's lines would
    land in the log of a CLI run in this process, as no child's log ever showed them."""

    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class _RecordingMotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` with its WSGI app wrapped by ``_Recorder``."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.recorder = _Recorder(_Dispatcher())

    def _server_entry(self) -> None:
        self._server = make_server(
            self._ip_address,
            self._port,
            self.recorder,
            True,
            request_handler=_QuietRequestHandler,
        )
        self._server_ready_event.set()
        self._server.serve_forever()


class S3Server:
    """A moto S3 server on 127.0.0.1 on a free port; use as a context manager."""

    def __init__(self) -> None:
        self._moto = _RecordingMotoServer()
        self.endpoint_url = ""
        self._client: Any = None

    def __enter__(self) -> S3Server:
        self._moto.start()
        host, port = self._moto.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._moto.stop()

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS environment pointing at this server, with fake credentials.

        No profile or instance metadata is consulted, so a developer's real AWS setup can
        neither leak into nor slow down the tests.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_REGION": FAKE_REGION,
            "AWS_DEFAULT_REGION": FAKE_REGION,
            # object_store (deltalake) refuses http:// endpoints unless told.
            "AWS_ALLOW_HTTP": "true",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/pulse-batch-tests/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/pulse-batch-tests/aws-credentials",
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server (for arranging and inspecting test state): one
        for the session, as a client takes ~0.1 s to make and is safe to share."""
        if self._client is None:
            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=FAKE_KEY_ID,
                aws_secret_access_key=FAKE_SECRET,
                region_name=FAKE_REGION,
            )
        return self._client

    def requests(self) -> list[Request]:
        """Every request answered so far, oldest first."""
        with self._moto.recorder.lock:
            return list(self._moto.recorder.log)

    def add_fault(self, fault: Fault) -> Fault:
        """Arm ``fault`` (it applies to requests from now on); returns it, to read back."""
        with self._moto.recorder.lock:
            self._moto.recorder.faults.append(fault)
        return fault

    def bucket(self, prefix: str = "test") -> S3Bucket:
        """A new, empty bucket with a unique name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return S3Bucket(server=self, name=name)


@dataclass
class S3Bucket:
    """One bucket on an ``S3Server``."""

    server: S3Server
    name: str
    _client: Any = field(default=None, repr=False)

    @property
    def env(self) -> dict[str, str]:
        return self.server.env

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self.server.client()
        return self._client

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def upload(self, local: Path, key: str | None = None) -> str:
        """Upload one file (to ``key``, default its name); returns its ``s3://`` URL."""
        key = key if key is not None else local.name
        self.client.upload_file(str(local), self.name, key)
        return self.url(key)

    def upload_folder(self, folder: Path, prefix: str = "") -> list[str]:
        """Upload every file under ``folder`` keeping relative paths under ``prefix``."""
        urls = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}{path.relative_to(folder).as_posix()}"
            urls.append(self.upload(path, key))
        return urls

    def put(self, key: str, data: bytes) -> str:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)
        return self.url(key)

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix``, sorted (paginated, so any number)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        )
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        body: bytes = self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        return body

    def fault(self, key: str, **how: Any) -> Fault:
        """Arm a `Fault` for ``key`` of this bucket (see `Fault` for ``how``)."""
        return self.server.add_fault(Fault(self.name, key, **how))

    def requests(self) -> list[Request]:
        """Requests answered for this bucket so far."""
        return [r for r in self.server.requests() if r.bucket() == self.name]
