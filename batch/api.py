"""The library call: run a job from Python (an orchestrator's task) and read its tables.

`run_job` is a plain synchronous call, `run_job_async` its twin for code already inside an
event loop; both take a manifest (a path, or one `batch.manifest.load_manifest` loaded) and
the options ``pulse-batch run`` takes, and return a `RunResult`. They build on
`batch.job.run_job`, the engine the CLI's ``run`` calls through `run_job_async` too. Errors
come from `batch.errors`' tree: `ManifestError` (bad manifest or options), `LockedError`,
`OutputError`; a run that ends badly (items failed, service refusing, spend cap) is not an
exception but a result with a non-zero ``exit_code``, which `RunResult.check` turns into
`RunFailed`.
"""

from __future__ import annotations

import asyncio
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa

from batch import job as jobs
from batch.errors import ExitCode, ManifestError, RunFailed
from batch.manifest import LoadedManifest, load_manifest
from batch.output import TABLES, OutputReader
from batch.shard import Shard, parse_flag

DRY_RUN = "dry_run"  # RunResult.status of a dry run (the run statuses are batch.model.RunStatus)


@dataclass(frozen=True)
class RunResult:
    """What a run did, as ``pulse-batch run`` prints it and exits with.

    ``status`` is the report's run status (``completed``, ``interrupted``, ``aborted``,
    ``capped``, ``failed_output``) or ``dry_run``. ``ok`` and ``failed`` count this run's
    items; ``skipped`` the items already ok (not streamed again), ``skipped_failed`` those
    that failed before and were left alone (``retry_failed=False``), ``not_run`` those a
    stop left for the next run. ``exit_code`` is the CLI's (`batch.errors.ExitCode`);
    ``report_path`` the JSON report (None for a dry run); ``report`` the report itself.
    """

    status: str
    ok: int
    failed: int
    skipped: int
    skipped_failed: int
    not_run: int
    exit_code: int
    report_path: str | None
    run_id: str | None
    report: dict[str, Any] = field(repr=False)
    signal_name: str | None = None
    nothing_to_do: bool = False  # every item was already done: no new report
    forgotten: int = 0  # items `pulse-batch forget` erased: not transcribed again

    @property
    def succeeded(self) -> bool:
        return self.exit_code == ExitCode.OK

    def check(self) -> RunResult:
        """This result, or `RunFailed` when the exit code is not 0 (for an orchestrator's
        task to fail the way the CLI's exit status would)."""
        if self.succeeded:
            return self
        why = self.report.get("abort_reason") or (
            f"{self.failed} failed, {self.not_run} not run, {self.skipped_failed} failed before"
        )
        where = f"; report: {self.report_path}" if self.report_path else ""
        message = f"run {self.run_id} ended {self.status} (exit {self.exit_code}): {why}{where}"
        raise RunFailed(message, self)


def _options(
    *,
    force: bool,
    retry_failed: bool,
    retry_failed_input: bool,
    dry_run: bool,
    max_failures: int | None,
    max_failure_ratio: float | None,
    max_cost: float | None,
    shard: str | Shard | None,
    grace_s: float,
    handle_signals: bool,
) -> jobs.RunOptions:
    """The engine's options from the call's; raises `ManifestError` for a bad one."""
    if max_failures is not None and max_failure_ratio is not None:
        raise ManifestError("max_failures", "give max_failures or max_failure_ratio, not both")
    if max_failures is not None and max_failures < 0:
        raise ManifestError("max_failures", f"{max_failures} is below 0")
    if max_failure_ratio is not None and not 0.0 <= max_failure_ratio <= 1.0:
        raise ManifestError("max_failure_ratio", f"{max_failure_ratio} is not in 0..1")
    if max_cost is not None and max_cost < 0:
        raise ManifestError("max_cost", f"{max_cost} is below 0")
    return jobs.RunOptions(
        force=force,
        retry_failed=retry_failed,
        retry_failed_input=retry_failed_input,
        dry_run=dry_run,
        handle_signals=handle_signals,
        grace_s=grace_s,
        max_cost=max_cost,
        shard=parse_flag(shard) if isinstance(shard, str) else shard,
    )


def result_of(
    done: jobs.JobResult, *, max_failures: int | None = None, max_failure_ratio: float | None = None
) -> RunResult:
    """The `RunResult` of the engine's `JobResult`, with the exit code the CLI gives. Pure."""
    report = done.report
    items = report["items"]
    if report.get("dry_run"):
        return RunResult(
            DRY_RUN, 0, 0, int(items["already_ok"]), 0, 0, ExitCode.OK, None, None, report
        )
    code = jobs.exit_code(
        report,
        max_failures=max_failures or 0,
        max_failure_ratio=max_failure_ratio,
        signal_name=done.signal_name,
    )
    return RunResult(
        status=str(report["status"]),
        ok=int(items["ok"]),
        failed=int(items["failed"]),
        skipped=int(items["skipped_already_ok"]),
        skipped_failed=int(items["skipped_failed_before"]),
        not_run=int(items["not_run"]),
        exit_code=int(code),
        report_path=done.report_path,
        run_id=report.get("run_id"),
        report=report,
        signal_name=done.signal_name,
        nothing_to_do=done.nothing_to_do,
        forgotten=int(items.get("skipped_forgotten", 0)),
    )


def _loaded(manifest: str | os.PathLike[str] | LoadedManifest) -> LoadedManifest:
    if isinstance(manifest, LoadedManifest):
        return manifest
    return load_manifest(Path(manifest))


async def run_job_async(
    manifest: str | os.PathLike[str] | LoadedManifest,
    *,
    force: bool = False,
    retry_failed: bool = True,
    retry_failed_input: bool = False,
    dry_run: bool = False,
    max_failures: int | None = None,
    max_failure_ratio: float | None = None,
    max_cost: float | None = None,
    shard: str | Shard | None = None,
    grace_s: float = 30.0,
    handle_signals: bool = False,
    observer: jobs.Observer | None = None,
) -> RunResult:
    """Run a job to its end and say what it did; the options are ``pulse-batch run``'s.

    ``shard`` is ``"I/N"`` (or a `Shard`); unlike the CLI, the batch engines' environment
    variables are not read (pass ``batch.shard.from_environment(os.environ)`` for that).
    ``handle_signals`` makes SIGINT/SIGTERM stop the run gracefully (main thread only);
    ``observer`` (a `batch.job.Observer`) hears progress. Raises `ManifestError`,
    `LockedError` or `OutputError`; never prints (it logs to the ``batch`` logger).
    """
    opts = _options(
        force=force,
        retry_failed=retry_failed,
        retry_failed_input=retry_failed_input,
        dry_run=dry_run,
        max_failures=max_failures,
        max_failure_ratio=max_failure_ratio,
        max_cost=max_cost,
        shard=shard,
        grace_s=grace_s,
        handle_signals=handle_signals,
    )
    done = await jobs.run_job(_loaded(manifest), opts, observer)
    return result_of(done, max_failures=max_failures, max_failure_ratio=max_failure_ratio)


def run_job(
    manifest: str | os.PathLike[str] | LoadedManifest,
    *,
    force: bool = False,
    retry_failed: bool = True,
    retry_failed_input: bool = False,
    dry_run: bool = False,
    max_failures: int | None = None,
    max_failure_ratio: float | None = None,
    max_cost: float | None = None,
    shard: str | Shard | None = None,
    grace_s: float = 30.0,
    handle_signals: bool = False,
) -> RunResult:
    """`run_job_async` as a plain blocking call, for code not inside an event loop (an
    Airflow or Dagster task, a script). Raises `ManifestError` when called inside a running
    event loop (await `run_job_async` there), and what `run_job_async` raises."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise ManifestError(
            "batch.run_job", "called inside a running event loop; await batch.run_job_async"
        )
    call = functools.partial(
        run_job_async,
        manifest,
        force=force,
        retry_failed=retry_failed,
        retry_failed_input=retry_failed_input,
        dry_run=dry_run,
        max_failures=max_failures,
        max_failure_ratio=max_failure_ratio,
        max_cost=max_cost,
        shard=shard,
        grace_s=grace_s,
        handle_signals=handle_signals,
    )
    return anyio.run(call)


def read_table(
    output: str | os.PathLike[str],
    table: str,
    *,
    job: str | None = None,
    columns: list[str] | None = None,
    storage_options: dict[str, str] | None = None,
) -> pa.Table:
    """One table of an output (a folder or a URL; Parquet or Delta), of one job if given,
    as a pyarrow Table (``transcripts`` holds one row per item, its latest result; filter
    on ``status``). Empty, with the table's columns, when nothing was written. Raises
    `ManifestError` for an unknown table, `OutputError` when the output cannot be read."""
    if table not in TABLES:
        raise ManifestError("table", f"unknown table {table!r}; the tables are {list(TABLES)}")
    location = os.fspath(output)
    return OutputReader(location, storage_options).table(table, job, columns)
