"""gs:// and az:// inputs read through real storage APIs on loopback (tests/emulators.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_manifest
from tests.emulators import AZURITE, BUCKET, CONTAINER, DEV_KEY, Azurite, GcsEmulator
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
