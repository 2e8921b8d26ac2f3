"""`--log-format json`, `--metrics-file` and `report --html` through the command line: every
stderr line of a JSON-mode run is a JSON object with the keys the docs promise, no secret
in any of them, and the metrics agree with the report and the tables."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from batch import console
from batch.server import FaultConfig
from tests.conftest import point_at, run_cli, server_in_thread
from tests.observed import faulty_manifest
from tests.tables import sql
from tests.test_metrics import one, samples

KEY = "sk-obs-5ecret-value-7781"
ALWAYS = {"ts", "level", "event", "message", "logger"}


def _json_lines(stderr: str) -> list[dict[str, Any]]:
    lines = stderr.splitlines()
    assert lines, "nothing logged"
    parsed = [json.loads(line) for line in lines]  # every line, or this fails
    assert all(set(line) >= ALWAYS for line in parsed), parsed
    return parsed


def test_a_json_mode_run_logs_only_json_lines_with_its_fields(tmp_path: Path) -> None:
    manifest = faulty_manifest(tmp_path)
    metrics_file = tmp_path / "metrics" / "pulse_batch.prom"
    # Refusals and errors echo the Authorization header: the key reaches our messages.
    faults = FaultConfig(seed=5, drop_rate=0.5, refuse_429_rate=0.3, retry_after_s=0.05,
                         fault_limit=7, fault_at_max_s=0.5, echo_authorization=True)  # fmt: skip
    with server_in_thread(faults=faults, api_key=KEY) as server:
        point_at(manifest, server.url)
        done = run_cli(
            "run", str(manifest), "--log-format", "json", "--metrics-file", str(metrics_file),
            env={"SMALLEST_API_KEY": KEY},
        )  # fmt: skip
    assert done.returncode == 1, done.output  # the empty file failed
    assert KEY not in done.output
    assert "[redacted]" in done.stderr  # the echoed key was there to scrub
    lines = _json_lines(done.stderr)
    report_path = Path(done.stdout.split("report: ")[1].split()[0])
    report = json.loads(report_path.read_text())
    run_id = report["run_id"]
    assert all(line["job"] == "test-job" and line["run_id"] == run_id for line in lines[1:])
    items = [line for line in lines if line["event"] == "item_done"]
    assert len(items) == report["items"]["total"]
    for line in items:
        assert {"item_id", "source", "status", "audio_s"} <= set(line), line
    failed = [line for line in items if line["status"] == "failed"]
    assert [line["error_kind"] for line in failed if "empty" in line["source"]] == ["empty"]
    retries = [line for line in lines if line["event"] == "session_retry"]
    assert len(retries) == report["retries"] >= 1
    assert all({"attempt", "error_kind", "item_id", "source"} <= set(r) for r in retries)
    [end] = [line for line in lines if line["event"] == "run_done"]
    assert (end["status"], end["exit_code"]) == ("completed", 1)
    assert all(str(line["ts"]).endswith("Z") for line in lines)
    # The metrics file: the report's and the tables' numbers.
    found = samples(metrics_file.read_text())
    out = tmp_path / "out"
    ok_rows = sql(out, "select count(*) from {transcripts} where status = 'ok'")[0][0]
    assert one(found, "pulse_batch_items", status="ok") == report["items"]["ok"] == ok_rows
    assert one(found, "pulse_batch_exit_code") == 1
    assert one(found, "pulse_batch_audio_planned_seconds") == report["audio"]["planned_s"] > 0


def test_the_environment_chooses_json_for_any_command(tmp_path: Path) -> None:
    for spelling in ("json", "JSON"):  # an upper-case value means the same
        done = run_cli(
            "report", str(tmp_path / "nowhere"), env={"PULSE_BATCH_LOG_FORMAT": spelling}
        )
        assert done.returncode == 2
        [line] = _json_lines(done.stderr)
        assert line["event"] == "cli_error" and line["level"] == "error"
        assert "nowhere" in line["message"]


def test_run_json_prints_the_report_on_stdout_and_the_lines_for_people_on_stderr(
    tmp_path: Path,
) -> None:
    manifest = faulty_manifest(tmp_path)
    with server_in_thread() as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest), "--json")
    assert done.returncode == 1, done.output  # the empty file failed
    report = json.loads(done.stdout)  # stdout is the JSON report and nothing else
    assert report["status"] == "completed" and report["items"]["failed"] == 1
    assert report["items"]["ok"] == report["items"]["total"] - 1 >= 1
    assert "report: " in done.stderr and "failed" in done.stderr  # where it is, the summary
    written = Path(done.stderr.split("report: ")[1].split()[0])
    assert json.loads(written.read_text()) == report


def test_a_usage_error_is_a_json_line_too(tmp_path: Path) -> None:
    manifest = faulty_manifest(tmp_path)
    done = run_cli("run", str(manifest), "--max-failures", "-3", "--log-format", "json")
    assert done.returncode == 2
    [line] = _json_lines(done.stderr)
    assert line["event"] == "usage_error" and "--max-failures" in line["message"]


def test_an_unknown_option_or_command_is_a_json_line_too(tmp_path: Path) -> None:
    # Found while parsing, before --log-format's own callback could choose JSON.
    manifest = faulty_manifest(tmp_path)
    option = run_cli("run", str(manifest), "--log-format", "json", "--concurrency", "3")
    command = run_cli("runn", str(manifest), env={"PULSE_BATCH_LOG_FORMAT": "json"})
    text = run_cli("run", str(manifest), "--log-format", "text", "--concurrency", "3",
                   env={"PULSE_BATCH_LOG_FORMAT": "json"})  # fmt: skip
    assert option.returncode == command.returncode == text.returncode == 2
    [line] = _json_lines(option.stderr)
    assert line["event"] == "usage_error" and "--concurrency" in line["message"]
    [line] = _json_lines(command.stderr)
    assert line["event"] == "usage_error" and "'runn'" in line["message"]
    assert "Error: No such option: --concurrency" in text.stderr  # the flag beats the env


def test_report_writes_the_html_of_a_past_run(tmp_path: Path) -> None:
    manifest = faulty_manifest(tmp_path)
    with server_in_thread() as server:
        point_at(manifest, server.url)
        first = run_cli("run", str(manifest))
        second = run_cli("run", str(manifest), "--force")
    assert first.returncode == second.returncode == 1
    first_id = first.stdout.split("run_id=")[1].split()[0]
    page = tmp_path / "first.html"
    done = run_cli("report", str(tmp_path / "out"), "--run", first_id, "--html", str(page))
    assert done.returncode == 0, done.output
    html = page.read_text(encoding="utf-8")
    assert first_id in html and "<svg" in html
    stored = tmp_path / "out" / "_reports" / "test-job" / f"{first_id}.html"
    assert stored.exists()
    missing = run_cli("report", str(tmp_path / "out"), "--run", "nope", "--html", str(page))
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr


def test_the_metrics_file_is_there_while_the_run_goes(tmp_path: Path) -> None:
    manifest = faulty_manifest(tmp_path, pace=1.0)  # 1 s items at real time: a run of seconds
    metrics_file = tmp_path / "pulse_batch.prom"
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            if metrics_file.exists():
                text = metrics_file.read_text()
                status = [s.labels["status"] for f in text_string_to_metric_families(text)
                          for s in f.samples if s.name == "pulse_batch_run_info"]  # fmt: skip
                seen.extend(status)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with server_in_thread() as server:
            point_at(manifest, server.url)
            done = run_cli("run", str(manifest), "--metrics-file", str(metrics_file))
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 1, done.output
    assert "running" in seen  # published before the end
    assert one(samples(metrics_file.read_text()), "pulse_batch_run_info", status="completed")


def test_a_crash_exits_70_with_its_traceback_a_json_record_in_json_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    azure_key = "QXp1cmUtYWNjb3VudC1rZXktdmFsdWU="  # what adlfs and deltalake read

    def broken(*_: object) -> None:  # stands for a bug anywhere under a command
        raise RuntimeError(f"a bug near {KEY} and {azure_key}")

    monkeypatch.setattr(console, "show_schema", broken)
    env = {"SMALLEST_API_KEY": KEY, "AZURE_STORAGE_ACCOUNT_KEY": azure_key}
    text = run_cli("schema", env=env)
    assert text.returncode == 70, text.output
    assert "internal error (a bug; please report it" in text.stderr
    assert "Traceback (most recent call last)" in text.stderr and "in broken" in text.stderr
    assert KEY not in text.stderr and azure_key not in text.stderr
    as_json = run_cli("schema", "--log-format", "json", env=env)
    assert as_json.returncode == 70
    [line] = _json_lines(as_json.stderr)
    assert (line["event"], line["level"]) == ("crash", "critical")
    assert "RuntimeError: a bug near" in line["message"] and "in broken" in line["exception"]
    assert KEY not in as_json.stderr and azure_key not in as_json.stderr  # scrubbed
