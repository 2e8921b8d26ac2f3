"""A local Pulse-compatible streaming server, for tests, demos and fault drills.

Library use::

    async with local_server(engine="synthetic", api_key="k") as server:
        ...  # connect to server.url or server.unified_url; read server.stats

The CLI command lives in `batch.server.cli.serve`.
"""

from batch.server.app import LocalServer, local_server
from batch.server.engines import (
    Engine,
    EngineUnavailable,
    SyntheticEngine,
    WhisperEngine,
    make_engine,
)
from batch.server.faults import FaultConfig, FaultConfigError, FaultDraw, FaultKind, draw_fault
from batch.server.stats import ServerStats, SessionRecord

__all__ = [
    "Engine",
    "EngineUnavailable",
    "FaultConfig",
    "FaultConfigError",
    "FaultDraw",
    "FaultKind",
    "LocalServer",
    "ServerStats",
    "SessionRecord",
    "SyntheticEngine",
    "WhisperEngine",
    "draw_fault",
    "local_server",
    "make_engine",
]
