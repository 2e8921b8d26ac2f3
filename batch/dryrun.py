"""A dry run's report: what a run with the same options would stream and bill, opening no
session (with skip_silence, the speech detector runs on each item to say how much)."""

from __future__ import annotations

import heapq
import logging
from collections.abc import Set as AbstractSet
from datetime import timedelta
from typing import Any

from batch.cache import item_audio, wire_format
from batch.errors import InputError
from batch.manifest import LoadedManifest, Manifest, RunConfig
from batch.model import Item
from batch.report import RunStats
from batch.speech import find_speech
from batch.split import piece_count

logger = logging.getLogger(__name__)


def dry_run_report(
    loaded: LoadedManifest,
    stats: RunStats,
    items: list[Item],
    done: set[str],
    chosen: set[str],
    forgotten: AbstractSet[str] = frozenset(),
) -> dict[str, Any]:
    """The report of a dry run over the planned ``items``: ``done`` are already ok,
    ``forgotten`` were forgotten (tombstoned), ``chosen`` are those the run would do."""
    todo = [i for i in items if i.item_id in chosen and i.error is None]
    audio_s = sum(i.duration_s or 0.0 for i in todo)
    price = loaded.manifest.output.price_per_minute
    heard = _detect_speech(loaded, todo) if loaded.manifest.run.skip_silence else {}
    streamed = {i.item_id: heard.get(i.item_id, i.duration_s or 0.0) for i in todo}
    streamed_s = sum(streamed.values())
    cap = stats.cap_minutes
    return {
        "job": stats.job,
        "shard": stats.shard,
        "dry_run": True,
        "items": {
            "total": len(items),
            "already_ok": len([i for i in items if i.item_id in done and i.item_id not in chosen]),
            "to_stream": len(todo),
            "known_bad": len([i for i in items if i.error is not None]),
            **_forgotten_count(items, forgotten - chosen),
        },
        "audio_s": round(audio_s, 3),
        "streamed_s": round(streamed_s, 3),
        "skipped_s": round(audio_s - streamed_s, 3),
        "currency": loaded.manifest.output.currency,
        "billed_audio_minutes": round(streamed_s / 60, 4),
        "estimated_cost": round(streamed_s / 60 * price, 4),
        "billed_audio_minutes_without_skipping": round(audio_s / 60, 4),
        "estimated_cost_without_skipping": round(audio_s / 60 * price, 4),
        "cap_billed_minutes": cap,
        # Whether the run as planned fits its spend cap (null: no cap); a run that does not
        # stops with exit 7 and the rerun continues.
        "fits_cap": None if cap is None else streamed_s / 60 <= cap,
        # Seconds the sessions would take at run.pace on this run's share of run.concurrency
        # (null: unpaced, as fast as the service reads).
        "estimated_wall_s": wall_time_s(list(streamed.values()), loaded.manifest.run, stats),
        "plan": [
            {
                "item_id": i.item_id,
                "source": i.source,
                "channel": i.channel,
                "duration_s": i.duration_s,
                "streamed_s": streamed.get(i.item_id),
                "action": "skip: forgotten"
                if i.item_id in forgotten - chosen
                else _dry_action(i, chosen, done, no_speech=heard.get(i.item_id) == 0),
            }
            for i in items
        ],
    }


def _dry_action(item: Item, chosen: set[str], done: set[str], *, no_speech: bool) -> str:
    """``no_speech``: the detector heard none (only with skip_silence; an empty file
    streamed whole still opens its session)."""
    if item.item_id not in chosen:
        return "skip" if item.item_id in done else "skip: failed before (--no-retry-failed)"
    if item.error:
        return f"fail: {item.error}"
    return "no speech: ok without a session" if no_speech else "stream"


def _detect_speech(loaded: LoadedManifest, items: list[Item]) -> dict[str, float]:
    """Seconds each item would stream with its silence skipped, from the speech detector
    alone (decoded, never streamed). Items that cannot be decoded are left out."""
    run = loaded.manifest.run
    wire = wire_format(loaded)
    estimates = {}
    for item in items:
        audio = item_audio(item, wire, run)
        try:
            found = find_speech(
                audio, None, pad_s=run.skip_silence_pad_s, gap_s=run.skip_silence_gap_s
            )
        except InputError as exc:
            logger.warning("%s", exc)
            continue
        estimates[item.item_id] = round(found.timemap.streamed_s, 3)
    return estimates


def _forgotten_count(items: list[Item], forgotten: AbstractSet[str]) -> dict[str, int]:
    """``{"forgotten": N}`` when the plan skips forgotten items (else nothing)."""
    count = len([i for i in items if i.item_id in forgotten])
    return {"forgotten": count} if count else {}


def wall_time_s(streamed_s: list[float], run: RunConfig, stats: RunStats) -> float | None:
    """How long sessions streaming ``streamed_s`` (seconds each) take at ``run.pace`` on
    ``stats.concurrency`` sessions, longest first, long items cut into pieces as the run
    would; None unpaced. Pure: an estimate (no connect time, no retries)."""
    if run.pace <= 0:
        return None
    slots = max(1, stats.concurrency)
    units: list[float] = []
    for seconds in streamed_s:
        if run.split_long_files and seconds > run.split_threshold_s:
            count = piece_count(seconds, run.piece_target_s, slots)
            units += [seconds / count] * count
        elif seconds > 0:
            units.append(seconds)
    ends = [0.0] * slots  # when each session is free again
    for seconds in sorted(units, reverse=True):
        heapq.heappush(ends, heapq.heappop(ends) + seconds / run.pace)
    return round(max(ends), 1)


_SHOWN_ITEMS = 20


def render_dry_run(report: dict[str, Any], manifest: Manifest) -> str:
    """A dry run's report for people: what would be streamed or skipped, the audio, the
    time and the cost (only with a price: a cost of 0 is no estimate)."""
    items = report["items"]
    run = manifest.run
    shard = f" (shard {report['shard']})" if report.get("shard") else ""
    forgotten = f", {items['forgotten']} forgotten" if items.get("forgotten") else ""
    lines = [
        f"dry run of job {report['job']}{shard}: nothing streamed, nothing written",
        f"  items: {items['total']} in all: {items['to_stream']} to stream, "
        f"{items['already_ok']} already ok (skipped), {items['known_bad']} known bad{forgotten}",
        f"  audio: {report['streamed_s']:.1f} s to stream ({report['billed_audio_minutes']:.2f}"
        " billed minutes)"
        + (f"; {report['skipped_s']:.1f} s of silence skipped" if report["skipped_s"] else ""),
        f"  time:  {_wall(report['estimated_wall_s'], run, sharded=bool(shard))}",
        f"  cost:  {_cost(report, manifest)}",
    ]
    if report["fits_cap"] is not None:
        cap = report["cap_billed_minutes"]
        lines.append(
            f"  cap:   fits the cap of {cap} billed minutes"
            if report["fits_cap"]
            else f"  cap:   over the cap of {cap} billed minutes: the run would stop there "
            "(exit 7) and a rerun continue"
        )
    plan = report["plan"]
    lines += [_planned(p) for p in plan[:_SHOWN_ITEMS]]
    if len(plan) > _SHOWN_ITEMS:
        lines.append(f"  ... and {len(plan) - _SHOWN_ITEMS} more (--json lists every item)")
    return "\n".join(lines)


def _wall(wall_s: float | None, run: RunConfig, *, sharded: bool) -> str:
    if wall_s is None:
        return "no estimate: unpaced (run.pace 0), as fast as the service reads"
    share = "this shard's share of " if sharded else ""
    return (
        f"about {timedelta(seconds=round(wall_s))} streaming at run.pace {run.pace:g}x on "
        f"{share}run.concurrency {run.concurrency} (no connect time or retries counted)"
    )


def _cost(report: dict[str, Any], manifest: Manifest) -> str:
    price = manifest.output.price_per_minute
    if not price:
        return "no price set (output.price_per_minute)"
    return (
        f"about {report['estimated_cost']:g} {report['currency']} "
        f"at {price:g} {report['currency']} per billed minute"
    )


def _planned(entry: dict[str, Any]) -> str:
    """One plan entry: its action, its source (and channel), the seconds it would stream."""
    action, source = str(entry["action"]), str(entry["source"])
    if source in action:  # a failure's message names the file already
        return f"  {action}"
    channel = f" [ch{entry['channel']}]" if entry["channel"] is not None else ""
    streamed = entry["streamed_s"]
    return f"  {action}: {source}{channel}" + (f" ({streamed:.1f} s)" if streamed else "")
