"""The retry policy is one pure function: exercised here without sockets."""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from batch.errors import (
    ConnectionLost,
    HandshakeRejected,
    InputError,
    InputUnavailable,
    ProtocolViolation,
    Scope,
    ServerReported,
    ServiceRefusing,
    ServiceStalling,
    ServiceUnreachable,
    SessionStalled,
    SessionTimeout,
    Unreachable,
    classify,
    error_kind,
    is_unreachable,
)
from batch.pool import AdaptiveLimit, RefusalStreak, SessionWatch, Tried, with_retries
from batch.retry import Backoff, RetryPolicy
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

        async def attempt(watch: SessionWatch) -> str:
            if errors:
                raise errors.pop(0)
            return "ok"

        tried = await with_retries(
            attempt,
            limit=AdaptiveLimit(1),
            policy=RetryPolicy(max_attempts, Backoff(initial_s=0.001, max_s=0.001)),
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


def test_one_policy_says_when_to_retry_and_how_long_to_wait() -> None:
    policy = RetryPolicy(3, Backoff(initial_s=0.5, max_s=4.0))
    rng = random.Random(0)
    assert policy.again(1, ConnectionLost("dropped")) and policy.again(
        2, InputUnavailable("x.wav", "503")
    )
    assert not policy.again(3, ConnectionLost("dropped"))  # the attempts ran out
    assert not policy.again(1, HandshakeRejected(401))  # the tree: no retry can fix it
    assert not policy.again(1, InputError("undecodable", "bad.wav", "not audio"))
    assert not policy.again(1, ValueError("ours"))  # not in the tree: a bug, not retried
    assert 0.25 <= policy.wait_s(1, ConnectionLost("dropped"), rng) <= 0.5
    assert policy.wait_s(1, HandshakeRejected(429, retry_after_s=3.0), rng) == 3.0
    assert policy.wait_s(1, HandshakeRejected(503, retry_after_s=1e6), rng) == 4.0  # capped


def test_a_policy_runs_blocking_work_and_raises_the_last_error() -> None:
    slept: list[float] = []
    heard: list[tuple[str, int]] = []
    failures = [FileNotFoundError("a"), FileNotFoundError("b")]

    def work() -> str:
        if failures:
            raise failures.pop(0)
        return "read"

    policy = RetryPolicy(
        3, Backoff(0.1, 0.2), retry_on=lambda error: isinstance(error, FileNotFoundError)
    )
    result = policy.call(
        work, sleep=slept.append, on_retry=lambda e, n, _: heard.append((str(e), n))
    )
    assert (result, heard, len(slept)) == ("read", [("a", 1), ("b", 2)], 2)
    assert 0.05 <= slept[0] <= 0.1 and 0.1 <= slept[1] <= 0.2  # doubling, jittered
    failures[:] = [FileNotFoundError(str(n)) for n in range(5)]
    with pytest.raises(FileNotFoundError, match="2"):  # three attempts, then the last error
        policy.call(work, sleep=slept.append)
    with pytest.raises(PermissionError):  # not retried at all
        policy.call(lambda: (_ for _ in ()).throw(PermissionError("no")), sleep=slept.append)


def test_a_policy_runs_async_work_by_the_error_tree() -> None:
    failures: list[Exception] = [InputUnavailable("s3://b/x.wav", "503")] * 2

    async def read() -> str:
        await anyio.lowlevel.checkpoint()
        if failures:
            raise failures.pop(0)
        return "decoded"

    policy = RetryPolicy(3, Backoff(0.001, 0.001))
    assert anyio.run(policy.acall, read) == "decoded"
    failures[:] = [InputError("undecodable", "x.wav", "not audio")]
    with pytest.raises(InputError, match="not audio"):
        anyio.run(policy.acall, read)
    assert failures == []  # tried once


def test_the_pools_streak_stops_retries_when_the_service_accepts_nothing() -> None:
    """The streak is judged in the pool's retry loop: refusals with nothing open, and
    stalls of sessions that opened, each end the job at the limit."""

    async def run(error: Exception, opens: bool, streak: RefusalStreak) -> Tried[str]:
        async def attempt(watch: SessionWatch) -> str:
            if opens:
                watch.opened()
            raise error

        policy = RetryPolicy(10, Backoff(0.001, 0.001))
        limit = AdaptiveLimit(1)
        return await with_retries(
            attempt, limit=limit, policy=policy, rng=random.Random(0), streak=streak
        )

    async def main() -> None:
        refused = await run(HandshakeRejected(503), False, RefusalStreak(3, "pulse.test:443"))
        assert isinstance(refused.error, ServiceRefusing) and refused.attempts == 3
        lost = Unreachable("cannot reach the service: refused")
        unreachable = await run(lost, False, streak := RefusalStreak(2, "pulse.test:443"))
        assert isinstance(unreachable.error, ServiceUnreachable) and unreachable.attempts == 2
        assert "pulse.test:443" in str(unreachable.error)
        assert streak.unreachable() is not None  # nothing ever opened: the job says so
        stalled = await run(SessionStalled(15.0, 16.0, 15.0, True), True, RefusalStreak(4))
        assert isinstance(stalled.error, ServiceStalling) and stalled.attempts == 4
        # Sessions that open and fail otherwise are the item's own trouble: its attempts.
        dropped = await run(ConnectionLost("dropped"), True, RefusalStreak(2))
        assert isinstance(dropped.error, ConnectionLost) and dropped.attempts == 10

    anyio.run(main)
