"""JSON log lines (`--log-format json`): one object a line, stable events, the run's fields,
and no secret in any field."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest

from batch.credentials import RedactingFilter, Scrubber
from batch.logjson import JsonFormatter, RunContext, event_of

KEY = "sk_live_0123456789abcdefXYZ"


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, RunContext]]:
    """A logger writing JSON lines to a buffer, as the CLI sets it up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    context = RunContext()
    handler.addFilter(context)
    handler.addFilter(RedactingFilter(Scrubber(KEY)))
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("batch.test_logjson")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield stream, context
    log.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_record_is_one_json_line_with_its_fields_and_the_runs(
    captured: tuple[io.StringIO, RunContext],
) -> None:
    stream, context = captured
    context.set(job="nightly", run_id="20261204T000000Z-abc123", shard="1/4")
    log = logging.getLogger("batch.test_logjson")
    log.info(
        "ok %s\n(%.1f s)",
        "a.wav",
        2.5,
        extra={"event": "item_done", "item_id": "i1", "source": "a.wav", "status": "ok",
               "audio_s": 2.5, "channel": "agent"},
    )  # fmt: skip
    [line] = lines(stream)
    assert line["event"] == "item_done" and line["level"] == "info"
    assert line["message"] == "ok a.wav\n(2.5 s)"  # one line all the same: JSON escapes it
    assert str(line["ts"]).endswith("Z") and "T" in str(line["ts"])
    expected = {"job": "nightly", "run_id": "20261204T000000Z-abc123", "shard": "1/4",
                "item_id": "i1", "source": "a.wav", "status": "ok", "audio_s": 2.5,
                "channel": "agent"}  # fmt: skip
    assert {k: line[k] for k in expected} == expected


def test_a_secret_in_any_field_is_scrubbed(captured: tuple[io.StringIO, RunContext]) -> None:
    stream, context = captured
    context.set(job=f"job-{KEY}")
    log = logging.getLogger("batch.test_logjson")
    fields = {"source": f"https://h/a.wav?token={KEY}", "error_kind": KEY, "item_id": KEY[:12]}
    try:
        raise ValueError(f"Authorization: Bearer {KEY}")
    except ValueError:
        log.exception("failed %s", KEY, extra={**fields, "event": "item_done"})
    text = stream.getvalue()
    assert KEY not in text and KEY[:12] not in text
    [line] = lines(stream)
    assert line["source"] == "https://h/a.wav?token=[redacted]"
    assert line["error_kind"] == "[redacted]" and line["job"] == "job-[redacted]"
    assert "[redacted]" in str(line["exception"])


@pytest.mark.parametrize(
    ("template", "event"),
    [
        ("attempt %d failed (%s); retrying", "session_retry"),
        ("glob: cannot list %s: %s", "glob_cannot_list"),
        ("%s: %d pieces of about %.0f s", "item_split"),
        ("%s", "test_logjson_message"),
    ],
)
def test_events_are_stable_names_by_template(template: str, event: str) -> None:
    record = logging.LogRecord("batch.test_logjson", logging.INFO, "f", 1, template, None, None)
    assert event_of(record) == event


def test_library_warnings_become_json_lines(captured: tuple[io.StringIO, RunContext]) -> None:
    stream, _ = captured
    handler = logging.getLogger("batch.test_logjson").handlers[0]
    py = logging.getLogger("py.warnings")
    py.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # pytest turns warnings into errors
            logging.captureWarnings(True)
            warnings.warn_explicit("old thing", UserWarning, "lib.py", 3)
    finally:
        logging.captureWarnings(False)
        py.removeHandler(handler)
    [line] = lines(stream)
    assert line["event"] == "python_warning" and "old thing" in str(line["message"])
