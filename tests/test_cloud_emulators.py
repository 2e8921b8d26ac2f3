"""gs:// and az:// inputs read through real storage APIs on loopback, both installed by
`make test`: `gcp-storage-emulator` (a GCS JSON API in pure Python; gcsfs finds it by its
own ``STORAGE_EMULATOR_HOST`` variable) and Azurite (Microsoft's Azure Storage emulator, from
npm; adlfs finds it by ``AZURE_STORAGE_CONNECTION_STRING``). Each job runs as a CLI
subprocess, so the cloud SDKs see that environment from their first import, and no request
leaves loopback (no metadata server, no telemetry)."""

from __future__ import annotations

import os
import re
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import TIME_UNIT_S, run_cli, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.needs import missing, need_module
from tests.runcli import CliResult
from tests.tables import by_source

BUCKET = "calls"


def _clip(path: Path) -> Path:
    track = tone_track([Burst(0.5, 0.3, 440), Burst(1.5, 0.3, 880)], 2.5, 16000)
    return write_audio(path, [track], 16000)


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


@pytest.fixture
def gcs() -> Iterator[GcsEmulator]:
    with GcsEmulator() as emulator:
        yield emulator


def _glob_and_missing_path(
    tmp_path: Path, upload: Callable[[Path, str], object], base: str, env: dict[str, str]
) -> CliResult:
    """Upload three objects under ``base`` (two under media/, one outside it), run a glob of
    media/ beside a path to a missing object, and check every row; returns the run."""
    clip = _clip(tmp_path / "a.wav")
    for name in ("media/a.wav", "media/sub/b.wav", "other/c.wav"):  # other/: not matched
        upload(clip, name)
    manifest = write_manifest(
        tmp_path, inputs=[{"glob": f"{base}/media/**/*.wav"}, {"path": f"{base}/gone.wav"}]
    )
    done = run_cli("run", str(manifest), env=env)
    assert done.returncode == 1, done.stderr  # the missing object failed
    assert by_source(tmp_path / "out", "status, error_kind, transcript, error") == {
        f"{base}/gone.wav": (
            "failed",
            "not_found",
            None,
            f"{base}/gone.wav: object not found; check the URL",
        ),
        f"{base}/media/a.wav": ("ok", None, "tone440 tone880", None),
        f"{base}/media/sub/b.wav": ("ok", None, "tone440 tone880", None),
    }
    return done


def test_a_gs_glob_and_path_through_the_emulator(gcs: GcsEmulator, tmp_path: Path) -> None:
    _glob_and_missing_path(tmp_path, gcs.upload, f"gs://{BUCKET}", gcs.env)


# --- az:// through Azurite --------------------------------------------------------------

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
            self._process.terminate()
            try:
                self._process.wait(10 * TIME_UNIT_S)
            except subprocess.TimeoutExpired:
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


@pytest.fixture
def azurite(tmp_path: Path) -> Iterator[Azurite]:
    if not (AZURITE / "azurite-blob").exists():
        missing("azurite is not installed here: `make test` installs it with npm")
    folder = tmp_path / "azurite"
    folder.mkdir()
    with Azurite(folder) as emulator:
        yield emulator


def test_an_az_glob_and_path_through_azurite(azurite: Azurite, tmp_path: Path) -> None:
    done = _glob_and_missing_path(tmp_path, azurite.upload, f"az://{CONTAINER}", azurite.env)
    assert DEV_KEY not in done.stdout + done.stderr
