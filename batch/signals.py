"""SIGINT and SIGTERM while a job streams: the first stops new sessions and gives those in
flight a grace period; the second stops at once. Committed rows are never at risk: commits
are atomic, and what was not committed is redone by the next run."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import anyio

from batch.model import RunStatus
from batch.pool import Pool
from batch.report import RunStats


async def watch_signals(
    pool: Pool[Any],
    scope: anyio.CancelScope,
    grace_s: float,
    stats: RunStats,
    signalled: Callable[[str], None],
) -> None:
    """First SIGINT/SIGTERM: start nothing new in ``pool``, give in-flight items ``grace_s``,
    then cancel ``scope``. Second: cancel it at once. ``signalled`` hears each signal's name;
    ``stats`` records it as the run's interruption."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            stats.status = RunStatus.INTERRUPTED
            stats.abort_reason = f"received {name}"
            stats.signal_name = name
            signalled(name)
            if pool.stopping:
                scope.cancel()
                return
            pool.stop_starting()
            scope_deadline = anyio.current_time() + grace_s
            scope.deadline = min(scope.deadline, scope_deadline)
