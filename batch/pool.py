"""A bounded pool of sessions: at most N open at once, retries with backoff, adaptive size.

Structured concurrency only: a fixed set of worker tasks in one task group pulls work in
order; each session holds a slot of an `AdaptiveLimit` while it is open. When the service
refuses sessions for concurrency, the limit shrinks (multiplicatively) and grows back by one
after a run of successes, so a job configured above the account's limit still finishes.
`with_retries` tries a session again by the run's `batch.retry.RetryPolicy`, and counts
each failed attempt in the `RefusalStreak` that stops a job the service accepts nothing of.
"""

from __future__ import annotations

import logging
import random
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception
from tenacity.stop import stop_base

from batch.errors import (
    ServiceRefusing,
    ServiceStalling,
    ServiceUnreachable,
    SessionStalled,
    classify,
    error_kind,
    is_refusal,
    is_unreachable,
)
from batch.retry import Backoff as Backoff
from batch.retry import RetryPolicy, error_of

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class AdaptiveLimit:
    """A capacity limiter whose size follows the service's refusals (AIMD)."""

    def __init__(self, ceiling: int, grow_after: int = 4) -> None:
        self.ceiling = ceiling
        self._limiter = anyio.CapacityLimiter(ceiling)
        self._grow_after = grow_after
        self._successes = 0
        self.open_now = 0
        self.max_open = 0
        self.lowest = ceiling

    @property
    def size(self) -> int:
        return int(self._limiter.total_tokens)

    async def __aenter__(self) -> None:
        await self._limiter.acquire()
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)

    async def __aexit__(self, *exc_info: object) -> None:
        self.open_now -= 1
        self._limiter.release()

    def refused(self) -> None:
        """The service said too many sessions: back off to what is open now, less one."""
        target = max(1, min(self.size, self.open_now) - 1)
        if target < self.size:
            logger.info(
                "service refused a session for concurrency; pool %d -> %d", self.size, target
            )
            self._limiter.total_tokens = target
            self.lowest = min(self.lowest, target)
        self._successes = 0

    def succeeded(self) -> None:
        self._successes += 1
        if self._successes >= self._grow_after and self.size < self.ceiling:
            self._limiter.total_tokens = self.size + 1
            self._successes = 0


class RefusalStreak:
    """Refusals in a row while none of our sessions is open: the service accepts nothing.

    A refusal while some of our sessions are open is the service's concurrency limit (the
    pool shrinks to it); only refusals with nothing open count, and any session that opens
    resets the count. Failed connections (nothing listening, DNS, TLS) count the same way:
    an endpoint that cannot be reached refuses everything too. `refused` says when
    ``limit`` is reached. Stalls (a session that took audio and answered nothing) are
    counted apart, in a row of attempts that ended (`SessionWatch.stalled`): a service
    that stalls every session refuses everything as surely as one that says no.
    """

    def __init__(self, limit: int, host: str = "?") -> None:
        self.limit = limit
        self.host = host  # the service's host:port, for the error that stops the job
        self.count = 0
        self.open_now = 0
        self.stalls = 0
        self.ever_opened = False  # any session of the run opened
        self.last_unreachable: BaseException | None = None  # the last failure, if it was one

    def refused(self) -> bool:
        if self.open_now == 0:
            self.count += 1
        return self.count >= self.limit

    def watch(self) -> SessionWatch:
        return SessionWatch(self)

    def judge(self, error: Exception, watch: SessionWatch) -> None:
        """Count an attempt that failed with ``error`` (before ``watch`` ends); raises what
        ends the job (`ServiceUnreachable`, `ServiceRefusing`, `ServiceStalling`, from
        ``error``) when such failures in a row reached the limit."""
        self.last_unreachable = error if is_unreachable(error) else None
        if is_unreachable(error) and self.refused():
            raise ServiceUnreachable(self.count, error, self.host) from error
        if is_refusal(error) and self.refused():
            raise ServiceRefusing(self.count, error) from error
        if isinstance(error, SessionStalled) and watch.stalled():
            raise ServiceStalling(self.stalls, error) from error

    def unreachable(self) -> ServiceUnreachable | None:
        """`ServiceUnreachable` when no session of the run opened and its last failed
        attempt could not connect: a job too small to reach the limit ends as a big one
        does (exit 6, naming the host), not as items that lost a connection."""
        if self.ever_opened or self.last_unreachable is None:
            return None
        return ServiceUnreachable(self.count, self.last_unreachable, self.host)


class SessionWatch:
    """One attempt's part in a `RefusalStreak`: `opened` once the handshake passed,
    `ended` when the attempt is over (whatever happened)."""

    def __init__(self, streak: RefusalStreak) -> None:
        self._streak = streak
        self._open = False
        self._stalled = False

    def stalled(self) -> bool:
        """This attempt stalled; True when stalls in a row reached the limit."""
        self._stalled = True
        self._streak.stalls += 1
        return self._streak.stalls >= self._streak.limit

    def opened(self) -> None:
        self._open = True
        self._streak.ever_opened = True
        self._streak.open_now += 1
        self._streak.count = 0

    def ended(self) -> None:
        if self._open:
            self._open = False
            self._streak.open_now -= 1
            if not self._stalled:  # any other end (an answer, another failure) breaks a row
                self._streak.stalls = 0


class _AttemptBudget(stop_base):
    """Stop after ``max_attempts`` real failures; concurrency refusals count separately
    (up to ``max_overloads``), so a full account does not use up an item's attempts."""

    def __init__(self, max_attempts: int, max_overloads: int) -> None:
        self.max_attempts = max_attempts
        self.max_overloads = max_overloads
        self.failures = 0
        self.overloads = 0

    def __call__(self, retry_state: RetryCallState) -> bool:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        if error is not None and classify(error).overloaded:
            self.overloads += 1
        else:
            self.failures += 1
        return self.failures >= self.max_attempts or self.overloads > self.max_overloads


@dataclass(frozen=True)
class Tried(Generic[R]):
    """What retrying one piece of work came to: its ``value``, or the last ``error`` (not
    worth retrying, or the budget ran out); and how many ``attempts`` that took."""

    attempts: int
    value: R | None = None
    error: Exception | None = None


def retry_line(label: str, attempt: int, error: BaseException | None, delay_s: float) -> str:
    """The log line of a retry: what is streamed (unless the error names it already), the
    attempt, why it failed, when it is tried again. Pure."""
    text = str(error)
    where = f"{label}: " if label and label not in text else ""
    return f"{where}attempt {attempt} failed ({text}); retrying in {delay_s:.1f} s"


def _no_count(attempt: int) -> None:
    """The default `on_attempt`: nothing to count."""


async def with_retries(
    attempt: Callable[[SessionWatch], Awaitable[R]],
    *,
    limit: AdaptiveLimit,
    policy: RetryPolicy,
    rng: random.Random,
    streak: RefusalStreak | None = None,
    on_attempt: Callable[[int], None] = _no_count,
    max_overloads: int = 50,
    label: str = "",
    on_retry: Callable[[BaseException], None] | None = None,
    log_fields: Mapping[str, object] | None = None,
) -> Tried[R]:
    """Run ``attempt`` (one session) until it succeeds, a failure is not worth retrying, or
    the budget runs out; the last error is returned, not raised (cancellation is raised).
    Each attempt holds a pool slot and a `SessionWatch` of ``streak`` (it calls `opened`
    once its session opened); a failure is judged there, and a streak at its limit ends
    the retries with the error that stops the job. ``policy`` says which errors are
    retried and how long to wait; concurrency refusals count apart (``max_overloads``).
    ``on_attempt`` hears each attempt's number as it starts (before its slot: a run
    cancelled meanwhile still counts it). ``label`` names what is streamed (the file) in
    the retry log lines, ``log_fields`` says it as structured fields (item_id, source,
    ...); ``on_retry`` hears the error each retry follows."""
    streak = streak if streak is not None else RefusalStreak(sys.maxsize)

    def wait(state: RetryCallState) -> float:
        return policy.wait_s(state.attempt_number, error_of(state), rng)

    def before_sleep(state: RetryCallState) -> None:
        error = error_of(state)
        delay_s = state.next_action.sleep if state.next_action else 0.0
        fields = {**(log_fields or {}), "attempt": state.attempt_number, "event": "session_retry"}
        if error is not None:
            fields["error_kind"] = error_kind(error)
        logger.info("%s", retry_line(label, state.attempt_number, error, delay_s), extra=fields)
        if on_retry is not None and error is not None:
            on_retry(error)

    retrying = AsyncRetrying(
        stop=_AttemptBudget(policy.max_attempts, max_overloads),
        wait=wait,
        retry=retry_if_exception(policy.retry_on),
        reraise=True,
        sleep=anyio.sleep,
        before_sleep=before_sleep,
    )
    attempts = 0
    try:
        async for trial in retrying:
            with trial:
                attempts += 1
                on_attempt(attempts)
                async with limit:
                    watch = streak.watch()
                    try:
                        result = await attempt(watch)
                    except Exception as error:
                        if classify(error).overloaded:
                            limit.refused()
                        streak.judge(error, watch)
                        raise
                    finally:
                        watch.ended()
                limit.succeeded()
                return Tried(attempts, value=result)
    except Exception as error:  # tenacity re-raised the last attempt's error
        return Tried(attempts, error=error)
    raise AssertionError("unreachable: tenacity re-raises the last error")


class Pool(Generic[T]):
    """Runs ``worker`` over items in order with at most ``workers`` at once.

    Work may be added while the pool runs (`push_front`); idle workers wait for it until
    no worker is busy and the queue is empty.
    """

    def __init__(self, items: Iterable[T], workers: int) -> None:
        self._queue = deque(items)
        self._workers = max(1, workers)
        self._busy = 0
        self._changed = anyio.Event()
        self.stopping = False

    def push_front(self, items: Iterable[T]) -> None:
        """Queue ``items`` ahead of everything else, keeping their order."""
        if not self.stopping:
            self._queue.extendleft(reversed(list(items)))
            self._notify()

    def take_next(self, wanted: Callable[[T], bool]) -> T | None:
        """The next queued item if ``wanted`` takes it (a worker going on with it), else
        None: only the head, so work keeps its order."""
        if self.stopping or not self._queue or not wanted(self._queue[0]):
            return None
        return self._queue.popleft()

    def stop_starting(self) -> list[T]:
        """Start no new items; returns those that will not run."""
        self.stopping = True
        left = list(self._queue)
        self._queue.clear()
        self._notify()
        return left

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def run(self, worker: Callable[[T], Awaitable[None]]) -> None:
        async def loop() -> None:
            while not self.stopping:
                if self._queue:
                    self._busy += 1
                    try:
                        await worker(self._queue.popleft())
                    finally:
                        self._busy -= 1
                        self._notify()
                elif self._busy == 0:
                    return
                else:
                    await self._changed.wait()

        async with anyio.create_task_group() as tasks:
            for _ in range(self._workers):
                tasks.start_soon(loop)
