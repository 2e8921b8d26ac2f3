"""One retry policy for every loop that tries again: sessions, reads, probes, commits.

A `RetryPolicy` says how many attempts in all (``max_attempts``), how long to wait between
them (`Backoff`: exponential with full jitter, capped; a service's ``Retry-After`` honoured
up to the cap) and which errors another attempt can get past (``retry_on``; by default the
error tree's verdict, `retryable`: ``classify(error).retry`` at item scope). `call` runs a
function under it where blocking is allowed (a worker thread), `acall` on the event loop;
both are tenacity configured explicitly (stop, wait, predicate, ``reraise``; tenacity's
defaults retry forever). The session loop (`batch.pool.with_retries`) waits and decides by
the same policy, with a stop of its own (a concurrency refusal spares an item's attempts).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from batch.errors import Scope, classify

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Hears each retry: the error, the attempt that failed (from 1), the wait before the next.
OnRetry = Callable[[BaseException, int, float], None]


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, capped at ``max_s``; Retry-After wins when it
    is longer, up to the same cap (a service asking for days gets ``max_s``)."""

    initial_s: float = 0.5
    max_s: float = 30.0
    seed: int | None = None

    def delay_s(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        ceiling = min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1))
        delay = rng.uniform(ceiling / 2, ceiling)  # jitter keeps retries from firing together
        return max(delay, min(retry_after_s or 0.0, self.max_s))


def retryable(error: BaseException) -> bool:
    """The error tree's verdict: another attempt can help, and only this item is hurt."""
    verdict = classify(error)
    return verdict.retry and verdict.scope is Scope.ITEM


_RNG = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    """How one kind of work is tried again (see the module docstring). Pure decisions:
    `again` and `wait_s`; `call` and `acall` run work under them."""

    max_attempts: int
    backoff: Backoff = field(default_factory=Backoff)
    retry_on: Callable[[BaseException], bool] = retryable

    def again(self, attempt: int, error: BaseException) -> bool:
        """Whether attempt ``attempt`` (from 1), failed with ``error``, is followed by
        another."""
        return attempt < self.max_attempts and self.retry_on(error)

    def wait_s(self, attempt: int, error: BaseException | None, rng: random.Random) -> float:
        """The wait after attempt ``attempt`` failed with ``error``: the backoff, or the
        ``Retry-After`` the service asked for when longer (up to the cap)."""
        retry_after_s = classify(error).retry_after_s if error is not None else None
        return self.backoff.delay_s(attempt, retry_after_s, rng)

    def _settings(
        self, rng: random.Random, on_retry: OnRetry | None, sleep: Callable[[float], Any]
    ) -> dict[str, Any]:
        """tenacity's settings for this policy, waiting with ``sleep``."""

        def wait(state: RetryCallState) -> float:
            return self.wait_s(state.attempt_number, error_of(state), rng)

        def before_sleep(state: RetryCallState) -> None:
            error = error_of(state)
            if on_retry is not None and error is not None:
                delay_s = state.next_action.sleep if state.next_action else 0.0
                on_retry(error, state.attempt_number, delay_s)

        return {
            "stop": stop_after_attempt(self.max_attempts),
            "wait": wait,
            "retry": retry_if_exception(self.retry_on),
            "reraise": True,
            "sleep": sleep,
            "before_sleep": before_sleep,
        }

    def call(
        self,
        work: Callable[[], T],
        *,
        on_retry: OnRetry | None = None,
        rng: random.Random = _RNG,
        sleep: Callable[[float], None] = time.sleep,
    ) -> T:
        """``work()`` until it returns, fails with an error not worth retrying, or the
        attempts run out; then its last error is raised. Blocks while it waits: for a
        worker thread, or a command's own short loop."""
        return Retrying(**self._settings(rng, on_retry, sleep))(work)

    async def acall(
        self,
        work: Callable[[], Awaitable[T]],
        *,
        on_retry: OnRetry | None = None,
        rng: random.Random = _RNG,
    ) -> T:
        """`call` on the event loop: the waits are ``anyio.sleep``."""
        retrying = AsyncRetrying(**self._settings(rng, on_retry, anyio.sleep))
        async for attempt in retrying:
            with attempt:
                return await work()
        raise AssertionError("unreachable: tenacity re-raises the last error")


def error_of(state: RetryCallState) -> BaseException | None:
    """The error the attempt that just ended failed with (None when it returned)."""
    return state.outcome.exception() if state.outcome else None
