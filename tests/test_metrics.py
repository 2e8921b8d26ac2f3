"""Prometheus metrics of a run: the text file parsed back with prometheus_client's parser,
and a real Pushgateway (Debian's prometheus-pushgateway) on loopback; both agree with the
report and the tables."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batch import metrics
from tests.conftest import TIME_UNIT_S, wait_for
from tests.needs import missing
from tests.observed import faulty_run
from tests.tables import sql


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def one(found: dict[Any, float], name: str, **labels: str) -> float:
    hits = [v for (n, ls), v in found.items() if n == name and dict(ls).items() >= labels.items()]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    folder = tmp_path_factory.mktemp("faulty")
    result, _ = faulty_run(folder)
    return result.report, folder / "out"


def _agrees(found: dict[Any, float], report: dict[str, Any], out: Path) -> None:
    by_status = dict(sql(out, "select status, count(*) from {transcripts} group by status"))
    assert one(found, "pulse_batch_items", status="ok") == by_status["ok"] == report["items"]["ok"]
    assert one(found, "pulse_batch_items", status="failed") == by_status["failed"] >= 1
    assert one(found, "pulse_batch_items_planned") == report["items"]["total"]
    assert one(found, "pulse_batch_billed_minutes") == report["billing"]["billed_audio_minutes"]
    spend = one(found, "pulse_batch_spend_estimated", currency="USD")
    assert spend == report["billing"]["estimated_cost"] > 0
    assert one(found, "pulse_batch_audio_streamed_seconds") == report["audio"]["streamed_s"]
    assert one(found, "pulse_batch_audio_planned_seconds") == report["audio"]["planned_s"] > 0
    assert one(found, "pulse_batch_sessions_attempted") == report["attempts"]
    assert one(found, "pulse_batch_refusals") == report["refused_handshakes"] >= 1
    retries = [v for (n, _), v in found.items() if n == "pulse_batch_retries"]
    assert sum(retries) == report["retries"] >= 1
    assert one(found, "pulse_batch_sessions_open") == 0
    assert one(found, "pulse_batch_run_info", run_id=report["run_id"], status="completed") == 1
    assert one(found, "pulse_batch_exit_code") == 1
    assert one(found, "pulse_batch_run_end_timestamp_seconds") >= one(
        found, "pulse_batch_run_start_timestamp_seconds"
    )


def test_the_metrics_file_parses_and_agrees_with_the_tables(
    faulty: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    report, out = faulty
    path = tmp_path / "textfile" / "pulse_batch.prom"
    metrics.MetricsPublisher(file=path).finish(report, exit_code=1)
    text = path.read_text()
    assert all(
        line.startswith(("# HELP pulse_batch_", "# TYPE pulse_batch_", "pulse_batch_"))
        for line in text.splitlines()
    ), text
    _agrees(samples(text), report, out)
    assert list(path.parent.iterdir()) == [path]  # no temp file left beside it


def test_the_file_is_refreshed_while_the_run_goes(tmp_path: Path) -> None:
    path = tmp_path / "m.prom"
    seen: list[int] = []

    def snapshot() -> dict[str, Any]:
        seen.append(len(seen))
        return _live(ok=len(seen))

    publisher = metrics.MetricsPublisher(file=path, interval_s=0.05)
    publisher.start(snapshot)
    assert wait_for(lambda: len(seen) >= 3, timeout_s=5)
    assert one(samples(path.read_text()), "pulse_batch_items", status="ok") >= 1
    publisher.finish(_live(ok=42), exit_code=0)
    found = samples(path.read_text())
    assert one(found, "pulse_batch_items", status="ok") == 42
    assert one(found, "pulse_batch_exit_code") == 0


def _live(ok: int) -> dict[str, Any]:
    return {
        "job": "j", "run_id": "r", "status": "running", "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": None, "attempts": ok, "wall_s": 1.0, "shard": "0/2",
        "items": {"total": 50, "ok": ok, "failed": 0, "not_run": 0, "skipped_already_ok": 0,
                  "skipped_failed_before": 0},
        "audio": {"planned_s": 1.0, "recorded_s": 1.0, "streamed_s": 1.0, "skipped_s": 0.0},
        "billing": {"billed_audio_minutes": 0.1, "estimated_cost": 0.0, "currency": "USD"},
        "timeline": None, "accuracy": None,
    }  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    """Debian's prometheus-pushgateway on a free loopback port; its URL."""
    binary = shutil.which("prometheus-pushgateway")
    if binary is None:
        missing("prometheus-pushgateway is not installed (make test installs it)")
    url = f"http://127.0.0.1:{_free_port()}"
    process = subprocess.Popen(
        [binary, f"--web.listen-address={url.removeprefix('http://')}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        assert wait_for(ready, timeout_s=10), "the pushgateway did not start"
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10 * TIME_UNIT_S)


def test_a_push_reaches_a_real_pushgateway_grouped_by_job_and_shard(
    faulty: tuple[dict[str, Any], Path], pushgateway: str
) -> None:
    report, out = faulty
    metrics.MetricsPublisher(push_url=pushgateway).finish(report, exit_code=1)
    metrics.push(pushgateway, {**_live(ok=3), "job": report["job"]})  # another shard, apart
    with urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = samples(text)
    whole = {k: v for k, v in found.items() if ("shard", "all") in k[1]}
    assert all(("job", report["job"]) in labels for _, labels in whole)
    _agrees(whole, report, out)
    assert one(found, "pulse_batch_items", status="ok", shard="0/2") == 3
