"""Secrets never leave the header: keys echoed by the service are scrubbed from every log,
report and table; odd keys are normalised or refused before the first session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batch.credentials import REDACTED, Scrubber, normalise_api_key
from batch.errors import ManifestError
from batch.server import FaultConfig
from tests.conftest import point_at, run_cli, server_in_thread, write_manifest
from tests.media import Burst, tone_files
from tests.tables import parquet

KEY = "sk-live-7f3c9a2b4d6e8f10a1b2"
ITEMS = 6


def _media(folder: Path) -> None:
    tone_files(folder, ITEMS, [Burst(0.3, 0.2, 440)], 1.0)


def _run(
    tmp_path: Path, faults: FaultConfig, env_key: str, server_key: str = KEY, **run: Any
) -> tuple[Any, Any]:
    _media(tmp_path / "media")
    settings = {"concurrency": 3, "pace": 0, "max_attempts": 1, "backoff_initial_s": 0.05,
                "backoff_max_s": 0.2, **run}  # fmt: skip
    manifest = write_manifest(tmp_path, run=settings)
    with server_in_thread(faults=faults, api_key=server_key) as server:
        point_at(manifest, server.url)
        done = run_cli("run", str(manifest), "-v", env={"SMALLEST_API_KEY": env_key})
        stats = server.stats
    return done, stats


def _written(tmp_path: Path) -> bytes:
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert files
    return b"".join(p.read_bytes() for p in files)


def _assert_nowhere(secret: str, done: Any, tmp_path: Path) -> None:
    assert secret not in done.stdout + done.stderr
    assert secret.encode() not in _written(tmp_path)
    for piece in (secret[:8], secret[-8:]):  # nor a cut-off piece of it
        assert piece not in done.stdout + done.stderr


def test_key_echoed_in_a_401_body_stays_out_of_output(tmp_path: Path) -> None:
    wrong = "sk-wrong-0123456789abcdef0123"
    faults = FaultConfig(echo_authorization=True)
    done, stats = _run(tmp_path, faults, env_key=wrong)
    assert done.returncode == 3, done.stdout + done.stderr
    assert stats.refused[401] >= 1
    assert "401" in done.stderr and REDACTED in done.stderr  # the echo arrived, scrubbed
    _assert_nowhere(wrong, done, tmp_path)


def test_key_echoed_in_503_bodies_and_error_messages_stays_out(tmp_path: Path) -> None:
    import duckdb

    faults = FaultConfig(seed=7, refuse_5xx_rate=0.3, error_rate=0.4, echo_authorization=True)
    done, stats = _run(tmp_path, faults, env_key=KEY)
    assert stats.faults["refuse_5xx"] >= 1 and stats.faults["error"] >= 1
    assert done.returncode == 1, done.stdout + done.stderr
    _assert_nowhere(KEY, done, tmp_path)
    t = parquet(tmp_path / "out", "transcripts")
    errors = duckdb.sql(f"select error_kind, error from {t} where status='failed'").fetchall()
    kinds = {kind for kind, _ in errors}
    assert {"http_503", "server_error"} <= kinds | {"connection_lost"}
    assert all(REDACTED in message for _, message in errors), errors


@pytest.mark.parametrize(
    "pasted", [f"Bearer {KEY}", f"  {KEY}\n", f"bearer   {KEY} "], ids=["bearer", "spaces", "both"]
)
def test_pasted_key_is_normalised_and_never_half_scrubbed(pasted: str, tmp_path: Path) -> None:
    done, stats = _run(tmp_path, FaultConfig(), env_key=pasted)
    assert done.returncode == 0, done.stdout + done.stderr
    assert stats.sessions_completed == ITEMS
    assert "Authorization" in done.stderr  # debug logging really was on
    _assert_nowhere(KEY, done, tmp_path)


@pytest.mark.parametrize(
    "pasted",
    [f"{KEY}\r\nX-Injected: 1", f"{KEY[:10]} {KEY[10:]}", f"{KEY}\x1b[0m"],
    ids=["crlf", "inner-space", "escape"],
)
def test_unusable_key_is_refused_before_any_session(pasted: str, tmp_path: Path) -> None:
    done, stats = _run(tmp_path, FaultConfig(), env_key=pasted)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "SMALLEST_API_KEY" in done.stderr
    assert stats.sessions_opened == 0 and sum(stats.refused.values()) == 0
    assert KEY[:10] not in done.stdout + done.stderr
    assert KEY[10:] not in done.stdout + done.stderr


def test_missing_key_for_the_service_stops_before_planning(tmp_path: Path) -> None:
    # Without a key nothing can be streamed: say so before probing every file and before
    # a starting report that would stay `running` forever.
    _media(tmp_path / "media")
    manifest = write_manifest(
        tmp_path, pulse={"endpoint": "wss://api.smallest.ai/waves/v1/pulse/get_text"}
    )
    env = {"SMALLEST_API_KEY": ""}
    done = run_cli("run", str(manifest), env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "SMALLEST_API_KEY is not set" in done.stderr
    assert "planned" not in done.stderr
    assert not (tmp_path / "out" / "_reports").exists()


def test_normalise_api_key() -> None:
    assert normalise_api_key(f" Bearer {KEY} ", "K") == KEY
    assert normalise_api_key(KEY, "K") == KEY
    for bad in ("", "  ", "Bearer ", "a b", "a\tb", "ab\x7f", "ключ"):
        with pytest.raises(ManifestError) as caught:
            normalise_api_key(bad, "K")
        assert bad.strip() == "" or bad.strip() not in str(caught.value)


def test_scrubber_removes_whole_keys_and_cut_off_pieces() -> None:
    scrub = Scrubber(KEY).scrub
    assert scrub(f"header Bearer {KEY} echoed") == f"header Bearer {REDACTED} echoed"
    assert scrub(f"cut here: {KEY[:12]}") == f"cut here: {REDACTED}"
    assert scrub(f"{KEY[-9:]} was the tail") == f"{REDACTED} was the tail"
    assert scrub("nothing secret") == "nothing secret"
    assert Scrubber(None).scrub(KEY) == KEY


def test_key_echoed_inside_a_transcript_is_not_stored() -> None:
    import json

    from batch.pulse import protocol
    from batch.pulse.machine import SessionMachine

    machine = SessionMachine(
        protocol.Generation.LEGACY, protocol.PulseOptions(), 0.0, scrubber=Scrubber(KEY)
    )
    frame = {"session_id": "s", "transcript": f"your key is {KEY}", "is_final": True,
             "words": [{"word": KEY, "start": 0.1, "end": 0.2, "confidence": 0.9}]}  # fmt: skip
    assert list(machine.receive(json.dumps(frame), 1.0)) == []
    stored = json.dumps([repr(f) for f in machine.result.finals])
    assert KEY not in stored and REDACTED in stored


# --- storage credentials in logs, found by pattern ---------------------------------------

TOKEN = "IQoJb3JpZ2luX2VjEPulseFakeSessionToken/4f7c+2a9e=="


def test_credential_headers_and_fields_are_redacted_by_pattern() -> None:
    from batch.credentials import redact_credentials

    lines = {
        "headers={'X-Amz-Security-Token': b'TOKEN', 'Authorization': b'AWS4-HMAC-SHA256 "
        "Credential=ASIA/x, SignedHeaders=host, Signature=abc123'}": "'X-Amz-Security-Token'",
        "CanonicalRequest:\nGET\n/\n\nx-amz-security-token:TOKEN\n\nhost;x-amz-date": "host;",
        '{"authorization": "Bearer TOKEN", "a": 1}': '"a": 1',
        "Authorization: SharedKey acct:TOKEN": "Authorization:",
        "GET https://a.blob.core.windows.net/c/x.wav?sv=2024&sig=TOKEN&se=2026": "sv=2024",
        "https://s3/x?X-Amz-Security-Token=TOKEN&X-Amz-Signature=TOKEN": "https://s3/x?",
        "AccountName=a;AccountKey=TOKEN;EndpointSuffix=core": "EndpointSuffix",
        "refused: Bearer TOKEN": "refused:",
        "Signature:\n" + "ab12" * 16: "Signature:",
    }
    for line, kept in lines.items():
        redacted = redact_credentials(line.replace("TOKEN", TOKEN))
        assert TOKEN not in redacted and REDACTED in redacted, redacted
        assert kept in redacted, redacted
    password = "p%2Fss-" + TOKEN[:12]  # a password in a URL is percent-encoded
    assert redact_credentials(f"wss://user:{password}@host/x") == f"wss://user:{REDACTED}@host/x"
    from batch.output.store_errors import reason

    url = f"https://acct.blob.core.windows.net/c/x.wav?sv=2024&sig={TOKEN}"
    said = reason(f"503 ServerBusy reading {url}", "az://c/out")  # quoted whole
    assert TOKEN not in said and "ServerBusy reading https://acct" in said
    plain = "the bearer of news; max_tokens=5; Signature: pending; host;x-amz-security-token"
    assert redact_credentials(plain) == plain


def test_a_profile_session_token_never_reaches_a_verbose_log(
    tmp_path: Path, s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.s3server import FAKE_KEY_ID, FAKE_SECRET

    _media(tmp_path / "local")
    url = s3_bucket.upload(tmp_path / "local" / "item-0.wav", "in/item-0.wav")
    # Temporary credentials from a profile file, as a role or SSO login leaves them: no
    # environment variable holds the token, so only its pattern can find it.
    profile = tmp_path / "credentials"
    profile.write_text(
        f"[batch]\naws_access_key_id = {FAKE_KEY_ID}\n"
        f"aws_secret_access_key = {FAKE_SECRET}\naws_session_token = {TOKEN}\n"
    )
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(profile))
    monkeypatch.setenv("AWS_PROFILE", "batch")
    manifest = write_manifest(tmp_path, inputs=[{"path": url}], run={"max_attempts": 1})
    done = run_cli("run", str(manifest), "-v")
    assert done.returncode == 0, done.stdout + done.stderr
    logged = done.stderr
    assert "botocore.auth" in logged and "x-amz-security-token: [redacted]" in logged
    assert "'X-Amz-Security-Token': b'[redacted]'" in logged
    assert TOKEN not in logged and TOKEN[:16] not in logged
    assert FAKE_SECRET not in logged


def test_a_traceback_in_a_log_record_is_cleaned_too() -> None:
    import io
    import logging

    from batch.credentials import RedactingFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter(Scrubber(KEY)))
    log = logging.getLogger("tests.redaction")
    log.addHandler(handler)
    log.propagate = False
    try:
        raise RuntimeError(f"request failed: {{'x-amz-security-token': '{TOKEN}'}} key {KEY}")
    except RuntimeError:
        log.exception("store said %s", f"Authorization: Bearer {TOKEN}")
    finally:
        log.removeHandler(handler)
    written = stream.getvalue()
    assert "RuntimeError: request failed" in written and "Traceback" in written
    assert TOKEN not in written and KEY not in written
    assert "key [redacted]" in written and "Authorization: [redacted]" in written
