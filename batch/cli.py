"""The `pulse-batch` command line: parse, call the library, map errors to exit codes.

Exit codes: `batch.errors.ExitCode` (their meanings in ``EXIT_MEANINGS``; ``--help`` shows
them)."""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer
from rich.markup import escape

from batch import api, cli_exits, console, observe, storage
from batch import export as exports
from batch import job as jobs
from batch import score as scoring
from batch.cli_exits import exit_codes, fail
from batch.cli_shape import Group, PlainCommand
from batch.decode import WireFormat, probe
from batch.errors import (
    ExitCode,
    InputError,
    ManifestError,
)
from batch.forget_command import forget_command
from batch.html_report import render_html
from batch.logjson import LogFormat
from batch.manifest import LoadedManifest, load_manifest
from batch.metrics import MetricsPublisher
from batch.output import OutputReader
from batch.pulse import protocol
from batch.server.cli import serve
from batch.shard import from_environment as shards_from_environment
from batch.status import job_status
from batch.version import __version__

app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    # Plain help: no "<bool>" after every flag, no "{manifest}" in the usage line.
    rich_markup_mode=None,
    help="Batch transcription jobs for the Pulse streaming speech-to-text service.",
    epilog=cli_exits.EPILOG,
)
logger = logging.getLogger("batch")


def _show_version(wanted: bool) -> None:
    if wanted:
        print(f"pulse-batch {__version__}")
        raise typer.Exit(ExitCode.OK)


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Batch transcription jobs for the Pulse streaming speech-to-text service."""


def _load(manifest: Path) -> LoadedManifest:
    with exit_codes():
        loaded = load_manifest(manifest)
    return loaded


_JobOutput = Annotated[
    str, typer.Argument(help="A job's output (output.path: folder or URL).", metavar="OUTPUT")
]
_JobName = Annotated[
    str | None, typer.Option(help="The job (default: the only one the output holds).")
]


def _the_job(output: str, job: str | None) -> str:
    """``job``, or the only job ``output`` holds; a usage error naming them otherwise."""
    if job is not None:
        return job
    with exit_codes():  # an unreadable store is exit 5
        names = OutputReader(output).job_names()
    if len(names) == 1:
        return names[0]
    held = f"{len(names)} jobs: {', '.join(names)}" if names else "no job"
    fail(f"{output} holds {held}; name one with --job", ExitCode.USAGE)


@app.command(cls=PlainCommand, epilog=cli_exits.EPILOG)
def run(
    manifest: Annotated[Path, typer.Argument(help="Job manifest (YAML).", metavar="MANIFEST")],
    force: Annotated[bool, typer.Option("--force", help="Redo items already ok.")] = False,
    retry_failed: Annotated[
        bool, typer.Option(help="Retry items whose last result failed.")
    ] = True,
    retry_failed_input: Annotated[
        bool, typer.Option("--retry-failed-input", help="Retry unchanged undecodable files too.")
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="List what would be done and the audio it would bill."),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="Print the run's JSON report (with --dry-run: the plan) on stdout."
        ),
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
    metrics_file: Annotated[
        Path | None,
        typer.Option(
            help="Write Prometheus metrics here (textfile collector format), refreshed every "
            "few seconds and at the end."
        ),
    ] = None,
    metrics_push: Annotated[
        str | None,
        typer.Option(
            help="Push the same metrics to this Prometheus Pushgateway URL, grouped by job "
            "and shard."
        ),
    ] = None,
    log_format: LogFormat = "text",
) -> None:
    """Run a job: transcribe every input of MANIFEST into Parquet tables and a report."""
    if max_failures is not None and max_failure_ratio is not None:
        raise typer.BadParameter("give --max-failures or --max-failure-ratio, not both")
    with exit_codes():  # a ShardError is a usage error
        this_shard = shards_from_environment(os.environ, shard, shards)
    loaded = _load(manifest)
    console.setup_logging(verbose, loaded.manifest.pulse.api_key_env)
    display = console.ConsoleObserver(cli_exits.err.is_terminal and not verbose, cli_exits.err)
    observer = observe.ObservedRun(display, MetricsPublisher(metrics_file, metrics_push))
    call = functools.partial(
        api.run_job_async,
        loaded,
        force=force,
        retry_failed=retry_failed,
        retry_failed_input=retry_failed_input,
        dry_run=dry_run,
        max_failures=max_failures,
        max_failure_ratio=max_failure_ratio,
        max_cost=max_cost,
        shard=this_shard,
        grace_s=grace_s,
        handle_signals=True,
        observer=observer,
    )
    try:
        with exit_codes():
            result = anyio.run(call)
    except KeyboardInterrupt:  # before streaming began: nothing to commit
        cli_exits.err.print("interrupted while planning; nothing was streamed")
        raise typer.Exit(ExitCode.SIGINT) from None
    finally:
        display.close()
        observer.close()
    if dry_run:
        console.show_dry_run(result.report, loaded.manifest, as_json)
        return
    console.show_run(result, cli_exits.err, as_json)
    observer.finish(result.report, result.exit_code)
    raise typer.Exit(result.exit_code)


@app.command(cls=PlainCommand)
def validate(
    manifest: Annotated[Path, typer.Argument(help="Job manifest (YAML).", metavar="MANIFEST")],
    log_format: LogFormat = "text",
) -> None:
    """Check a manifest and show what it resolves to, without running anything."""
    loaded = _load(manifest)
    with exit_codes():
        items = jobs.plan_items(loaded)
    warnings = jobs.key_warnings(loaded) + jobs.engine_warnings(loaded, items)
    console.show_plan(manifest, loaded, items, warnings)


@app.command("probe", cls=PlainCommand)
def probe_command(
    files: Annotated[
        list[str],
        typer.Argument(help="Media files or URLs (s3://, gs://, https://, ...).", metavar="FILE"),
    ],
    sample_rate: Annotated[int, typer.Option(help="Rate that would be sent.")] = 16000,
    encoding: Annotated[str, typer.Option(help="Encoding that would be sent.")] = "linear16",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    log_format: LogFormat = "text",
) -> None:
    """Show what the runner would do with each file: streams, channels, rate, duration."""
    if encoding not in protocol.ENCODINGS:
        raise typer.BadParameter(f"use one of {protocol.ENCODINGS}", param_hint="--encoding")
    if sample_rate not in protocol.SAMPLE_RATES:
        raise typer.BadParameter(f"use one of {protocol.SAMPLE_RATES}", param_hint="--sample-rate")
    will_send = console.will_send(WireFormat(encoding, sample_rate))
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
    console.show_rows(rows, as_json)
    if any("error_kind" in row for row in rows):
        raise typer.Exit(ExitCode.ITEMS_FAILED)


@app.command(cls=PlainCommand)
def schema(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="As Markdown tables.")] = False,
    log_format: LogFormat = "text",
) -> None:
    """Print the tables' schema (version, columns, types, meaning)."""
    console.show_schema(as_json, markdown)


@app.command(cls=PlainCommand)
def report(
    output: _JobOutput,
    job: Annotated[
        str | None, typer.Option(help="Job name, when the output holds several.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
    run_id: Annotated[
        str | None, typer.Option("--run", help="A past run's report (its run_id), not the latest.")
    ] = None,
    html: Annotated[
        Path | None, typer.Option(help="Also write the report as one HTML page to this file.")
    ] = None,
    log_format: LogFormat = "text",
) -> None:
    """Print the latest run report of a job, then the job so far: every run and shard, when
    it ran and what it did, and the items by their latest result. Names the job it shows and,
    when the output holds several, lists them."""
    reader = OutputReader(output)
    with exit_codes():
        jobs_here = reader.job_names()  # inside: an unreadable store is exit 5
        if job is None and len(jobs_here) > 1:
            cli_exits.err.print(
                escape(
                    f"{output} holds {len(jobs_here)} jobs: {', '.join(jobs_here)}; showing the "
                    "one run most recently (pick one with --job)"
                ),
                highlight=False,
            )
        try:
            data = reader.full_report(job)
            if run_id is not None:
                data = observe.past_run(data, reader.run_reports(str(data["job"])), run_id)
        except (FileNotFoundError, ManifestError) as exc:
            hint = f" (jobs here: {', '.join(jobs_here)})" if jobs_here else ""
            fail(f"{exc}{hint}", ExitCode.USAGE)
    if html is not None:
        try:
            html.write_text(render_html(data), encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {html}: {exc.strerror}", ExitCode.OUTPUT, "output error")
        cli_exits.err.print(escape(f"html report: {html}"), highlight=False)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        cli_exits.err.print(escape(f"job {data['job']}, run {data['run_id']}"), highlight=False)
        console.show_report(data)


@app.command("export", cls=PlainCommand)
def export_command(
    output: _JobOutput,
    job: _JobName = None,
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
    log_format: LogFormat = "text",
) -> None:
    """Write one subtitle, JSON or text file per ok item of a job."""
    if where is not None and item is not None:
        raise typer.BadParameter("give --where or --item, not both")
    job = _the_job(output, job)
    base = Path("." if "://" in output else output)
    folder = to or base / "_exports" / job / fmt
    with exit_codes():
        try:
            done = exports.export_job(
                output, job, fmt, folder, where=where, item=item, from_utterances=utterances
            )
        except OSError as exc:
            fail(f"cannot write to {folder}: {exc.strerror}", ExitCode.OUTPUT)
    for source in done.without_timings:
        what = (
            "utterances (turn on pulse.sentence_timestamps)"
            if utterances
            else "words (no speech, or pulse.word_timestamps was off: try --utterances)"
        )
        cli_exits.err.print(
            escape(f"warning: {source} has no {what}: its file has no cues"), highlight=False
        )
    for source, why in done.failed:
        cli_exits.err.print(
            escape(f"error: {source} could not be exported ({why})"), highlight=False
        )
    print(f"{len(done.files)} {fmt} file(s) in {done.folder}")
    if done.failed:
        raise typer.Exit(ExitCode.ITEMS_FAILED)  # the others were written


@app.command("score", cls=PlainCommand)
def score_command(
    output: _JobOutput,
    references: Annotated[
        Path,
        typer.Option(
            help="CSV or JSONL list: path (as the job listed it) and reference or reference_path."
        ),
    ],
    job: _JobName = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    log_format: LogFormat = "text",
) -> None:
    """WER and CER of a job's ok items against references given after the run."""
    job = _the_job(output, job)
    with exit_codes():
        scored = scoring.score_job(output, job, references)
    for problem in scored.problems:
        cli_exits.err.print(escape(f"warning: not scored: {problem}"), highlight=False)
    if scored.unmatched:
        cli_exits.err.print(
            escape(f"note: {scored.unmatched} ok item(s) have no reference in {references}"),
            highlight=False,
        )
    body = {"job": job, "accuracy": scored.summary, "items": scored.items}
    if as_json:
        print(json.dumps(body, indent=2))
    if scored.summary is None:  # exit 1 with --json too: nothing was scored
        fail(f"no ok item of job {job!r} matched {references}", ExitCode.ITEMS_FAILED)
    if not as_json:
        console.show_scores(scored)


@app.command(cls=PlainCommand)
def status(
    output: _JobOutput,
    job: _JobName = None,
    manifest: Annotated[
        Path | None,
        typer.Option(help="The job's manifest; default: the one its latest run recorded."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    log_format: LogFormat = "text",
) -> None:
    """Exit 0 only when every planned item of the job's manifest is ok (all shards)."""
    job = _the_job(output, job)
    with exit_codes():
        result = job_status(output, job, manifest)
    if as_json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        console.show_status(job, result)
    raise typer.Exit(ExitCode.OK if result.complete else ExitCode.ITEMS_FAILED)


@app.command(cls=PlainCommand)
def compact(
    output: Annotated[str, typer.Argument(help="An output (output.path: folder or URL).")],
    log_format: LogFormat = "text",
) -> None:
    """Compact a Delta output: rewrite small files into large ones (optimize), then delete
    files no table version needs (vacuum, keeping the default 7 days of history)."""
    with exit_codes():
        lines = OutputReader(output).compact()
    for line in lines:
        print(line)


# Registered last, so `--help` lists the everyday commands first.
app.command("forget", cls=PlainCommand)(forget_command)
app.command("serve", help="Run the local Pulse-compatible server.", cls=PlainCommand)(serve)


def main() -> None:
    app()
