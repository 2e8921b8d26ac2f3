"""The run report as one self-contained HTML page: summary, spend, accuracy, failures with
what to do, and an inline SVG session timeline. Pure: a report dict in, text out.

Nothing is fetched when the page opens (no scripts, fonts, images or style sheets from
elsewhere): it reads the same from an object store, a CI artifact or an e-mail attachment.
"""

from __future__ import annotations

from html import escape
from typing import Any

from batch.report import failing_items

COLOURS = {
    "ok": "#2e7d32",
    "retried": "#f9a825",
    "failed": "#c62828",
    "stalled": "#6a1b9a",
    "refused": "#d84315",
    "skipped": "#a5d6a7",
}
# What to do about each kind of failure (the tables' error_kind).
ADVICE = {
    "not_found": "The file is missing: fix the path or the list, or remove it.",
    "symlink_loop": "Fix the symlink.",
    "bad_path": "Fix the path in the list (length, encoding, or a row outside its folder).",
    "permission": "Give the runner read access to the file (or the store's credentials).",
    "read_error": "The store failed mid-read: rerun; if it persists, check the store.",
    "empty": "The file has 0 bytes: replace it or remove it from the inputs.",
    "not_media": "Not audio FFmpeg can read: convert it or remove it.",
    "no_audio": "No audio stream (or not the channel asked for): check the file and options.",
    "decode_error": "Corrupt or truncated: get a whole copy, then rerun.",
    "timeout": "The service answered too slowly: rerun; raise run timeouts if it repeats.",
    "stalled": "The service took speech and answered nothing: rerun later.",
    "connection_lost": "The connection dropped: rerun (only failed items are redone).",
    "server_error": "The service reported an error: rerun; report it if it repeats.",
    "protocol": "The service sent a message out of protocol: rerun; report it if it repeats.",
    "http_429": "The account's concurrency limit: lower run.concurrency or rerun later.",
}
_DEFAULT_ADVICE = "Rerun the job: only items that failed are redone."
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222;
max-width:1040px}h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;margin:4px 0}td,th{border-bottom:1px solid #ddd;
padding:3px 10px;text-align:left}td.n{text-align:right}.muted{color:#666}
.badge{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-weight:600}
.grid{display:flex;gap:32px;flex-wrap:wrap}svg text{font:11px sans-serif;fill:#444}
"""
_WIDTH = 960
_LEFT = 64  # lane labels
_OPEN_H = 56  # the open-sessions chart above the lanes


def render_html(report: dict[str, Any]) -> str:
    """The report as one HTML page."""
    title = f"pulse-batch: {report['job']} {report['run_id']}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        *_header(report),
        '<div class="grid">',
        *_summary(report),
        *_spend(report),
        "</div>",
        *_timeline_section(report.get("timeline")),
        *_accuracy(report.get("accuracy")),
        *_failures(report),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _header(report: dict[str, Any]) -> list[str]:
    status = str(report["status"])
    colour = {"completed": COLOURS["ok"], "capped": COLOURS["retried"]}.get(status, "#c62828")
    if status == "completed" and failing_items(report):
        colour = COLOURS["retried"]
    shard = f", shard {report['shard']}" if report.get("shard") else ""
    reason = f" {escape(str(report['abort_reason']))}" if report.get("abort_reason") else ""
    return [
        f"<h1>{escape(str(report['job']))} <span class=muted>run {escape(str(report['run_id']))}"
        f"{escape(shard)}</span></h1>",
        f'<p><span class="badge" style="background:{colour}">{escape(status)}</span>{reason}'
        f" <span class=muted>started {_when(report['started_at'])}, finished "
        f"{_when(report.get('finished_at'))}; endpoint "
        f"{escape(str(report.get('endpoint')))}</span></p>",
        *(f"<p>Warning: {escape(str(w))}</p>" for w in report.get("warnings") or []),
    ]


def _when(iso: Any) -> str:
    """``2026-12-04 15:13:42 UTC`` from the report's ISO time (None: not yet)."""
    return "–" if not iso else escape(str(iso)[:19].replace("T", " ") + " UTC")


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] | None = None) -> str:
    cells = "".join(
        f"<tr><td>{escape(name)}</td><td class=n>{escape(_fmt(value))}</td></tr>"
        for name, value in rows
    )
    top = f"<tr><th>{escape(head[0])}</th><th>{escape(head[1])}</th></tr>" if head else ""
    return f"<table>{top}{cells}</table>"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if value % 1 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _summary(report: dict[str, Any]) -> list[str]:
    items = report["items"]
    rows = [(name.replace("_", " "), count) for name, count in items.items()]
    pool = report.get("pool", {})
    more = [
        ("audio transcribed (s)", report.get("audio_s")),
        ("wall (s)", report.get("wall_s")),
        ("× real time", report.get("throughput_x_realtime")),
        ("sessions attempted", report.get("attempts")),
        ("retries", report.get("retries")),
        ("refused at the handshake", report.get("refused_handshakes")),
        ("most sessions open", pool.get("max_open_sessions")),
        ("pool utilisation", f"{pool.get('utilisation', 0):.0%}"),
    ]
    return [
        "<section><h2>Items</h2>",
        _table(rows),
        "</section><section><h2>Run</h2>",
        _table(more),
        "</section>",
    ]


def _spend(report: dict[str, Any]) -> list[str]:
    bill, audio, left = report["billing"], report["audio"], report["left"]
    money = bool(bill.get("price_per_minute"))
    currency = bill.get("currency", "")
    rows: list[tuple[str, Any]] = [
        ("audio recorded (s)", audio.get("recorded_s")),
        ("audio streamed (s)", audio.get("streamed_s")),
        ("skipped as silence (s)", audio.get("skipped_s")),
        ("billed minutes", bill.get("billed_audio_minutes")),
    ]
    if money:
        rows += [
            (f"estimated cost ({currency})", bill.get("estimated_cost")),
            (f"cost streamed whole ({currency})", bill.get("estimated_cost_without_skipping")),
        ]
    if bill.get("cap_billed_minutes") is not None:
        rows.append(("spend cap (billed minutes)", bill["cap_billed_minutes"]))
    if left.get("items"):
        rows.append(("left for the next run (items)", left["items"]))
    return ["<section><h2>Spend</h2>", _table(rows), "</section>"]


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _accuracy(accuracy: dict[str, Any] | None) -> list[str]:
    if not accuracy:
        return []
    lines = [
        "<h2>Accuracy against references</h2>",
        f"<p>WER <b>{_pct(accuracy['wer'])}</b>, CER {_pct(accuracy['cer'])} over "
        f"{accuracy['items']} item(s) ({escape(str(accuracy.get('normalisation', '')))}).</p>",
    ]
    for title, key in (("language", "by_language"), ("channel", "by_channel")):
        rows = "".join(
            f"<tr><td>{escape(str(name))}</td><td class=n>{part['items']}</td>"
            f"<td class=n>{_pct(part['wer'])}</td><td class=n>{_pct(part['cer'])}</td></tr>"
            for name, part in (accuracy.get(key) or {}).items()
        )
        head = f"<tr><th>{title}</th><th>items</th><th>WER</th><th>CER</th></tr>"
        lines.append(f"<table>{head}{rows}</table>")
    worst = accuracy.get("worst") or []
    if worst:
        rows = "".join(
            f"<tr><td>{escape(str(r['source']))}</td><td>{escape(str(r['channel']))}</td>"
            f"<td class=n>{_pct(r['wer'])}</td><td class=n>{_pct(r['cer'])}</td></tr>"
            for r in worst
        )
        head = "<tr><th>worst items</th><th>channel</th><th>WER</th><th>CER</th></tr>"
        lines.append(f"<table>{head}{rows}</table>")
    return lines


def _failures(report: dict[str, Any]) -> list[str]:
    failures = report.get("failures") or []
    if not failures:
        return []
    rows = "".join(
        f"<tr><td>{escape(str(f['kind']))}</td><td>{escape(str(f['source']))}</td>"
        f"<td>{escape(str(f['message']))}</td>"
        f"<td>{escape(ADVICE.get(str(f['kind']), _DEFAULT_ADVICE))}</td></tr>"
        for f in failures
    )
    head = "<tr><th>kind</th><th>source</th><th>message</th><th>what to do</th></tr>"
    return ["<h2>Failures</h2>", f"<table>{head}{rows}</table>"]


def _timeline_section(timeline: dict[str, Any] | None) -> list[str]:
    if not timeline or not timeline.get("lanes"):
        return ["<h2>Session timeline</h2><p class=muted>No sessions in this run.</p>"]
    if timeline.get("heat"):
        caption = (
            f"Above: sessions open over time. Below, for the run's {timeline['heat']['spans']:,}"
            " attempts, per time bucket (darker: more): how busy the session slots were, and"
            " how many attempts ended ok, retried, failed or stalled."
        )
    else:
        caption = (
            "Above: sessions open over time. Below: one lane per session slot; each bar an"
            " attempt from connect to its last answer. Red triangles: refused; dashed:"
            " waiting to retry."
        )
    return [
        "<h2>Session timeline</h2>",
        f'<p class="muted">{escape(caption)}</p>',
        timeline_svg(timeline),
        _legend(),
    ]


def _legend() -> str:
    keys = ["ok", "retried", "failed", "stalled", "refused", "skipped"]
    names = {"skipped": "silence skipped (share of the item)"}
    items = "".join(
        f'<span style="margin-right:14px"><svg width="12" height="12"><rect width="12" '
        f'height="12" fill="{COLOURS[k]}"/></svg> {escape(names.get(k, k))}</span>'
        for k in keys
    )
    return f"<p>{items}</p>"


def timeline_svg(timeline: dict[str, Any]) -> str:
    """The timeline (`batch.timeline.timeline_report`) as an inline SVG. Pure."""
    lanes = int(timeline["lanes"])
    duration = max(float(timeline["duration_s"]), 1e-3)
    plot = _WIDTH - _LEFT - 8
    heat = timeline.get("heat")
    lane_h = max(3.0, min(14.0, 420 / lanes))
    body_h = 5 * 16 if heat else lanes * lane_h
    top = _OPEN_H + 12
    height = top + body_h + 24

    def x(t: float) -> float:
        return round(_LEFT + plot * min(max(t, 0.0), duration) / duration, 1)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height:.0f}" '
        f'viewBox="0 0 {_WIDTH} {height:.0f}" role="img" aria-label="session timeline">',
        *_open_chart(timeline["open"], x, top - 12),
    ]
    if heat:
        out += _heat_rows(heat, x, top)
    else:
        out += _lanes(timeline, x, top, lane_h)
    out += _axis(duration, x, top + body_h)
    out.append("</svg>")
    return "\n".join(out)


def _open_chart(steps: list[list[float]], x: Any, bottom: float) -> list[str]:
    peak = max((c for _, c in steps), default=0) or 1
    scale = (_OPEN_H - 14) / peak
    points = [f"{_LEFT},{bottom}"]
    level = bottom
    for t, count in steps:
        points.append(f"{x(t)},{level:.1f}")
        level = round(bottom - count * scale, 1)
        points.append(f"{x(t)},{level}")
    points.append(f"{_LEFT + _WIDTH - _LEFT - 8},{level}")
    points.append(f"{_LEFT + _WIDTH - _LEFT - 8},{bottom}")
    return [
        f'<text x="2" y="{bottom - _OPEN_H + 24}">open</text>',
        f'<text x="2" y="{bottom - _OPEN_H + 36}">(max {peak:g})</text>',
        f'<polygon points="{" ".join(points)}" fill="#90caf9" stroke="#1e88e5"/>',
    ]


def _lanes(timeline: dict[str, Any], x: Any, top: float, lane_h: float) -> list[str]:
    out = []
    bar_h = max(2.0, lane_h - 2)
    lanes = int(timeline["lanes"])
    for lane in range(lanes):
        if lanes <= 30 or lane % 5 == 0:
            out.append(f'<text x="2" y="{top + lane * lane_h + bar_h:.1f}">slot {lane}</text>')
    for start, end, lane in timeline.get("backoffs") or []:
        y = top + lane * lane_h + bar_h / 2
        out.append(
            f'<line x1="{x(start)}" y1="{y:.1f}" x2="{x(end)}" y2="{y:.1f}" '
            'stroke="#777" stroke-dasharray="3,2"/>'
        )
    for span in timeline["spans"]:
        y = top + span["lane"] * lane_h
        x0, x1 = x(span["start_s"]), x(span["end_s"])
        width = max(1.0, x1 - x0)
        tip = f"{span.get('label', '')}: attempt {span.get('attempt', 1)}, {span['outcome']}"
        if span.get("error_kind"):
            tip += f" ({span['error_kind']})"
        tip += f", {span['start_s']:.1f}–{span['end_s']:.1f} s"
        colour = COLOURS.get(span["outcome"], "#999")
        out.append(
            f'<rect x="{x0}" y="{y:.1f}" width="{width:.1f}" height="{bar_h:.1f}" '
            f'fill="{colour}"><title>{escape(tip)}</title></rect>'
        )
        share = float(span.get("skipped_share") or 0.0)
        if share > 0:
            cut = width * share
            out.append(
                f'<rect x="{x0 + width - cut:.1f}" y="{y:.1f}" width="{cut:.1f}" '
                f'height="{bar_h:.1f}" fill="{COLOURS["skipped"]}"/>'
            )
    for t, lane in timeline.get("refusals") or []:
        y = top + lane * lane_h
        px = x(t)
        out.append(
            f'<polygon points="{px - 4},{y:.1f} {px + 4},{y:.1f} {px},{y + bar_h:.1f}" '
            f'fill="{COLOURS["refused"]}"><title>refused at {t:.1f} s</title></polygon>'
        )
    return out


def _heat_rows(heat: dict[str, Any], x: Any, top: float) -> list[str]:
    """Beyond the detail limit: one strip for how busy the pool was, one per outcome."""
    width_s = float(heat["bucket_s"])
    rows: list[tuple[str, list[float], str]] = [("busy", heat["busy_s"], "#1e88e5")]
    rows += [(name, counts, COLOURS[name]) for name, counts in heat["ended"].items()]
    out = []
    for row, (name, values, colour) in enumerate(rows):
        y = top + row * 16
        out.append(f'<text x="2" y="{y + 11}">{escape(name)}</text>')
        peak = max(values, default=0) or 1
        for bucket, value in enumerate(values):
            if value <= 0:
                continue
            x0, x1 = x(bucket * width_s), x((bucket + 1) * width_s)
            out.append(
                f'<rect x="{x0}" y="{y}" width="{max(1.0, x1 - x0):.1f}" height="14" '
                f'fill="{colour}" fill-opacity="{0.15 + 0.85 * value / peak:.2f}"/>'
            )
    return out


def _axis(duration: float, x: Any, y: float) -> list[str]:
    steps = (0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)
    step = next((s for s in steps if duration / s <= 10), 14400.0)
    out = [f'<line x1="{_LEFT}" y1="{y + 2}" x2="{x(duration)}" y2="{y + 2}" stroke="#999"/>']
    last = int(duration / step)
    for n in range(last + 1):
        # The last label ends at its tick when that is near the right edge.
        anchor = "end" if n == last and duration - n * step < step / 3 else "middle"
        out.append(
            f'<text x="{x(n * step)}" y="{y + 16}" text-anchor="{anchor}">'
            f"{_clock(n * step, step)}</text>"
        )
    return out


def _clock(t: float, step: float) -> str:
    """An axis label: 0.5s, 40s, 2m30s, 1h05m."""
    if step < 1:
        return f"{t:.1f}s"
    seconds = round(t)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
