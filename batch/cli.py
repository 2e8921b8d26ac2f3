"""The `pulse-batch` command line: parse, call the library, map errors to exit codes.

Exit codes: `batch.errors.ExitCode` (their meanings in ``EXIT_MEANINGS``; ``--help`` shows
them)."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import anyio
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from typer.core import TyperArgument, TyperCommand

from batch import export as exports
from batch import job as jobs
from batch import output as outputs
from batch import score as scoring
from batch import storage
from batch.credentials import RedactingFilter, Scrubber, scrubber_for_env
from batch.decode import WireFormat, probe
from batch.errors import (
    EXIT_MEANINGS,
    ExitCode,
    InputError,
    LockedError,
    ManifestError,
    OutputError,
    exit_code_for,
)
from batch.manifest import LoadedManifest, load_manifest
from batch.model import Item, RunStatus
from batch.output import OutputReader
from batch.plan import expand_sources
from batch.pulse import protocol
from batch.report import (
    accuracy_row,
    render_accuracy,
    render_job,
    render_markdown,
    summary_line,
)
from batch.server.cli import serve
from batch.shard import from_environment as shards_from_environment
from batch.status import job_status


class _PlainCommand(TyperCommand):
    """Usage lines as people write them (``run [OPTIONS] MANIFEST``), not ``{manifest}``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = (param.metavar or param.name or "arg").upper()
                name += "..." if param.nargs != 1 else ""
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        # Arguments by name and help only: no "<list[Path]>" type tags.
        arguments = [
            ((p.metavar or p.name or "").upper(), p.help or "")
            for p in self.get_params(ctx)
            if isinstance(p, TyperArgument)
        ]
        options = [
            record
            for p in self.get_params(ctx)
            if not isinstance(p, TyperArgument) and (record := p.get_help_record(ctx))
        ]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain help: no "<bool>" after every flag, no "{manifest}" in the usage line.
    rich_markup_mode=None,
    help="Batch transcription jobs for the Pulse streaming speech-to-text service.",
    epilog="Exit codes: "
    + "; ".join(f"{code.value} {text}" for code, text in EXIT_MEANINGS.items()),
)
app.command("serve", help="Run the local Pulse-compatible server.", cls=_PlainCommand)(serve)
err = Console(stderr=True, soft_wrap=True)  # a path in a message is never cut
logger = logging.getLogger("batch")


def _label(item: Item) -> str:
    """The item as people know it: its file, and its channel when split."""
    if item.channel_name:
        return f"{item.source} [{item.channel_name}]"
    return item.source if item.channel is None else f"{item.source} [ch{item.channel}]"


def _setup_logging(verbose: bool, secret_env: str | None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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


def _fail(message: object, code: int, label: str = "error") -> NoReturn:
    err.print(f"[red]{label}:[/red] {escape(str(message))}", highlight=False)
    raise typer.Exit(code) from None


@contextmanager
def _exit_codes() -> Iterator[None]:
    """The library's usage, lock and output errors as a message and their exit code (the
    table in `batch.errors`)."""
    try:
        yield
    except (ManifestError, LockedError, OutputError) as exc:
        code = exit_code_for(exc)
        assert code is not None
        _fail(exc, code, "output error" if isinstance(exc, OutputError) else "error")


def _load(manifest: Path) -> LoadedManifest:
    with _exit_codes():
        loaded = load_manifest(manifest)
    return loaded


class _ConsoleObserver(jobs.Observer):
    """A live progress bar on a terminal; plain log lines for cron and CI."""

    def __init__(self, live: bool, console: Console | None = None) -> None:
        self.live = live
        self.console = console or err
        self.done = 0
        self.total = 0
        self.failed = 0
        self.audio_s = 0.0
        self.open = 0
        self.progress: Progress | None = None
        self.task: TaskID | None = None
        self.pieces: dict[str, TaskID] = {}  # a row per long item being streamed in pieces

    def planned(self, items: int, audio_s: float, skipped: int) -> None:
        self.total = items
        logger.info(
            "planned %d item(s), %.1f s of audio; skipping %d already ok", items, audio_s, skipped
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

    def item_done(self, item: Item, ok: bool, audio_s: float, failure: str | None = None) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        self.audio_s += audio_s
        self._drop_pieces(item)
        label = _label(item)
        if self.progress is None:
            if ok:
                logger.info("[%d/%d] ok %s (%.1f s audio)", self.done, self.total, label, audio_s)
            else:
                logger.warning("[%d/%d] failed %s: %s", self.done, self.total, label, failure)
        elif not ok:  # above the bar, as it happens
            self.progress.console.print(
                f"[red]failed[/red] {escape(label)}: {escape(str(failure))}", highlight=False
            )
        self._refresh()

    def pieces_done(self, item: Item, done: int, total: int | None) -> None:
        of = f"{done}/{total}" if total is not None else f"{done}/?"
        if self.progress is None:
            logger.info("%s: piece %s done", _label(item), of)
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
        if self.progress is not None and self.task is not None:
            total = self.progress.tasks[0].total or 0.0
            detail = (
                f"{self.done}/{self.total} items  {self.audio_s:.0f}/{total:.0f} s audio  "
                f"{self.open} open  [red]{self.failed} failed[/red]"
            )
            self.progress.update(self.task, completed=self.audio_s, detail=detail)

    def signalled(self, name: str) -> None:
        logger.warning("%s received: starting no new items, finishing those in flight", name)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


_JobOutput = Annotated[
    str, typer.Argument(help="A job's output (output.path: folder or URL).", metavar="OUTPUT")
]


@app.command(cls=_PlainCommand)
def run(
    manifest: Annotated[Path, typer.Argument(help="Job manifest (YAML).", metavar="MANIFEST")],
    force: Annotated[bool, typer.Option("--force", help="Redo items already ok.")] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="Retry items whose last result failed.")
    ] = True,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="List what would be done and the audio it would bill."),
    ] = False,
    max_failures: Annotated[
        int | None,
        typer.Option(min=0, help="Failed items allowed before the exit code is 1."),
    ] = None,
    max_failure_ratio: Annotated[
        float | None,
        typer.Option(
            min=0.0, max=1.0, help="Or: the share (0-1) of the job's items allowed to fail."
        ),
    ] = None,
    grace_s: Annotated[
        float, typer.Option(help="After SIGINT/SIGTERM, seconds in-flight items may finish.")
    ] = 30.0,
    max_cost: Annotated[
        float | None,
        typer.Option(
            help="Start no session that could take this run's estimated cost past this"
            " (needs output.price_per_minute); exit 7 when reached.",
            min=0.0,
        ),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            help="Run only shard I of N (0-based), e.g. 0/4. Default: from the batch engine's "
            "environment (JOB_COMPLETION_INDEX, AWS_BATCH_JOB_ARRAY_INDEX, SLURM_ARRAY_TASK_ID).",
        ),
    ] = None,
    shards: Annotated[
        int | None,
        typer.Option(
            "--shards",
            help="The shard count N, with JOB_COMPLETION_INDEX (or set PULSE_BATCH_SHARDS).",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run a job: transcribe every input of MANIFEST into Parquet tables and a report."""
    if max_failures is not None and max_failure_ratio is not None:
        raise typer.BadParameter("give --max-failures or --max-failure-ratio, not both")
    with _exit_codes():  # a ShardError is a usage error
        this_shard = shards_from_environment(os.environ, shard, shards)
    loaded = _load(manifest)
    _setup_logging(verbose, loaded.manifest.pulse.api_key_env)
    observer = _ConsoleObserver(live=err.is_terminal and not verbose)
    opts = jobs.RunOptions(
        force=force,
        retry_failed=retry_failed,
        dry_run=dry_run,
        handle_signals=True,
        grace_s=grace_s,
        max_cost=max_cost,
        shard=this_shard,
    )
    try:
        with _exit_codes():
            result = anyio.run(jobs.run_job, loaded, opts, observer)
    except KeyboardInterrupt:  # before streaming began: nothing to commit
        err.print("interrupted while planning; nothing was streamed")
        raise typer.Exit(ExitCode.SIGINT) from None
    finally:
        observer.close()
    if dry_run:
        print(json.dumps(result.report, indent=2))
        return
    report = result.report
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
    raise typer.Exit(
        jobs.exit_code(
            report,
            max_failures=max_failures or 0,
            max_failure_ratio=max_failure_ratio,
            signal_name=result.signal_name,
        )
    )


@app.command(cls=_PlainCommand)
def validate(
    manifest: Annotated[Path, typer.Argument(help="Job manifest (YAML).", metavar="MANIFEST")],
) -> None:
    """Check a manifest and show what it resolves to, without running anything."""
    loaded = _load(manifest)
    with _exit_codes():
        items = jobs.plan_items(loaded)
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
    for warning in jobs.engine_warnings(loaded, items):
        print(f"  warning: {warning}")
    print(f"  output: {loaded.output_location}")


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


@app.command("probe", cls=_PlainCommand)
def probe_command(
    files: Annotated[
        list[str],
        typer.Argument(help="Media files or URLs (s3://, gs://, https://, ...).", metavar="FILE"),
    ],
    sample_rate: Annotated[int, typer.Option(help="Rate that would be sent.")] = 16000,
    encoding: Annotated[str, typer.Option(help="Encoding that would be sent.")] = "linear16",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what the runner would do with each file: streams, channels, rate, duration."""
    if encoding not in protocol.ENCODINGS:
        raise typer.BadParameter(f"use one of {protocol.ENCODINGS}", param_hint="--encoding")
    if sample_rate not in protocol.SAMPLE_RATES:
        raise typer.BadParameter(f"use one of {protocol.SAMPLE_RATES}", param_hint="--sample-rate")
    wire = WireFormat(encoding, sample_rate)
    if wire.is_opus:
        will_send = f"mono {encoding} at {sample_rate} Hz (20 ms Opus frames)"
    else:
        will_send = (
            f"mono {encoding} at {sample_rate} Hz "
            f"({wire.bytes_per_second} bytes/s, {wire.chunk_bytes}-byte chunks)"
        )
    rows: list[dict[str, Any]] = []
    for path in files:
        try:
            storage.check_url(path)
            info = probe(path)
        except ValueError as exc:  # a URL this installation cannot read
            rows.append({"path": path, "error_kind": "unsupported", "error": str(exc)})
            continue
        except InputError as exc:
            rows.append({"path": str(path), "error_kind": exc.kind, "error": str(exc)})
            continue
        rows.append({**info.__dict__, "will_send": will_send})
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['path']}:")
            for key, value in row.items():
                if key != "path":
                    print(f"  {key}: {value}")
    if any("error_kind" in row for row in rows):
        raise typer.Exit(1)


@app.command(cls=_PlainCommand)
def schema(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="As Markdown tables.")] = False,
) -> None:
    """Print the tables' schema (version, columns, types, meaning)."""
    tables = {
        table: [{"column": n, "type": str(t), "meaning": m} for n, t, m in outputs.COLUMNS[table]]
        for table in outputs.TABLES
    }
    if as_json:
        print(json.dumps({"schema_version": outputs.SCHEMA_VERSION, "tables": tables}, indent=2))
        return
    if markdown:
        for table, columns in tables.items():
            print(f"\n`{table}/`\n\n| column | type | meaning |\n| --- | --- | --- |")
            for col in columns:
                print(f"| `{col['column']}` | {col['type']} | {col['meaning']} |")
        return
    print(
        f"schema version {outputs.SCHEMA_VERSION}; "
        f"partition columns from {outputs.PARTITION_CHOICES}"
    )
    for table, columns in tables.items():
        print(f"\n{table}/")
        for col in columns:
            print(f"  {col['column']:<20} {col['type']:<28} {col['meaning']}")


@app.command(cls=_PlainCommand)
def report(
    output: _JobOutput,
    job: Annotated[
        str | None, typer.Option(help="Job name, when the output holds several.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
) -> None:
    """Print the latest run report of a job, then the job so far: every run and shard, when
    it ran and what it did, and the items by their latest result. Names the job it shows and,
    when the output holds several, lists them."""
    reader = OutputReader(output)
    with _exit_codes():
        jobs_here = reader.job_names()  # inside: an unreadable store is exit 5
        if job is None and len(jobs_here) > 1:
            err.print(
                escape(
                    f"{output} holds {len(jobs_here)} jobs: {', '.join(jobs_here)}; showing the "
                    "one run most recently (pick one with --job)"
                ),
                highlight=False,
            )
        try:
            data = reader.full_report(job)
        except (FileNotFoundError, ManifestError) as exc:
            hint = f" (jobs here: {', '.join(jobs_here)})" if jobs_here else ""
            _fail(f"{exc}{hint}", ExitCode.USAGE)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        err.print(escape(f"job {data['job']}, run {data['run_id']}"), highlight=False)
        print(render_markdown(data) + render_job(data["job_so_far"], data["runs"]))


@app.command("export", cls=_PlainCommand)
def export_command(
    output: _JobOutput,
    job: Annotated[str, typer.Option(help="The job whose items to export.")],
    fmt: Annotated[
        str, typer.Option("--format", help="srt, vtt (subtitles), json (all rows) or txt.")
    ] = "srt",
    to: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the files [default: OUTPUT/_exports/JOB/FORMAT, or "
            "_exports/JOB/FORMAT here for an output at a URL]."
        ),
    ] = None,
    where: Annotated[
        str | None,
        typer.Option(
            help="Only items where col=value[,col!=value...] (transcripts columns or "
            "metadata.KEY), e.g. language=en,metadata.team=sales."
        ),
    ] = None,
    item: Annotated[
        str | None, typer.Option(help="Only the item whose item_id starts with this.")
    ] = None,
    utterances: Annotated[
        bool, typer.Option("--utterances", help="Cue subtitles by utterance, not by word.")
    ] = False,
) -> None:
    """Write one subtitle, JSON or text file per ok item of a job."""
    if where is not None and item is not None:
        raise typer.BadParameter("give --where or --item, not both")
    base = Path("." if "://" in output else output)
    folder = to or base / "_exports" / job / fmt
    with _exit_codes():
        try:
            done = exports.export_job(
                output, job, fmt, folder, where=where, item=item, from_utterances=utterances
            )
        except OSError as exc:
            _fail(f"cannot write to {folder}: {exc.strerror}", ExitCode.OUTPUT)
    for source in done.without_timings:
        what = (
            "utterances (turn on pulse.sentence_timestamps)"
            if utterances
            else "words (no speech, or pulse.word_timestamps was off: try --utterances)"
        )
        err.print(escape(f"warning: {source} has no {what}: its file has no cues"), highlight=False)
    for source, why in done.failed:
        err.print(escape(f"error: {source} could not be exported ({why})"), highlight=False)
    print(f"{len(done.files)} {fmt} file(s) in {done.folder}")
    if done.failed:
        raise typer.Exit(ExitCode.ITEMS_FAILED)  # the others were written


@app.command("score", cls=_PlainCommand)
def score_command(
    output: _JobOutput,
    job: Annotated[str, typer.Option(help="The job to score.")],
    references: Annotated[
        Path,
        typer.Option(
            help="CSV or JSONL list: path (as the job listed it) and reference or reference_path."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """WER and CER of a job's ok items against references given after the run."""
    with _exit_codes():
        scored = scoring.score_job(output, job, references)
    for problem in scored.problems:
        err.print(escape(f"warning: not scored: {problem}"), highlight=False)
    if scored.unmatched:
        err.print(
            escape(f"note: {scored.unmatched} ok item(s) have no reference in {references}"),
            highlight=False,
        )
    body = {"job": job, "accuracy": scored.summary, "items": scored.items}
    if as_json:
        print(json.dumps(body, indent=2))
        return
    if scored.summary is None:
        _fail(f"no ok item of job {job!r} matched {references}", ExitCode.ITEMS_FAILED)
    print("\n".join(render_accuracy(scored.summary, worst=False)))
    print("\nItems, worst first:\n\n| source | channel | WER | CER |\n| --- | --- | ---: | ---: |")
    ranked = sorted(scored.items, key=lambda r: -(r["wer"] if r["wer"] is not None else -1.0))
    for row in ranked:
        print(accuracy_row(row))


@app.command(cls=_PlainCommand)
def status(
    output: _JobOutput,
    job: Annotated[str, typer.Option(help="Job name.")],
    manifest: Annotated[
        Path | None,
        typer.Option(help="The job's manifest; default: the one its latest run recorded."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Exit 0 only when every planned item of the job's manifest is ok (all shards)."""
    with _exit_codes():
        result = job_status(output, job, manifest)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        word = "complete" if result.complete else "incomplete"
        total = result.total
        print(
            f"job {job}: {word}: {total.ok}/{total.planned} planned item(s) ok, "
            f"{total.failed} failed, {total.not_run} not run yet ({result.manifest})"
        )
        for index, part in result.by_shard.items():
            print(
                f"  shard {index}/{result.shards}: {part.ok}/{part.planned} ok, "
                f"{part.failed} failed, {part.not_run} not run yet"
            )
        for problem in result.problems():
            print(f"  {problem}")
    raise typer.Exit(ExitCode.OK if result.complete else ExitCode.ITEMS_FAILED)


@app.command(cls=_PlainCommand)
def compact(
    output: Annotated[str, typer.Argument(help="An output (output.path: folder or URL).")],
) -> None:
    """Compact a Delta output: rewrite small files into large ones (optimize), then delete
    files no table version needs (vacuum, keeping the default 7 days of history)."""
    with _exit_codes():
        lines = OutputReader(output).compact()
    for line in lines:
        print(line)


def main() -> None:
    app()
