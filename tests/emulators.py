"""Cloud storage emulators on loopback for the tests, both installed by `make test`:
`gcp-storage-emulator` (a GCS JSON API in pure Python; gcsfs and google-cloud-storage find it
by ``STORAGE_EMULATOR_HOST``) and Azurite (Microsoft's Azure Storage emulator, from npm;
adlfs and azure-storage-blob find it by ``AZURE_STORAGE_CONNECTION_STRING``, deltalake by
``AZURE_STORAGE_USE_EMULATOR`` and ``AZURITE_BLOB_STORAGE_URL``). No request leaves
loopback (no metadata server, no telemetry).

What each honours, checked against these versions: Azurite enforces ``If-None-Match: *``
and ``If-Match`` (409 and 412); gcp-storage-emulator ignores ``ifGenerationMatch`` on
uploads and deletes alike, so nothing run against it can show a GCS precondition refused.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.needs import need_module
from tests.runcli import TIME_UNIT_S

BUCKET = "calls"


class GcsEmulator:
    """One in-memory GCS emulator on 127.0.0.1, a free port, with bucket ``calls``."""

    def __init__(self) -> None:
        # A virtualenv made before this test came has no emulator: say how to get it.
        server = need_module("gcp_storage_emulator.server", "not installed here: run `make test`")
        self._server = server.create_server("127.0.0.1", 0, in_memory=True, default_bucket=BUCKET)
        self._server._api.daemon = True  # its thread must not outlive a failed test
        self.url = ""

    def __enter__(self) -> GcsEmulator:
        self._server.start()
        port = self._server._api._httpd.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def upload(self, local: Path, name: str) -> str:
        """Upload through the JSON API's media upload (no SDK); returns the gs:// URL."""
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        request = urllib.request.Request(
            f"{self.url}/upload/storage/v1/b/{BUCKET}/o?{query}",
            data=local.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10 * TIME_UNIT_S) as answer:
            assert answer.status == 200
        return f"gs://{BUCKET}/{name}"

    @property
    def env(self) -> dict[str, str]:
        """gcsfs reads the emulator's address from its own variable; Google's auth finds no
        credentials (so gcsfs goes anonymous) and probes no metadata server off loopback."""
        env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
        env.update(
            STORAGE_EMULATOR_HOST=self.url,
            NO_GCE_CHECK="true",
            GCE_METADATA_HOST="127.0.0.1:9",
            GCE_METADATA_IP="127.0.0.1:9",
            CLOUDSDK_CONFIG="/nonexistent/pulse-batch-tests/gcloud",
        )
        return env


# --- Azure Blob through Azurite -----------------------------------------------------

AZURITE = Path(__file__).resolve().parent.parent / ".venv" / "azurite" / "node_modules" / ".bin"
CONTAINER = "calls"
# Azurite's one built-in account; its key is public (Azure's emulator documentation).
DEV_ACCOUNT = "devstoreaccount1"
DEV_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Azurite:
    """Azurite's blob service on 127.0.0.1, a free port, in memory, telemetry off."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Azurite:
        command = [
            str(AZURITE / "azurite-blob"),
            *("--blobHost", "127.0.0.1", "--blobPort", "0"),
            "--inMemoryPersistence",
            *("--extentMemoryLimit", "256"),  # megabytes; the default is half the machine's
            "--disableTelemetry",  # it would otherwise report to a host off this machine
            "--skipApiVersionCheck",
        ]
        self._process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.folder
        )
        self.url = _listening_url(self._process, 30 * TIME_UNIT_S)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            # Killed, not terminated: its data is in memory only, and on SIGTERM it waits for
            # the SDK's kept-alive connections to close, 10 s at the end of every test run.
            self._process.kill()
            self._process.wait(10 * TIME_UNIT_S)
            if self._process.stdout is not None:
                self._process.stdout.close()

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={DEV_ACCOUNT};AccountKey={DEV_KEY};"
            f"BlobEndpoint={self.url}/{DEV_ACCOUNT};"
        )

    def upload(self, local: Path, name: str) -> str:
        """Upload with Azure's own SDK; returns the az:// URL."""
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.connection_string)
        container = service.get_container_client(CONTAINER)
        if not container.exists():
            container.create_container()
        container.upload_blob(name, local.read_bytes(), overwrite=True)
        return f"az://{CONTAINER}/{name}"

    @property
    def env(self) -> dict[str, str]:
        """adlfs reads the account from the SDK's own variable; nothing else is set."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
        env["AZURE_STORAGE_CONNECTION_STRING"] = self.connection_string
        return env


def _listening_url(process: subprocess.Popen[str], timeout_s: float) -> str:
    """The URL Azurite says it listens on, read from its output within ``timeout_s``."""
    found: list[str] = []
    said: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            said.append(line)
            match = re.search(r"listens on (http://127\.0\.0\.1:\d+)", line)
            if match:
                found.append(match.group(1))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not found:
        process.kill()
        raise AssertionError(f"azurite did not start: {''.join(said)[-2000:]}")
    return found[0]


_names = itertools.count()


@dataclass(frozen=True)
class AzContainer:
    """A fresh container in a shared Azurite, for one test."""

    azurite: Azurite
    name: str

    def url(self, key: str = "") -> str:
        return f"az://{self.name}/{key}"

    def client(self) -> Any:
        """The container's client, from Azure's own SDK."""
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient.from_connection_string(self.azurite.connection_string)
        return service.get_container_client(self.name)

    @property
    def env(self) -> dict[str, str]:
        """adlfs and azure-storage-blob read the connection string; deltalake (Rust's
        object_store) the account, its key and the emulator's address."""
        return {
            "AZURE_STORAGE_CONNECTION_STRING": self.azurite.connection_string,
            "AZURE_STORAGE_ACCOUNT_NAME": DEV_ACCOUNT,
            "AZURE_STORAGE_ACCOUNT_KEY": DEV_KEY,
            "AZURE_STORAGE_USE_EMULATOR": "true",
            "AZURITE_BLOB_STORAGE_URL": self.azurite.url,
        }

    @classmethod
    def make(cls, azurite: Azurite) -> AzContainer:
        made = cls(azurite, f"test-{os.getpid()}-{next(_names)}")
        made.client().create_container()
        return made


@dataclass(frozen=True)
class GcsBucket:
    """A fresh bucket in a shared GCS emulator, for one test."""

    emulator: GcsEmulator
    name: str

    def url(self, key: str = "") -> str:
        return f"gs://{self.name}/{key}"

    def client(self) -> Any:
        """A google-cloud-storage client of the emulator (anonymous: it finds it by the
        environment `gcs_bucket` sets)."""
        from google.cloud import storage  # type: ignore[attr-defined,unused-ignore]

        return storage.Client()

    @classmethod
    def make(cls, emulator: GcsEmulator) -> GcsBucket:
        name = f"test-{os.getpid()}-{next(_names)}"
        query = urllib.parse.urlencode({"project": "test"})
        request = urllib.request.Request(
            f"{emulator.url}/storage/v1/b?{query}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10 * TIME_UNIT_S) as answer:
            assert answer.status == 200
        return cls(emulator, name)
