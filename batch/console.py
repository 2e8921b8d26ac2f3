"""What the command line prints: progress, a run's outcome, plans, probes, schema, scores and
status. Formatting only: every figure comes from a library call the CLI made.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from batch import logjson, observe, storage
from batch.api import RunResult
from batch.credentials import RedactingFilter, Scrubber, scrubber_for_env
from batch.decode import WireFormat
from batch.dryrun import render_dry_run
from batch.forget import ForgetResult
from batch.job import Observer
from batch.manifest import LoadedManifest, Manifest
from batch.model import Item, RunStatus
from batch.output import COLUMNS, PARTITION_CHOICES, SCHEMA_VERSION, TABLES
from batch.plan import expand_sources
from batch.report import (
    accuracy_row,
    render_accuracy,
    render_job,
    render_markdown,
    summary_line,
)
from batch.score import JobScores
from batch.status import JobStatus

logger = logging.getLogger("batch")


def item_label(item: Item) -> str:
    """The item as people know it: its file, and its channel when split."""
    if item.channel_name:
        return f"{item.source} [{item.channel_name}]"
    return item.source if item.channel is None else f"{item.source} [ch{item.channel}]"


class _Stderr:
    """``sys.stderr`` as it is at each write: while the progress bar is live, rich's proxy,
    which prints each line above the bar (never onto the bar's line)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def setup_logging(verbose: bool, secret_env: str | None) -> None:
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(logjson.formatter())  # text, or JSON lines (--log-format json)
    handler.addFilter(logjson.CONTEXT)  # the run's job, run_id, shard: scrubbed below too
    # The API key and the storage SDKs' secrets by value, and any credential header or
    # token by pattern (a library's debug line must not show them, whatever their source).
    api_key = scrubber_for_env(secret_env)
    storage_secrets = storage.credentials_in_env(os.environ)
    handler.addFilter(RedactingFilter(Scrubber(*api_key.secrets, *storage_secrets)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The embedded server's own chatter is noise in a job's log unless debugging.
    logging.getLogger("batch.server").setLevel(logging.DEBUG if verbose else logging.WARNING)


class ConsoleObserver(Observer):
    """A live progress bar on a terminal; plain log lines for cron and CI."""

    def __init__(self, live: bool, console: Console) -> None:
        self.live = live
        self.console = console
        self.done = 0
        self.total = 0
        self.failed = 0
        self.audio_s = 0.0
        self.open = 0
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.pieces: dict[str, TaskID] = {}  # a row per long item being streamed in pieces
        # Audio sent of items not done yet, by item: the bar moves while a long file streams.
        self.sending: dict[str, float] = {}
        self.lock = threading.RLock()  # `audio_sent` may come from the sessions' reading threads

    def planned(self, items: int, audio_s: float, skipped: int) -> None:
        self.total = items
        logger.info(
            "planned %d item(s), %.1f s of audio; skipping %d already ok",
            items,
            audio_s,
            skipped,
            extra={"event": "run_planned", "audio_s": round(audio_s, 3)},
        )
        if self.live and items:
            # The bar and its ETA follow audio, not item count: one long file is not one tick.
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[detail]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("transcribing", total=max(audio_s, 1e-9), detail="")
            self._refresh()
            self.progress.start()

    def sessions_open(self, count: int) -> None:
        self.open = count
        self._refresh()

    def audio_sent(self, item: Item, seconds: float) -> None:
        with self.lock:
            if seconds < 0 and item.item_id not in self.sending:
                return  # taken back from an item already done (it shared a failed session)
            self.sending[item.item_id] = self.sending.get(item.item_id, 0.0) + seconds
            self._refresh()

    def item_done(self, item: Item, ok: bool, audio_s: float, failure: str | None = None) -> None:
        with self.lock:
            self.done += 1
            self.failed += 0 if ok else 1
            self.audio_s += audio_s
            self.sending.pop(item.item_id, None)
        self._drop_pieces(item)
        name = item_label(item)
        if self.progress is None:
            fields = observe.item_fields(item, ok, audio_s, failure)
            count = (self.done, self.total, name)
            if ok:
                logger.info("[%d/%d] ok %s (%.1f s audio)", *count, audio_s, extra=fields)
            else:
                logger.warning("[%d/%d] failed %s: %s", *count, failure, extra=fields)
        elif not ok:  # above the bar, as it happens
            self.progress.console.print(
                f"[red]failed[/red] {escape(name)}: {escape(str(failure))}", highlight=False
            )
        self._refresh()

    def pieces_done(self, item: Item, done: int, total: int | None) -> None:
        of = f"{done}/{total}" if total is not None else f"{done}/?"
        if self.progress is None:
            fields = {"event": "item_pieces_done", "item_id": item.item_id, "source": item.source}
            logger.info("%s: piece %s done", item_label(item), of, extra=fields)
            return
        # A row of its own under the main bar while a long item streams in pieces.
        task = self.pieces.get(item.item_id)
        detail = f"{of} pieces"
        if task is None:
            name = f"  {Path(item.source).name}"
            task = self.progress.add_task(name, total=total, completed=done, detail=detail)
            self.pieces[item.item_id] = task
        else:
            self.progress.update(task, total=total, completed=done, detail=detail)

    def _drop_pieces(self, item: Item) -> None:
        task = self.pieces.pop(item.item_id, None)
        if task is not None and self.progress is not None:
            self.progress.remove_task(task)

    def _refresh(self) -> None:
        with self.lock:
            self._draw()

    def _draw(self) -> None:
        if self.progress is not None and self.task is not None:
            total = self.progress.tasks[0].total or 0.0
            # Never past the total: audio sent is read a little ahead of the wire.
            counted = min(total, self.audio_s + max(0.0, sum(self.sending.values())))
            detail = (
                f"{self.done}/{self.total} items  {counted:.0f}/{total:.0f} s audio  "
                f"{self.open} open  [red]{self.failed} failed[/red]"
            )
            self.progress.update(self.task, completed=counted, detail=detail)

    def signalled(self, name: str) -> None:
        logger.warning(
            "%s received: starting no new items, finishing those in flight",
            name,
            extra={"event": "signal_received"},
        )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


_SHOWN_PER_INPUT = 3


def _show_input(loaded: LoadedManifest, number: int, entry: Any) -> None:
    """One input entry: what it is, how many files it resolves to, and the first few."""
    kind = next(k for k in ("glob", "path", "list") if hasattr(entry, k))
    one = loaded.manifest.model_copy(update={"inputs": [entry]})
    sources = expand_sources(loaded.model_copy(update={"manifest": one}))
    print(f"  inputs[{number}] {kind} {getattr(entry, kind)!r}: {len(sources)} file(s)")
    for source in sources[:_SHOWN_PER_INPUT]:
        print(f"    {source.path}")
    if len(sources) > _SHOWN_PER_INPUT:
        print(f"    ... and {len(sources) - _SHOWN_PER_INPUT} more")


def show_run(result: RunResult, err: Console, as_json: bool = False) -> None:
    """A run's outcome: why it stopped (on ``err``), where its report is, and the summary
    line; with ``as_json`` the report as JSON on stdout, the lines for people on ``err``."""
    report = result.report
    if as_json:
        print(json.dumps(report, indent=2))
        with contextlib.redirect_stdout(sys.stderr):
            show_run(result, err)
        return
    if result.nothing_to_do:
        items = report["items"]
        print(
            f"nothing to do: all {items['total']} item(s) of job {report['job']} are already "
            "done (ok, or failed and left alone); --force redoes them"
        )
        if result.report_path is not None:
            print(f"latest report (unchanged): {result.report_path.removesuffix('.json')}.md")
    elif report["status"] == RunStatus.ABORTED:
        err.print(f"[red]job stopped:[/red] {escape(str(report['abort_reason']))}", highlight=False)
    if report["status"] == RunStatus.CAPPED:
        left = report["left"]
        err.print(
            f"[yellow]stopped:[/yellow] {escape(str(report['abort_reason']))}; left"
            f" for the next run: {left['items']} item(s), {left['audio_s']} s of audio",
            highlight=False,
        )
    if report["status"] == RunStatus.FAILED_OUTPUT:
        reason = escape(str(report["abort_reason"]))
        err.print(f"[red]output error:[/red] {reason}", highlight=False)
    if result.report_path is not None:
        print(f"report: {result.report_path}")
        print(f"        {result.report_path.removesuffix('.json')}.md")
    print(summary_line(report))


def show_dry_run(report: dict[str, Any], manifest: Manifest, as_json: bool) -> None:
    """``run --dry-run``: a summary for people, or the whole plan as JSON."""
    print(json.dumps(report, indent=2) if as_json else render_dry_run(report, manifest))


def show_report(data: dict[str, Any]) -> None:
    """A run report in Markdown, then the job so far (``data`` from
    `OutputReader.full_report`)."""
    # The job so far once: as its own section, not also as the run report's closing line.
    run = {**data, "job_so_far": None}
    print(render_markdown(run) + render_job(data["job_so_far"], data["runs"]))


def show_plan(
    manifest: Path, loaded: LoadedManifest, items: list[Item], warnings: list[str]
) -> None:
    """What ``validate`` found: the job, each input and its first files, the items."""
    bad = [i for i in items if i.error is not None]
    audio_s = sum(i.duration_s or 0 for i in items if i.error is None)
    print(f"{manifest}: valid (job {loaded.manifest.job!r})")
    for number, entry in enumerate(loaded.manifest.inputs):
        _show_input(loaded, number, entry)
    with_refs = len([i for i in items if i.reference is not None])
    print(
        f"  {len(items)} item(s), {audio_s:.1f} s of audio; {len(bad)} known bad"
        + (f"; {with_refs} with a reference (scored)" if with_refs else "")
    )
    for item in bad:
        print(f"  bad: {item.error}")
    for warning in warnings:
        print(f"  warning: {warning}")
    print(f"  output: {loaded.output_location}")


def will_send(wire: WireFormat) -> str:
    """What a session would stream in ``wire``'s format, in words."""
    if wire.is_opus:
        return f"mono {wire.encoding} at {wire.sample_rate} Hz (20 ms Opus frames)"
    return (
        f"mono {wire.encoding} at {wire.sample_rate} Hz "
        f"({wire.bytes_per_second} bytes/s, {wire.chunk_bytes}-byte chunks)"
    )


def show_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    """``probe``'s rows: JSON, or a block per file."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['path']}:")
        for key, value in row.items():
            if key != "path":
                print(f"  {key}: {value}")


def show_schema(as_json: bool, markdown: bool) -> None:
    """The tables' schema: JSON, Markdown tables, or plain columns."""
    tables = {
        table: [{"column": n, "type": str(t), "meaning": m} for n, t, m in COLUMNS[table]]
        for table in TABLES
    }
    if as_json:
        print(json.dumps({"schema_version": SCHEMA_VERSION, "tables": tables}, indent=2))
        return
    if markdown:
        for table, columns in tables.items():
            print(f"\n`{table}/`\n\n| column | type | meaning |\n| --- | --- | --- |")
            for col in columns:
                print(f"| `{col['column']}` | {col['type']} | {col['meaning']} |")
        return
    print(f"schema version {SCHEMA_VERSION}; partition columns from {PARTITION_CHOICES}")
    for table, columns in tables.items():
        print(f"\n{table}/")
        for col in columns:
            print(f"  {col['column']:<20} {col['type']:<28} {col['meaning']}")


def show_scores(scored: JobScores) -> None:
    """``score``'s accuracy tables, worst items first (``scored.summary`` is set)."""
    assert scored.summary is not None
    print("\n".join(render_accuracy(scored.summary, worst=False)))
    print("\nItems, worst first:\n\n| source | channel | WER | CER |\n| --- | --- | ---: | ---: |")
    ranked = sorted(scored.items, key=lambda r: -(r["wer"] if r["wer"] is not None else -1.0))
    for row in ranked:
        print(accuracy_row(row))


def show_status(job: str, result: JobStatus) -> None:
    """``status``: the job's planned items by latest result, per shard, and what is wrong."""
    word = "complete" if result.complete else "incomplete"
    total = result.total
    print(
        f"job {job}: {word}: {total.ok}/{total.planned} planned item(s) ok, "
        f"{total.failed} failed, {total.not_run} not run yet"
        + (f", {total.forgotten} forgotten" if total.forgotten else "")
        + f" ({result.manifest})"
    )
    for index, part in result.by_shard.items():
        print(
            f"  shard {index}/{result.shards}: {part.ok}/{part.planned} ok, "
            f"{part.failed} failed, {part.not_run} not run yet"
        )
    for problem in result.problems():
        print(f"  {problem}")


def show_forget(done: ForgetResult) -> None:
    """``forget``: what went (or, with --dry-run, would go)."""
    verb = "would forget" if done.dry_run else "forgot"
    if not done.items:
        print(f"nothing to forget in job {done.job} ({done.forgotten} item(s) forgotten before)")
        return
    print(f"{verb} {len(done.items)} item(s) of job {done.job}:")
    for gone in done.items:
        print(f"  {gone.item_id}  {gone.status or '-'}  {gone.source}")
    rows = ", ".join(f"{count} {table}" for table, count in done.rows.items())
    print(f"rows: {rows}; exported files: {len(done.exports)}")
    for path in done.exports:
        print(f"  {path}")
    if not done.dry_run:
        print(
            f"{done.forgotten} item(s) of the job forgotten in all; tombstones in {done.tombstones}"
        )
