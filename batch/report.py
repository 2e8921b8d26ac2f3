"""Run reports: JSON for machines, Markdown for people, and the one-line summary.

`RunStats` is filled in as the job runs; `build_report` turns it into a plain dict and
`render_markdown` into text (pure). `batch.output` stores them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from batch.model import RunStatus
from batch.timeline import Timeline

REPORT_VERSION = 1


@dataclass
class Failure:
    item_id: str
    source: str
    kind: str
    message: str


@dataclass
class RunStats:
    job: str
    run_id: str
    started_at: datetime
    concurrency: int
    pace: float
    endpoint: str
    price_per_minute: float = 0.0
    job_concurrency: int | None = None  # run.concurrency; `concurrency` is this shard's share
    shard: str | None = None  # "I/N" when this run is one shard of the job
    manifest: str | None = None  # the manifest's path, for `pulse-batch status`
    finished_at: datetime | None = None
    status: RunStatus = RunStatus.RUNNING
    abort_reason: str | None = None
    abort_kind: str | None = None  # fatal_answer | service_refusing | service_unreachable
    signal_name: str | None = None
    items_total: int = 0
    skipped_done: int = 0
    skipped_failed: int = 0  # failed before, not retried (--no-retry-failed)
    skipped_forgotten: int = 0  # forgotten (`pulse-batch forget`): not transcribed again
    ok: int = 0
    failed: int = 0
    not_run: int = 0
    attempts: int = 0
    retries: int = 0
    retries_by_kind: dict[str, int] = field(default_factory=dict)  # the failure retried
    refused_handshakes: int = 0  # attempts the service refused before opening a session
    audio_s: float = 0.0  # audio of items that ended ok
    streamed_s: float = 0.0  # what was streamed for the items that ended ok
    billed_audio_s: float = 0.0  # every second sent, retries included
    # What the same sessions would have billed streaming the recordings whole.
    billed_unskipped_s: float = 0.0
    skip_silence: bool = False
    currency: str = "USD"
    cap_minutes: float | None = None
    left_items: int = 0  # not run (a spend cap, a deadline or a signal stopped the run)
    left_audio_s: float = 0.0
    busy_session_s: float = 0.0
    max_open_sessions: int = 0
    lowest_pool_size: int = 0
    connect_s: list[float] = field(default_factory=list)
    first_final_s: list[float] = field(default_factory=list)
    end_to_last_s: list[float] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    # What the endpoint was asked for and cannot do (the local engine's limits).
    warnings: list[str] = field(default_factory=list)
    planned_audio_s: float = 0.0  # of the items this run set out to do
    # Each attempt's session slot in time (`batch.timeline`), for the HTML report.
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def wall_s(self) -> float:
        end = self.finished_at or datetime.now(UTC)
        return max(1e-9, (end - self.started_at).total_seconds())


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 by nearest rank; None when there is nothing to measure."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def rank(p: float) -> float:
        return round(ordered[max(0, math.ceil(p * len(ordered)) - 1)], 4)

    return {"p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99)}


def build_report(
    stats: RunStats,
    job_so_far: dict[str, Any] | None = None,
    accuracy: dict[str, Any] | None = None,
    *,
    spans: bool = True,
) -> dict[str, Any]:
    """The report as a plain dict. ``accuracy`` is `batch.score.summarise` of the job's
    latest ok rows (None when no item has a reference). ``spans=False``: the timeline's
    counts only (a live snapshot for metrics)."""
    wall = stats.wall_s
    billed_min = stats.billed_audio_s / 60
    unskipped_min = stats.billed_unskipped_s / 60
    return {
        "report_version": REPORT_VERSION,
        "job": stats.job,
        "run_id": stats.run_id,
        "shard": stats.shard,
        "manifest": stats.manifest,
        "status": stats.status,
        "abort_reason": stats.abort_reason,
        "abort_kind": stats.abort_kind,
        "warnings": list(stats.warnings),
        "endpoint": stats.endpoint,
        "started_at": stats.started_at.isoformat(),
        "finished_at": stats.finished_at.isoformat() if stats.finished_at else None,
        "items": {
            "total": stats.items_total,
            "skipped_already_ok": stats.skipped_done,
            "skipped_failed_before": stats.skipped_failed,
            "skipped_forgotten": stats.skipped_forgotten,
            "ok": stats.ok,
            "failed": stats.failed,
            "not_run": stats.not_run,
        },
        "attempts": stats.attempts,
        "retries": stats.retries,
        "retries_by_kind": dict(sorted(stats.retries_by_kind.items(), key=lambda kv: -kv[1])),
        "refused_handshakes": stats.refused_handshakes,
        "audio_s": round(stats.audio_s, 3),
        "wall_s": round(wall, 3),
        "throughput_x_realtime": round(stats.audio_s / wall, 3),
        "pool": {
            "concurrency": stats.concurrency,
            "job_concurrency": stats.job_concurrency or stats.concurrency,
            "max_open_sessions": stats.max_open_sessions,
            "lowest_pool_size": stats.lowest_pool_size,
            "utilisation": round(stats.busy_session_s / (stats.concurrency * wall), 4),
            "pace": stats.pace,
        },
        "latency_s": {
            "connect": percentiles(stats.connect_s),
            "first_final": percentiles(stats.first_final_s),
            "end_to_last": percentiles(stats.end_to_last_s),
        },
        "audio": {
            "planned_s": round(stats.planned_audio_s, 3),
            "recorded_s": round(stats.audio_s, 3),
            "streamed_s": round(stats.streamed_s, 3),
            "skipped_s": round(max(0.0, stats.audio_s - stats.streamed_s), 3),
            "skip_silence": stats.skip_silence,
        },
        "billing": {
            "billed_audio_minutes": round(billed_min, 4),
            "price_per_minute": stats.price_per_minute,
            "currency": stats.currency,
            "estimated_cost": round(billed_min * stats.price_per_minute, 4),
            "billed_audio_minutes_without_skipping": round(unskipped_min, 4),
            "estimated_cost_without_skipping": round(unskipped_min * stats.price_per_minute, 4),
            "cap_billed_minutes": stats.cap_minutes,
        },
        "left": {"items": stats.left_items, "audio_s": round(stats.left_audio_s, 3)},
        "failures_by_kind": dict(Counter(f.kind for f in stats.failures)),
        "failures": [f.__dict__ for f in stats.failures],
        "job_so_far": job_so_far,
        "accuracy": accuracy,
        "timeline": stats.timeline.as_report() if spans else stats.timeline.counts(),
    }


def failing_items(report: dict[str, Any]) -> int:
    """Items of the job whose latest result is not ok after this run: failed now, not run,
    or failed before and left alone by ``--no-retry-failed``."""
    items = report["items"]
    return int(items["failed"]) + int(items["not_run"]) + int(items["skipped_failed_before"])


def summary_line(report: dict[str, Any]) -> str:
    """One line a log scraper can parse: space-separated key=value pairs."""
    items = report["items"]
    shard = {"shard": report["shard"]} if report.get("shard") else {}
    fields = {
        "job": report["job"],
        "run_id": report["run_id"],
        **shard,
        "status": report["status"],
        "ok": items["ok"],
        "failed": items["failed"],
        "skipped": items["skipped_already_ok"],
        "skipped_failed": items["skipped_failed_before"],
        **({"forgotten": items["skipped_forgotten"]} if items.get("skipped_forgotten") else {}),
        "not_run": items["not_run"],
        # What the exit code counts: failed + not_run + skipped_failed.
        "failing": failing_items(report),
        "retries": report["retries"],
        "audio_s": report["audio_s"],
        "wall_s": report["wall_s"],
        "x_realtime": report["throughput_x_realtime"],
    }
    return "pulse-batch: " + " ".join(f"{k}={v}" for k, v in fields.items())


def _reasons(report: dict[str, Any]) -> str:
    """`` (timeout 2, connection_lost 1)``: what the retries retried, by error kind."""
    kinds = report.get("retries_by_kind") or {}
    return f" ({', '.join(f'{k} {n}' for k, n in kinds.items())})" if kinds else ""


def _share(report: dict[str, Any]) -> str:
    total = report["pool"].get("job_concurrency")
    return f" (this shard's share of {total})" if report.get("shard") and total else ""


def render_markdown(report: dict[str, Any]) -> str:
    items = report["items"]
    pool = report["pool"]
    lat = report["latency_s"]
    lines = [
        f"# pulse-batch report: {report['job']} ({report['run_id']}"
        + (f", shard {report['shard']})" if report.get("shard") else ")"),
        "",
        f"Status: **{report['status']}**"
        + (f" ({report['abort_reason']})" if report["abort_reason"] else ""),
        f"Started {report['started_at']}, finished {report['finished_at']}; endpoint "
        f"`{report['endpoint']}`.",
        "",
        "| items | count |",
        "| --- | ---: |",
        *(f"| {name.replace('_', ' ')} | {count} |" for name, count in items.items()),
        "",
        f"- Audio transcribed: {report['audio_s']} s in {report['wall_s']} s wall "
        f"= **{report['throughput_x_realtime']}x real time**",
        f"- Sessions: {report['attempts']} attempted ({report['refused_handshakes']} refused at"
        f" the handshake), {report['retries']} retries{_reasons(report)}; pool "
        f"{pool['concurrency']} configured{_share(report)}, "
        f"{pool['max_open_sessions']} reached at most, "
        f"lowest size {pool['lowest_pool_size']}, utilisation {pool['utilisation']:.0%}",
        *_money_lines(report),
        "",
        "| latency (s) | p50 | p90 | p99 |",
        "| --- | ---: | ---: | ---: |",
        *(
            f"| {name.replace('_', ' ')} | {_num(v['p50'])} | {_num(v['p90'])} | {_num(v['p99'])} |"
            for name, v in lat.items()
        ),
    ]
    so_far = report.get("job_so_far")
    if so_far:
        lines += [
            "",
            f"Job so far ({so_far['runs_with_rows']} run(s) with rows): {so_far['items']} items,"
            f" {so_far['ok']} ok, "
            f"{so_far['failed']} failed (latest result of each), {so_far['audio_s']} s of audio"
            + (f"; {so_far['forgotten']} forgotten." if so_far.get("forgotten") else "."),
        ]
    if report.get("warnings"):
        lines += ["", "## Warnings", "", *(f"- {warning}" for warning in report["warnings"])]
    if report.get("accuracy"):
        lines += ["", *render_accuracy(report["accuracy"])]
    if report["failures"]:
        lines += ["", "## Failures", "", "| kind | source | message |", "| --- | --- | --- |"]
        for failure in report["failures"]:
            cells = (failure["kind"], md_cell(failure["source"]), md_cell(failure["message"]))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cost(bill: dict[str, Any], key: str) -> str:
    """``, estimated cost 1.2 USD``; nothing when no price is set (a cost of 0 would
    read as free)."""
    if not bill.get("price_per_minute"):
        return ""
    return f", estimated cost {bill[key]} {bill['currency']}"


def _money_lines(report: dict[str, Any]) -> list[str]:
    bill, audio, left = report["billing"], report["audio"], report["left"]
    lines = [
        f"- Recorded audio {audio['recorded_s']} s, streamed {audio['streamed_s']} s, skipped"
        f" {audio['skipped_s']} s" + (" (skip_silence on)" if audio["skip_silence"] else ""),
        f"- Billed audio: {bill['billed_audio_minutes']} min{_cost(bill, 'estimated_cost')};"
        f" streamed whole it would have been {bill['billed_audio_minutes_without_skipping']}"
        f" min{_cost(bill, 'estimated_cost_without_skipping')}",
    ]
    if bill["cap_billed_minutes"] is not None:
        lines.append(f"- Spend cap: {bill['cap_billed_minutes']:g} billed minutes")
    if left["items"]:
        lines.append(
            f"- Left for the next run: {left['items']} item(s), {left['audio_s']} s of audio"
        )
    return lines


def _num(value: Any) -> str:
    return "–" if value is None else str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def render_accuracy(accuracy: dict[str, Any], *, worst: bool = True) -> list[str]:
    """Markdown lines for an accuracy summary (`batch.score.summarise`); ``worst`` adds
    the worst items."""
    lines = [
        "## Accuracy against references",
        "",
        f"Job: WER **{_pct(accuracy['wer'])}**, CER {_pct(accuracy['cer'])} over "
        f"{accuracy['items']} item(s), {accuracy.get('reference_words', 0)} reference words "
        f"({accuracy['normalisation']}; edits pooled over items).",
    ]
    if accuracy.get("unscorable"):
        lines.append(f"{accuracy['unscorable']} item(s) had an empty reference: not scored.")
    for title, key in (("language", "by_language"), ("channel", "by_channel")):
        lines += ["", f"| {title} | items | WER | CER |", "| --- | ---: | ---: | ---: |"]
        for name, part in accuracy[key].items():
            lines.append(
                f"| {name} | {part['items']} | {_pct(part['wer'])} | {_pct(part['cer'])} |"
            )
    if worst and accuracy["worst"]:
        lines += ["", "Worst items:", "", "| source | channel | WER | CER |"]
        lines.append("| --- | --- | ---: | ---: |")
        lines += [accuracy_row(row) for row in accuracy["worst"]]
    return lines


def md_cell(value: Any) -> str:
    """Text safe inside a Markdown table cell: a file may be named `a|b.wav`."""
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def accuracy_row(row: dict[str, Any]) -> str:
    """One item's line of an accuracy table: source, channel, WER, CER."""
    cells = (md_cell(row["source"]), md_cell(row["channel"]), _pct(row["wer"]), _pct(row["cer"]))
    return "| " + " | ".join(cells) + " |"


def job_runs(
    reports: list[dict[str, Any]], alive: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Which runs (and shards) of a job ran when, oldest first. Pure. A run that wrote only
    its starting report was killed (status ``gone``) when a later run of the same shard
    exists (a shard runs once at a time), or when ``alive(report)`` says it is not running.
    A gone run's counts are unknown (None): its starting report says 0, yet the batches it
    committed before it died are in the tables, counted in the job so far."""
    ordered = sorted(reports, key=lambda r: str(r.get("started_at")))
    runs = []
    for position, report in enumerate(ordered):
        status = report.get("status")
        if status == RunStatus.RUNNING:
            later = any(r.get("shard") == report.get("shard") for r in ordered[position + 1 :])
            if later or not alive(report):
                status = "gone"
        items = report.get("items", {}) if status != "gone" else {}
        runs.append(
            {
                "run_id": report["run_id"],
                "shard": report.get("shard"),
                "status": status,
                "started_at": report.get("started_at"),
                "finished_at": report.get("finished_at"),
                "ok": items.get("ok"),
                "failed": items.get("failed"),
                "audio_s": report.get("audio_s") if status != "gone" else None,
            }
        )
    return runs


def render_job(so_far: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The job across its runs and shards, as Markdown."""
    lines = [
        "",
        "## The job so far",
        "",
        f"{so_far['items']} items by their latest result: {so_far['ok']} ok, "
        f"{so_far['failed']} failed; {so_far['audio_s']} s of audio.",
        "",
        "| run | shard | status | started | finished | ok | failed | audio s |",
        "| --- | --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for run in runs:
        cells = [
            run["run_id"],
            run["shard"] or "whole job",
            run["status"],
            run["started_at"],
            run["finished_at"] or "",
            run["ok"],
            run["failed"],
            run["audio_s"],
        ]
        lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
