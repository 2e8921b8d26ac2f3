"""Run a whole job: plan, stream through a bounded pool, collect, commit, report.

`run_job` is the library entry point the CLI calls; it never prints. Exit codes are decided
by `exit_code`, a pure function of the report.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pyarrow as pa

from batch.attempts import Unit
from batch.budget import SpendCap
from batch.credentials import api_key_from_env
from batch.dryrun import dry_run_report
from batch.errors import (
    ExitCode,
    HandshakeRejected,
    JobAborted,
    ManifestError,
    OutputError,
    ServiceRefusing,
    ServiceUnreachable,
)
from batch.manifest import LoadedManifest
from batch.model import Item, RunStatus
from batch.output import JobOutput, OutputReader, RunWriter, latest_ok
from batch.plan import expand_sources, longest_first, make_items
from batch.pool import Pool
from batch.pulse.protocol import Generation
from batch.report import RunStats, build_report, failing_items
from batch.runner import ItemRunner, whole_units
from batch.score import summarise
from batch.session import Endpoint
from batch.settled import local_changed_at, settled_failures
from batch.shard import Shard
from batch.signals import watch_signals

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    force: bool = False  # redo items already ok
    retry_failed: bool = True  # redo items whose latest result failed
    # ...even those whose input failed to decode and has not changed since (batch.settled)
    retry_failed_input: bool = False
    dry_run: bool = False
    handle_signals: bool = False  # SIGINT/SIGTERM: stop starting, finish, commit
    grace_s: float = 30.0  # in-flight items get this long after the first signal
    max_cost: float | None = None  # in output.currency; with run.max_billed_minutes
    shard: Shard | None = None  # this process runs only this shard's items


class Observer:
    """Progress callbacks; the CLI draws them. The default does nothing."""

    def started(self, stats: RunStats) -> None:
        """The run holds its output; ``stats`` fill in as it goes (read, never written)."""

    def planned(self, items: int, audio_s: float, skipped: int) -> None: ...

    def item_done(self, item: Item, ok: bool, audio_s: float, failure: str | None = None) -> None:
        """``failure`` is ``"<error_kind>: <message>"`` for a failed item."""

    def pieces_done(self, item: Item, done: int, total: int | None) -> None:
        """A long item's progress: pieces finished, of ``total`` (None while still cutting)."""

    def sessions_open(self, count: int) -> None: ...

    def audio_sent(self, item: Item, seconds: float) -> None:
        """``seconds`` more of ``item`` sent (fewer: a failed attempt's taken back); a few
        times a second per session, possibly from a reading thread."""

    def signalled(self, name: str) -> None: ...


@dataclass
class JobResult:
    report: dict[str, Any]
    report_path: str | None
    signal_name: str | None = None
    nothing_to_do: bool = False  # every item was already done: no report written


def new_run_id(started: datetime) -> str:
    return f"{started:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _remote(loaded: LoadedManifest) -> tuple[Endpoint, str | None] | None:
    """The service's endpoint and API key (None for the embedded server). Raises
    `ManifestError` for a missing or unusable key: called before planning, so a forgotten
    `export` fails at once, not after every file was probed."""
    pulse = loaded.manifest.pulse
    if pulse.endpoint == "local":
        return None
    endpoint = Endpoint.resolve(pulse.endpoint, pulse.protocol)  # checked by the manifest
    # A loopback server (`pulse-batch serve`) may run without a key; the service never.
    required = not endpoint.is_loopback
    key = api_key_from_env(pulse.api_key_env, required=required)
    if key and any(key in value for value in pulse.extra_params.values()):
        # Query strings end up in proxies' logs: the key goes in the header only.
        raise ManifestError(
            "pulse.extra_params", "a value holds the API key; remove it (it is sent anyway)"
        )
    return endpoint, key


def key_warnings(loaded: LoadedManifest) -> list[str]:
    """What ``run`` would refuse about the API key (unset, unusable), as warnings for
    ``validate``: a manifest is valid before the key is exported, but not runnable."""
    try:
        _remote(loaded)
    except ManifestError as exc:
        return [f"{exc} (run refuses to start until then)"]
    return []


@contextlib.asynccontextmanager
async def _endpoint(loaded: LoadedManifest) -> AsyncIterator[tuple[Endpoint, str | None]]:
    remote = _remote(loaded)
    if remote is not None:
        yield remote
        return
    pulse = loaded.manifest.pulse
    from batch.server import EngineUnavailable, local_server, make_engine  # only when asked for

    try:
        engine = make_engine(pulse.local_engine)
    except EngineUnavailable as exc:
        raise ManifestError("pulse.local_engine", str(exc)) from None
    async with local_server(engine=engine) as server:
        generation = Generation.LEGACY if pulse.protocol == "auto" else Generation(pulse.protocol)
        yield Endpoint(server.url_for(generation), generation), None


def spend_cap(loaded: LoadedManifest, opts: RunOptions) -> SpendCap:
    """The run's cap from run.max_billed_minutes and --max-cost; raises `ManifestError`
    for a cost cap without a price."""
    output = loaded.manifest.output
    try:
        return SpendCap.from_limits(
            loaded.manifest.run.max_billed_minutes, opts.max_cost, output.price_per_minute
        )
    except ValueError as exc:
        raise ManifestError(
            "--max-cost", f"{exc}; set output.price_per_minute in the manifest"
        ) from None


def engine_warnings(loaded: LoadedManifest, items: list[Item]) -> list[str]:
    """What the embedded local engine cannot do of what this job asks (empty for a real
    endpoint): said once per job, never faked (see `batch.server.limits`)."""
    pulse = loaded.manifest.pulse
    if pulse.endpoint != "local":
        return []
    from batch.server.limits import engine_limits

    options = [pulse.options(), *(i.options for i in items if i.error is None)]
    return engine_limits(pulse.local_engine, options)


def plan_items(
    loaded: LoadedManifest, done: frozenset[str] = frozenset(), shard: Shard | None = None
) -> list[Item]:
    """Every item of the manifest (of ``shard``'s slice, if given), in the order they should
    start; items in ``done`` (already ok) are listed without probing their files."""
    wanted = shard.owns if shard is not None else None
    items = make_items(expand_sources(loaded), loaded, done=done, wanted=wanted)
    return longest_first(items) if loaded.manifest.run.order == "longest_first" else items


_FAILURE_COLUMNS = ["item_id", "source", "status", "error_kind", "finished_at"]


def _left_alone(failed: frozenset[str], opts: RunOptions, read: Callable[[], pa.Table]) -> set[str]:
    """The failed items this run does not redo: all of them with ``retry_failed`` off;
    else those whose input would fail the same way again (`batch.settled`), unless
    ``retry_failed_input``. ``read`` reads the job's transcripts (only when needed)."""
    if not opts.retry_failed:
        return set(failed)
    if opts.retry_failed_input or not failed:
        return set()
    return settled_failures(read().to_pylist(), local_changed_at) & failed


def _todo(
    items: list[Item],
    done: set[str],
    opts: RunOptions,
    failed: set[str],
    forgotten: AbstractSet[str] = frozenset(),
) -> list[Item]:
    """The items to stream: with ``--force`` all (forgotten ones too: they come back);
    else those not ok, not forgotten and not in ``failed`` (left alone, `_left_alone`)."""
    if opts.force:
        return items
    skip = done | forgotten | failed
    return [i for i in items if i.item_id not in skip]


async def run_job(
    loaded: LoadedManifest,
    opts: RunOptions = RunOptions(),
    observer: Observer | None = None,
) -> JobResult:
    """Run the manifest's job to the end (or to a fatal answer, or a signal).

    With ``opts.shard``, only that shard's items are run, with its share of
    ``run.concurrency``; shards of one job may run at once into one output.

    Raises `ManifestError` (bad input lists, missing key env, `ShardError`) and `LockedError`.
    """
    observer = observer or Observer()
    manifest = loaded.manifest
    started = datetime.now(UTC)
    shard = opts.shard
    total = manifest.run.concurrency
    stats = RunStats(
        job=manifest.job,
        run_id=new_run_id(started),
        started_at=started,
        concurrency=shard.concurrency(total) if shard is not None else total,
        job_concurrency=total,
        shard=shard.label if shard is not None else None,
        manifest=str(loaded.path.resolve()),
        pace=manifest.run.pace,
        endpoint=manifest.pulse.endpoint,
        price_per_minute=manifest.output.price_per_minute,
        currency=manifest.output.currency,
        skip_silence=manifest.run.skip_silence,
    )
    cap = spend_cap(loaded, opts)
    stats.cap_minutes = None if cap.limit_s is None else round(cap.limit_s / 60, 4)
    if opts.dry_run:
        return _dry_run(loaded, stats, opts)
    _remote(loaded)
    out = manifest.output
    with JobOutput.open(
        loaded.output_location,
        manifest.job,
        out.partition_by,
        out.format,
        out.storage_options,
        shard=shard,
    ) as output:
        observer.started(stats)
        history = output.history()
        done = set(history.ok)
        forgotten = output.forgotten()  # tombstoned by `forget`: not transcribed again
        # Planning lists and probes files (maybe in object storage): off the event loop,
        # which may serve other work (a library caller's, the in-process local server).
        skip = frozenset() if opts.force else frozenset(done | forgotten)
        items = await anyio.to_thread.run_sync(plan_items, loaded, skip, shard)
        if opts.force and forgotten:
            output.unforget(forgotten & {i.item_id for i in items})
            forgotten = output.forgotten()
        stats.items_total = len(items)
        stats.warnings = engine_warnings(loaded, items)
        for warning in stats.warnings:
            logger.warning("%s", warning)
        failed_before = _left_alone(
            history.failed, opts, lambda: output.read_table("transcripts", _FAILURE_COLUMNS)
        )
        todo = _todo(items, done, opts, failed_before, forgotten)
        stats.skipped_forgotten = (
            0 if opts.force else len([i for i in items if i.item_id in forgotten])
        )
        skipped_failed = failed_before - done - forgotten
        stats.skipped_failed = len([i for i in items if i.item_id in skipped_failed])
        stats.skipped_done = len(items) - len(todo) - stats.skipped_failed - stats.skipped_forgotten
        planned_audio_s = sum(i.duration_s or 0 for i in todo if i.error is None)
        stats.planned_audio_s = planned_audio_s
        observer.planned(len(todo), planned_audio_s, stats.skipped_done)
        signal_name = None
        writer: RunWriter | None = None
        try:
            with output.scratch(stats.run_id) as cache_dir:
                async with output.run(
                    stats.run_id,
                    commit_every_items=out.commit_every_items,
                    commit_every_s=out.commit_every_s,
                ) as writer:
                    # A starting report, replaced at the end: a killed run (or shard) still
                    # shows when it ran in `pulse-batch report`.
                    if todo:  # a run with nothing to do leaves no report (see below)
                        output.write_report(build_report(stats), latest=False)
                    signal_name = await _stream_all(
                        loaded, todo, stats, writer, cache_dir, opts, observer, cap
                    )
        except (OutputError, BaseExceptionGroup) as exc:
            failure = _output_error(exc)
            stats.status = RunStatus.FAILED_OUTPUT
            stats.abort_reason = str(failure)
            if writer is not None and writer.uncommitted:
                stats.abort_reason += (
                    f"; {writer.uncommitted} finished item(s) were not committed and will be "
                    "redone by the next run"
                )
            stats.not_run = len(todo) - stats.ok - stats.failed
            logger.error("%s", failure)
        stats.finished_at = datetime.now(UTC)
        so_far = output.job_so_far() | ({"forgotten": len(forgotten)} if forgotten else {})
        report = build_report(stats, job_so_far=so_far, accuracy=_accuracy(output))
        if not todo:
            # Nothing was streamed: the last real report stays `latest`.
            return JobResult(report, output.latest_report_path(), nothing_to_do=True)
        path = _write_report(output, report)
    return JobResult(report, path, signal_name)


def _accuracy(output: JobOutput) -> dict[str, Any] | None:
    """WER/CER of the job's items, by each item's latest ok result."""
    rows = output.read_table("transcripts")
    return summarise(latest_ok(rows.to_pylist()))


def _output_error(exc: BaseException) -> OutputError:
    """The output error that ended the run; anything else is re-raised as it came."""
    if isinstance(exc, OutputError):
        return exc
    assert isinstance(exc, BaseExceptionGroup)
    found, rest = exc.split(OutputError)
    if found is None or rest is not None:
        raise exc
    first = _first(found)
    assert isinstance(first, OutputError)
    return first


def _first(group: BaseExceptionGroup[Any]) -> BaseException:
    """The first error of a (maybe nested) group."""
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


def _write_report(output: JobOutput, report: dict[str, Any]) -> str | None:
    """Write the report; after an output failure, where it can still be written."""
    try:
        return output.write_report(report)
    except OutputError as exc:
        if report["status"] != RunStatus.FAILED_OUTPUT:
            raise
        logger.error("the report could not be written either: %s", exc)
        return None


def _workers(loaded: LoadedManifest, sessions: int) -> int:
    """Pool workers for ``sessions`` sessions. One more: a long file being cut occupies a
    worker, not a session. With skip_silence, a round more: the next items' speech is found
    (a CPU job) while this round streams, so sessions do not wait for the detector."""
    return sessions * 2 if loaded.manifest.run.skip_silence else sessions + 1


async def _stream_all(
    loaded: LoadedManifest,
    todo: list[Item],
    stats: RunStats,
    writer: RunWriter,
    cache_dir: Path,
    opts: RunOptions,
    observer: Observer,
    cap: SpendCap,
) -> str | None:
    """Stream every item; returns the name of the signal that interrupted the run, if any."""
    pool: Pool[Unit] = Pool(whole_units(todo), _workers(loaded, stats.concurrency))
    signal_name: str | None = None
    if not todo:
        stats.status = RunStatus.COMPLETED
        return None
    async with _endpoint(loaded) as (endpoint, api_key):
        runner = ItemRunner(
            loaded, stats, writer, endpoint, api_key, observer, pool, cache_dir, cap
        )
        deadline = loaded.manifest.run.job_deadline_s
        fatal: BaseException | None = None
        try:
            async with anyio.create_task_group() as tasks:
                if opts.handle_signals:
                    watch = (pool, tasks.cancel_scope, opts.grace_s, stats, observer.signalled)
                    tasks.start_soon(watch_signals, *watch)
                with anyio.move_on_after(deadline if deadline else float("inf")) as scope:
                    await pool.run(runner.process)
                if scope.cancelled_caught:
                    stats.status = RunStatus.INTERRUPTED
                    stats.abort_reason = f"job_deadline_s ({deadline:g} s) ran out"
                tasks.cancel_scope.cancel()
        except* JobAborted as aborted:  # anything raised beside it still propagates
            first = _first(aborted)
            fatal = first.__cause__ or first  # the service's answer
        if fatal is None and stats.status == RunStatus.RUNNING:
            fatal = runner.sessions.unreachable()  # a small job, every attempt unconnected
        if fatal is not None:
            stats.status = RunStatus.ABORTED
            stats.abort_reason = runner.scrubber.scrub(str(fatal)) + _key_hint(
                fatal, api_key, loaded
            )
            stats.abort_kind = _abort_kind(fatal)
        elif stats.status == RunStatus.RUNNING:
            stats.status = RunStatus.COMPLETED
        signal_name = stats.signal_name
        stats.max_open_sessions = runner.limit.max_open
        stats.lowest_pool_size = runner.limit.lowest
    stats.not_run = len(todo) - stats.ok - stats.failed
    left = [i for i in todo if i.item_id not in runner.finished]
    stats.left_items = len(left)
    stats.left_audio_s = sum(i.duration_s or 0.0 for i in left)
    return signal_name


def _abort_kind(fatal: BaseException) -> str:
    if isinstance(fatal, ServiceUnreachable):
        return "service_unreachable"
    return "service_refusing" if isinstance(fatal, ServiceRefusing) else "fatal_answer"


def _key_hint(error: BaseException, api_key: str | None, loaded: LoadedManifest) -> str:
    """A 401 while no key was sent: say which variable is unset (a loopback server may
    run without a key, so its absence was not an error before the first session)."""
    if isinstance(error, HandshakeRejected) and error.status == 401 and api_key is None:
        name = loaded.manifest.pulse.api_key_env
        return f" (no key was sent: environment variable {name} is not set; export it)"
    return ""


def _dry_run(loaded: LoadedManifest, stats: RunStats, opts: RunOptions) -> JobResult:
    """What ``run`` with the same options would stream and bill (``--force`` and
    ``--no-retry-failed`` included), opening no session."""
    out = loaded.manifest.output
    reader = OutputReader(loaded.output_location, out.storage_options)
    history = reader.history(loaded.manifest.job)
    done = set(history.ok)
    forgotten = reader.forgotten(loaded.manifest.job)
    failed_before = _left_alone(
        history.failed,
        opts,
        lambda: reader.table("transcripts", loaded.manifest.job, _FAILURE_COLUMNS),
    )
    skip = frozenset() if opts.force else frozenset(done | forgotten)
    items = plan_items(loaded, skip, opts.shard)
    chosen = {i.item_id for i in _todo(items, done, opts, failed_before, forgotten)}
    return JobResult(dry_run_report(loaded, stats, items, done, chosen, forgotten), None)


def exit_code(
    report: dict[str, Any],
    *,
    max_failures: int = 0,
    max_failure_ratio: float | None = None,
    signal_name: str | None = None,
) -> int:
    """0 when every item is ok (or failures are within the allowance), 1 otherwise;
    3 for a fatal service answer; 5 when the output could not be written; 6 when the
    service refused everything or could not be reached; 130/143 after SIGINT/SIGTERM."""
    if report.get("status") == RunStatus.FAILED_OUTPUT:
        return ExitCode.OUTPUT
    if signal_name == "SIGINT":
        return ExitCode.SIGINT
    if signal_name == "SIGTERM":
        return ExitCode.SIGTERM
    if report.get("status") == RunStatus.ABORTED:
        if report.get("abort_kind") in ("service_refusing", "service_unreachable"):
            return ExitCode.SERVICE_REFUSING
        return ExitCode.FATAL_SERVICE
    if report.get("status") == RunStatus.CAPPED:
        return ExitCode.SPEND_CAP
    items = report["items"]
    # Failed items a --no-retry-failed rerun left alone are still failures of the job; the
    # summary line's `failing` is this same count.
    failed = failing_items(report)
    if max_failure_ratio is not None:  # a share of all the job's items, skipped ones included
        share = failed / max(1, int(items["total"]))
        return ExitCode.OK if share <= max_failure_ratio else ExitCode.ITEMS_FAILED
    return ExitCode.OK if failed <= max_failures else ExitCode.ITEMS_FAILED
