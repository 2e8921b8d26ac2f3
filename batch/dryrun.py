"""A dry run's report: what a run with the same options would stream and bill, opening no
session (with skip_silence, the speech detector runs on each item to say how much)."""

from __future__ import annotations

import logging
from collections.abc import Set as AbstractSet
from typing import Any

from batch.cache import item_audio, wire_format
from batch.errors import InputError
from batch.manifest import LoadedManifest
from batch.model import Item
from batch.report import RunStats
from batch.speech import find_speech

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
