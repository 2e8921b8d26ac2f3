"""The session timeline: lanes, outcomes and marks recorded during a run (`batch.timeline`),
kept small whatever the run's size, and drawn in the HTML report (`batch.html_report`)."""

from __future__ import annotations

import importlib.util
import json
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import av
import numpy as np
import pytest

from batch.html_report import render_html
from batch.timeline import OPEN_POINTS, Timeline
from tests.observed import faulty_run


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_attempts_take_the_lowest_free_lane_and_retries_are_marked() -> None:
    clock = Clock()
    timeline = Timeline(clock)
    a, b = timeline.new_unit(), timeline.new_unit()
    first = timeline.begin(a, "a.wav")
    clock.now = 1.0
    second = timeline.begin(b, "b.wav")
    assert (first.lane, second.lane) == (0, 1)
    first.open()
    clock.now = 2.0
    first.end("failed", "connection_lost")
    timeline.retried(a)  # a's next attempt starts
    clock.now = 2.5
    again = timeline.begin(a, "a.wav")
    assert (again.lane, again.attempt) == (0, 2)  # lane 0 was free again
    clock.now = 3.0
    again.end("ok", skipped_share=0.25)
    second.end("refused", "http_429")
    report = timeline.as_report()
    assert report["outcomes"] == {"ok": 1, "retried": 1, "failed": 0, "stalled": 0, "refused": 1}
    assert report["retries_by_kind"] == {"connection_lost": 1}
    assert report["opened"] == 1
    assert report["lanes"] == 2 and report["duration_s"] == 3.0
    assert report["refusals"] == [[1.0, 1]]
    assert report["backoffs"] == [[2.0, 2.5, 0]]
    assert report["open"] == [[0.0, 1], [1.0, 2], [2.0, 1], [2.5, 2], [3.0, 0]]
    outcomes = [(s["lane"], s["outcome"], s["start_s"], s["end_s"]) for s in report["spans"]]
    assert outcomes == [(0, "retried", 0.0, 2.0), (0, "ok", 2.5, 3.0)]
    assert report["spans"][1]["skipped_share"] == 0.25


def test_thousands_of_attempts_become_a_heat_strip_and_stay_small() -> None:
    clock = Clock()
    timeline = Timeline(clock)
    for n in range(5000):
        clock.now = n * 0.5
        span = timeline.begin(timeline.new_unit(), f"recordings/call-{n:05d}.wav")
        clock.now = n * 0.5 + 2.0
        span.end("ok" if n % 50 else "failed", None if n % 50 else "timeout")
    report = timeline.as_report()
    assert report["spans"] is None
    heat = report["heat"]
    assert heat["spans"] == 5000
    assert sum(heat["ended"]["ok"]) == 4900 and sum(heat["ended"]["failed"]) == 100
    assert abs(sum(heat["busy_s"]) - 5000 * 2.0) < 1.0  # every session second, in a bucket
    assert len(report["open"]) <= OPEN_POINTS
    assert len(json.dumps(report)) < 40_000
    html = render_html(_report_with(report))
    assert len(html) < 60_000


def _report_with(timeline: dict[str, object]) -> dict[str, object]:
    return {
        "job": "j", "run_id": "r", "status": "completed", "started_at": "t", "finished_at": "t",
        "endpoint": "local", "abort_reason": None, "shard": None, "warnings": [],
        "items": {"total": 1, "skipped_already_ok": 0, "skipped_failed_before": 0, "ok": 1,
                  "failed": 0, "not_run": 0},
        "pool": {"utilisation": 0.5}, "billing": {"currency": "USD"}, "audio": {},
        "left": {}, "failures": [], "accuracy": None, "timeline": timeline,
    }  # fmt: skip


class _Page(HTMLParser):
    """What the tests check of a page: its tags, and every URL it would load."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[str] = []
        self.rects: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "xlink:href")]
        if tag == "rect":
            self.rects.append(found)


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def test_a_faulty_run_has_its_attempts_in_the_report_and_the_html(tmp_path: Path) -> None:
    result, stats = faulty_run(tmp_path)
    report = result.report
    timeline = report["timeline"]
    assert stats.faults["drop"] + stats.faults["refuse_429"] >= 2
    outcomes = timeline["outcomes"]
    # Every attempt is one span; refused handshakes are the report's refusals.
    assert sum(outcomes.values()) == report["attempts"]
    assert outcomes["refused"] == report["refused_handshakes"] == stats.faults["refuse_429"]
    assert sum(timeline["retries_by_kind"].values()) == report["retries"] >= 1
    assert outcomes["retried"] >= 1
    assert 1 <= timeline["lanes"] <= report["pool"]["concurrency"]
    assert max(c for _, c in timeline["open"]) <= report["pool"]["concurrency"]
    session_failures = [f for f in report["failures"] if f["kind"] != "empty"]
    assert outcomes["failed"] == len(session_failures)
    assert outcomes["ok"] == report["items"]["ok"]
    assert report["items"]["failed"] >= 1  # the empty file
    html = render_html(report)
    page = parse(html)
    assert page.urls == []  # nothing loaded from elsewhere
    assert not any(t in page.tags for t in ("script", "link", "img", "iframe"))
    assert "svg" in page.tags
    bars = [r for r in page.rects if r.get("height") and r.get("fill") not in (None, "#a5d6a7")]
    assert len(bars) >= len(timeline["spans"]) > 0
    assert "empty.wav" in html and "0 bytes" in html  # the failure, with what to do
    written = Path(str(result.report_path)).with_suffix(".html")
    assert written.read_text(encoding="utf-8") == html
    assert written.with_name("latest.html").read_text(encoding="utf-8") == html


def _load_screenshot_tool() -> ModuleType:
    path = Path(__file__).parent.parent / "docs" / "tools" / "screenshot.py"
    spec = importlib.util.spec_from_file_location("screenshot", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_html_report_draws_a_timeline_in_a_real_browser(tmp_path: Path) -> None:
    """Where Chromium is installed (`make screenshot` needs it; the suite does not)."""
    tool = _load_screenshot_tool()
    if tool.browser() is None:
        pytest.skip("no headless Chromium installed (apt-get install chromium): not drawn")
    result, _ = faulty_run(tmp_path)
    html = Path(str(result.report_path)).with_suffix(".html")
    png = tool.screenshot(html, tmp_path / "report.png", width=1000, height=900)
    with av.open(str(png)) as container:
        pixels = next(container.decode(video=0)).to_ndarray(format="rgb24")
    # The bars' colours, well beyond what the legend's 12-pixel squares hold.
    for colour in ("#2e7d32", "#f9a825"):
        rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
        found = int(np.all(np.abs(pixels.astype(int) - rgb) <= 8, axis=-1).sum())
        assert found > 3 * 144, (colour, found)
