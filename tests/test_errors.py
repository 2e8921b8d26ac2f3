"""The retry policy is one pure function: exercised here without sockets."""

from __future__ import annotations

import random

import anyio
import pytest

from batch.errors import (
    ConnectionLost,
    HandshakeRejected,
    InputError,
    ProtocolViolation,
    Scope,
    ServerReported,
    ServiceUnreachable,
    SessionTimeout,
    Unreachable,
    classify,
    error_kind,
    is_unreachable,
)
from batch.pool import AdaptiveLimit, Backoff, Tried, with_retries
from batch.session import Endpoint


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_refusals_that_no_retry_can_fix_stop_the_job(status: int) -> None:
    verdict = classify(HandshakeRejected(status))
    assert (verdict.retry, verdict.scope) == (False, Scope.JOB)


def test_concurrency_refusals_are_overload_and_honour_retry_after() -> None:
    verdict = classify(HandshakeRejected(429, retry_after_s=7.0))
    assert verdict.retry and verdict.overloaded and verdict.retry_after_s == 7.0
    assert classify(ConnectionLost("limit", close_code=1008)).overloaded


@pytest.mark.parametrize(
    "error",
    [
        HandshakeRejected(500),
        HandshakeRejected(503),
        ConnectionLost("dropped"),
        ServerReported("boom", "internal_error"),
        ProtocolViolation("not json"),
        SessionTimeout("final_timeout_s", 1.0),
    ],
)
def test_transient_failures_retry_the_item(error: Exception) -> None:
    verdict = classify(error)
    assert (verdict.retry, verdict.scope, verdict.overloaded) == (True, Scope.ITEM, False)


def test_bad_input_never_retries() -> None:
    error = InputError("not_media", "/x.wav", "not media")
    assert classify(error).retry is False
    assert error_kind(error) == "not_media"
    assert error_kind(HandshakeRejected(503)) == "http_503"


def test_failed_connections_retry_but_count_toward_the_streak() -> None:
    refused = Unreachable("cannot reach the service: Connect call failed")
    assert classify(refused).retry and classify(refused).scope is Scope.ITEM
    assert error_kind(refused) == "connection_lost"  # the stored kind is unchanged
    assert is_unreachable(refused) and is_unreachable(SessionTimeout("connect_timeout_s", 10))
    # Lost after the session opened, or a slow final: the service was reached.
    assert not is_unreachable(ConnectionLost("dropped"))
    assert not is_unreachable(SessionTimeout("final_timeout_s", 30))
    stop = ServiceUnreachable(30, refused, "api.example.com:443")
    assert classify(stop).scope is Scope.JOB and not classify(stop).retry
    assert "cannot reach the service at api.example.com:443" in str(stop)


def test_endpoint_host_for_messages_never_holds_a_password() -> None:
    endpoint = Endpoint.resolve("wss://user:sk-secret@api.example.com:8443/api/v1/pulse/get_text")
    assert endpoint.host == "api.example.com:8443"
    assert Endpoint.resolve("ws://[::1]:9/api/v1/pulse/get_text").host == "[::1]:9"


def test_backoff_grows_is_capped_and_respects_retry_after() -> None:
    backoff = Backoff(initial_s=0.5, max_s=4.0)
    rng = random.Random(0)
    delays = [backoff.delay_s(n, None, rng) for n in range(1, 8)]
    assert all(0.25 <= d <= 4.0 for d in delays)
    assert max(delays[4:]) > max(delays[:1])
    assert backoff.delay_s(1, 3.5, rng) == 3.5  # Retry-After wins when longer,
    assert backoff.delay_s(1, 9.0, rng) == 4.0  # up to the cap
    assert backoff.delay_s(1, 1e8, rng) == 4.0


def test_retries_say_what_came_of_them() -> None:
    """`with_retries` returns its value or its last error, with the attempts it took."""

    async def tries(errors: list[Exception], max_attempts: int = 3) -> tuple[Tried[str], list[int]]:
        heard: list[int] = []

        async def attempt() -> str:
            if errors:
                raise errors.pop(0)
            return "ok"

        tried = await with_retries(
            attempt,
            limit=AdaptiveLimit(1),
            max_attempts=max_attempts,
            backoff=Backoff(initial_s=0.001, max_s=0.001),
            rng=random.Random(0),
            on_attempt=heard.append,
        )
        return tried, heard

    async def main() -> None:
        transient = [ConnectionLost("dropped"), SessionTimeout("final_timeout_s", 1)]
        tried, heard = await tries(transient)
        assert (tried.value, tried.error, tried.attempts, heard) == ("ok", None, 3, [1, 2, 3])
        fatal = HandshakeRejected(401)
        tried, heard = await tries([fatal, ConnectionLost("never reached")])
        assert (tried.value, tried.error, tried.attempts, heard) == (None, fatal, 1, [1])
        last = ConnectionLost("again")
        tried, _ = await tries([ConnectionLost("first"), last, ConnectionLost("x")], 2)
        assert (tried.error, tried.attempts) == (last, 2)  # the budget ran out: the last error

    anyio.run(main)
