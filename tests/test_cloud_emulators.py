"""gs:// and az:// inputs read through real storage APIs on loopback (tests/emulators.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batch.output import OutputReader
from batch.output.lease import Holder, Lease
from batch.output.lease_stores import AzureStore, azure_client
from tests.conftest import run_cli, write_manifest
from tests.emulators import (
    AZURITE,
    BUCKET,
    CONTAINER,
    DEV_KEY,
    AzContainer,
    Azurite,
    GcsEmulator,
)
from tests.media import Burst, tone_track, write_audio
from tests.needs import missing
from tests.runcli import CliResult
from tests.tables import by_source


def _clip(path: Path) -> Path:
    track = tone_track([Burst(0.5, 0.3, 440), Burst(1.5, 0.3, 880)], 2.5, 16000)
    return write_audio(path, [track], 16000)


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


# --- A Delta output in Azurite: the job's lease --------------------------------------------


def _delta_job(tmp_path: Path, container: AzContainer) -> Path:
    (tmp_path / "media").mkdir()
    _clip(tmp_path / "media" / "a.wav")
    return write_manifest(tmp_path, output={"path": container.url("lake"), "format": "delta"})


def test_a_second_run_into_an_az_delta_output_is_refused_while_the_first_holds_its_lease(
    tmp_path: Path, az_container: AzContainer
) -> None:
    manifest = _delta_job(tmp_path, az_container)
    store = AzureStore(azure_client(az_container.url()))
    first = Lease(store, az_container.url("lake/_locks/test-job/job.lease"), "job 'test-job'")
    first.acquire()  # held by this (live) process, as a first run's would be
    refused = run_cli("run", str(manifest))
    assert refused.returncode == 4, refused.output
    assert f"job 'test-job' is already running into {az_container.url('lake')}" in refused.stderr
    assert f"pid {os.getpid()} on {socket.gethostname()}" in refused.stderr
    assert first.still_mine()
    reader = OutputReader(az_container.url("lake"))
    assert reader.run_alive("test-job", "any-run")  # `status` sees the run going
    first.release()
    assert not reader.run_alive("test-job", "any-run")
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.output
    assert DEV_KEY not in done.output


def test_a_killed_runs_lease_on_az_is_taken_over_and_released(
    tmp_path: Path, az_container: AzContainer
) -> None:
    manifest = _delta_job(tmp_path, az_container)
    killed = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    gone = Holder(socket.gethostname(), int(killed.stdout), "job 'test-job'", expires_at=4e9)
    sdk = az_container.client()
    sdk.upload_blob("lake/_locks/test-job/job.lease", gone.to_bytes())
    done = run_cli("run", str(manifest))
    assert done.returncode == 0, done.output
    rows = OutputReader(az_container.url("lake")).table("transcripts", "test-job", ["transcript"])
    assert rows["transcript"].to_pylist() == ["tone440 tone880"]
    assert [blob.name for blob in sdk.list_blobs(name_starts_with="lake/_locks/")] == []
