"""A real S3 API on loopback for tests: moto's server mode, as s3fs's own test suite uses.

``S3Server`` runs ``moto.server.ThreadedMotoServer`` on 127.0.0.1 on a free port and keeps a log
of every request it answered (method, path, Range header, status, bytes sent), so a test can
check that a reader used range requests instead of downloading whole objects.

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


class _Recorder:
    """WSGI middleware that logs each request with the bytes of its response body."""

    def __init__(self, app: WsgiApp) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.log: list[Request] = []

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
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
            request = Request(
                method=environ.get("REQUEST_METHOD", ""),
                path=environ.get("PATH_INFO", ""),
                range=environ.get("HTTP_RANGE"),
                status=status[0],
                bytes_sent=sent,
            )
            with self.lock:
                self.log.append(request)


class _RecordingMotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` with its WSGI app wrapped by ``_Recorder``."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.recorder = _Recorder(DomainDispatcherApplication(create_backend_app))

    def _server_entry(self) -> None:
        self._server = make_server(
            self._ip_address,
            self._port,
            self.recorder,
            True,
            request_handler=MotoRequestHandler,
        )
        self._server_ready_event.set()
        self._server.serve_forever()


class S3Server:
    """A moto S3 server on 127.0.0.1 on a free port; use as a context manager."""

    def __init__(self) -> None:
        self._moto = _RecordingMotoServer()
        self.endpoint_url = ""

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
        """A boto3 S3 client for this server (for arranging and inspecting test state)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=FAKE_KEY_ID,
            aws_secret_access_key=FAKE_SECRET,
            region_name=FAKE_REGION,
        )

    def requests(self) -> list[Request]:
        """Every request answered so far, oldest first."""
        with self._moto.recorder.lock:
            return list(self._moto.recorder.log)

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

    def requests(self) -> list[Request]:
        """Requests answered for this bucket so far."""
        return [r for r in self.server.requests() if r.bucket() == self.name]
