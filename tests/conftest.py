"""Shared fixtures: a real local Pulse server on loopback, manifests, and the CLI."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import anyio.from_thread
import pytest
import yaml

from batch.server import FaultConfig, LocalServer, local_server
from tests.emulators import AZURITE, AzContainer, Azurite, GcsBucket, GcsEmulator
from tests.needs import missing
from tests.runcli import TIME_UNIT_S, run_cli, run_cli_process, start_cli
from tests.s3server import S3Bucket, S3Server

__all__ = ["TIME_UNIT_S", "run_cli", "run_cli_process", "start_cli"]  # the CLI: tests/runcli


# The recognizer's OpenMP threads (faster-whisper's CTranslate2, GNU libgomp) sleep when
# idle instead of spinning: beside another xdist worker on two cores, spinning threads
# burnt the CPU the other thread of the same decode waited for (several times slower).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> Generator[None, None, None]:
    """With pytest-xdist (``--dist loadgroup``), the tests of the real recognizer share one
    worker: one model load, one README demo, and no two whisper runs fighting for the
    same two cores. Marked before xdist's own hook reads the marks; kept after it."""
    for item in items:
        if item.get_closest_marker("whisper"):
            item.add_marker(pytest.mark.xdist_group("whisper"))
    yield
    _keep_xdist_groups(items)


def _keep_xdist_groups(items: list[pytest.Item]) -> None:
    """pytest-xdist 3.8 puts an item's group in ``item._nodeid`` ("...@whisper"), which
    pytest 9.2 no longer reads (the id is ``item._id`` now), so ``loadgroup`` silently
    spread every group over all workers (pytest-dev/pytest-xdist#1386). Carry it over."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest before 9.2: xdist's own suffix is the id
        return
    for item in items:
        grouped = item.__dict__.get("_nodeid")
        if isinstance(grouped, str) and grouped != item.nodeid:
            item._id = NodeId.parse(grouped)


@pytest.fixture(autouse=True)
def _logging_levels_kept() -> Iterator[None]:
    """Every test starts from the logging levels the session started with: code run in this
    process (a CLI call, a log-format switch, a server's set-up) sets levels on our loggers
    and the libraries', and a later test must not hear less (or more) because of it."""
    manager = logging.getLogger().manager
    before = {
        name: (made.level, made.disabled)
        for name, made in manager.loggerDict.items()
        if isinstance(made, logging.Logger)
    }
    root_level = logging.getLogger().level
    yield
    logging.getLogger().setLevel(root_level)
    for name, made in list(manager.loggerDict.items()):
        if isinstance(made, logging.Logger):
            level, disabled = before.get(name, (logging.NOTSET, False))
            made.setLevel(level)
            made.disabled = disabled


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.contextmanager
def server_in_thread(
    engine: str = "synthetic", faults: FaultConfig | None = None, api_key: str | None = None
) -> Iterator[LocalServer]:
    """A local server on its own event loop thread, so a CLI subprocess can talk to it
    while the test reads its counters."""
    with anyio.from_thread.start_blocking_portal() as portal:
        manager = local_server(engine=engine, faults=faults, api_key=api_key)
        with portal.wrap_async_context_manager(manager) as server:
            yield server


@pytest.fixture
def synthetic_server() -> Iterator[LocalServer]:
    with server_in_thread("synthetic") as server:
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server on loopback for the whole session; buckets keep tests apart."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket, with its ``AWS_*`` environment set in ``os.environ`` for this test
    (so in-process code and ``run_cli`` subprocesses both reach it)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return s3_server.bucket()


@pytest.fixture(scope="session")
def azurite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    """One Azurite on loopback for the whole session; containers keep tests apart."""
    if not (AZURITE / "azurite-blob").exists():
        missing("azurite is not installed here: `make test` installs it with npm")
    with Azurite(tmp_path_factory.mktemp("azurite")) as server:
        yield server


@pytest.fixture
def az_container(azurite_server: Azurite, monkeypatch: pytest.MonkeyPatch) -> AzContainer:
    """A fresh container, with the ``AZURE_*`` environment set in ``os.environ`` for this
    test (for in-process code and `run_cli`)."""
    for name in [name for name in os.environ if name.startswith("AZURE_")]:
        monkeypatch.delenv(name)
    container = AzContainer.make(azurite_server)
    for name, value in container.env.items():
        monkeypatch.setenv(name, value)
    return container


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GcsEmulator]:
    """One GCS emulator on loopback for the whole session; buckets keep tests apart."""
    with GcsEmulator() as server:
        yield server


@pytest.fixture
def gcs_bucket(gcs_server: GcsEmulator, monkeypatch: pytest.MonkeyPatch) -> GcsBucket:
    """A fresh bucket, with the emulator's environment set in ``os.environ`` for this test."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    for name, value in gcs_server.env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    return GcsBucket.make(gcs_server)


def write_manifest(folder: Path, **sections: Any) -> Path:
    """A manifest file in ``folder``; sections override the defaults below."""
    data: dict[str, Any] = {
        "version": 1,
        "job": "test-job",
        "inputs": [{"glob": "media/*"}],
        "pulse": {"endpoint": "local", "local_engine": "synthetic"},
        "run": {"concurrency": 2, "pace": 0, "max_attempts": 3, "backoff_initial_s": 0.05},
        "output": {"path": "out"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def unpaced(manifest: Path) -> None:
    """Stream a manifest's audio (paced, to give a kill or a signal time to land) at full
    speed from now on; the items stay the same."""
    text = manifest.read_text()
    assert "pace: 1.0" in text, text
    manifest.write_text(text.replace("pace: 1.0", "pace: 0"))


def point_at(manifest: Path, url: str) -> None:
    """Send a manifest written by `write_manifest` to the server at ``url``."""
    manifest.write_text(manifest.read_text().replace("endpoint: local", f"endpoint: {url}"))


def wait_for(condition: Callable[[], bool], timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` time units pass; whether it held.
    Callers assert what they needed, so a timeout fails with their message."""
    deadline = time.monotonic() + timeout_s * TIME_UNIT_S
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True


def kill_when(
    process: subprocess.Popen[str],
    condition: Callable[[], bool],
    timeout_s: float,
    poll_s: float = 0.05,
) -> None:
    """SIGKILL ``process`` as soon as ``condition`` holds (or after ``timeout_s`` units)."""
    wait_for(condition, timeout_s, poll_s)
    process.kill()
    process.wait(timeout=10 * TIME_UNIT_S)
