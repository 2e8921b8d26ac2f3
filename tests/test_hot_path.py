"""The streaming hot path's shortcuts keep their contracts: the pacing grid's shared timers
wake every waiter on its tick (never early, one cancelled waiter cancels no other), a
frame is walked for secrets whenever a decoded string could hold one, and the shared
readers serve sessions that ask together without a thread each, while a stalled read
holds up no other session's reads for long."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import pytest

from batch.credentials import REDACTED, Scrubber
from batch.pacing import TICK_S, Grid
from batch.pulse.protocol import parse_message
from batch.readahead import ReadAhead
from tests.conftest import TIME_UNIT_S

KEY = "sk-live-0123456789abcdefXYZ"


@pytest.mark.anyio
async def test_waiters_due_in_one_tick_share_one_timer_and_none_wakes_early() -> None:
    loop = asyncio.get_running_loop()
    timers = 0
    call_at = loop.call_at

    def counted(when: float, callback, *args):  # type: ignore[no-untyped-def]
        nonlocal timers
        timers += 1
        return call_at(when, callback, *args)

    loop.call_at = counted  # type: ignore[method-assign]
    try:
        grid = Grid(loop)
        start = loop.time()
        dues = [start + 0.05 + i * TICK_S / 10 for i in range(10)] * 3  # within 1-2 ticks
        woke: list[float] = []

        async def wait(due: float) -> None:
            await grid.wait_until(due)
            woke.append(loop.time() - due)

        await asyncio.gather(*(wait(due) for due in dues))
    finally:
        del loop.call_at  # the instance attribute: the class's method again
    assert timers <= 2  # 30 waiters, the ticks they fall in
    assert min(woke) >= -1e-3  # the loop's clock resolution
    assert max(woke) < TICK_S + 0.05


@pytest.mark.anyio
async def test_a_cancelled_waiter_cancels_no_other() -> None:
    loop = asyncio.get_running_loop()
    grid = Grid(loop)
    due = loop.time() + 0.05
    first = asyncio.ensure_future(grid.wait_until(due))
    second = asyncio.ensure_future(grid.wait_until(due))
    first.cancel()
    await second
    assert first.cancelled() and second.done() and not second.cancelled()


@pytest.mark.parametrize(
    "frame",
    [
        {"transcript": f"your key is {KEY}", "is_final": True},
        {"transcript": f"cut off: {KEY[:8]}", "is_final": True},
        # The key spelled with escapes only: no piece of it in the raw text.
        {"transcript": "".join(f"\\u{ord(c):04x}" for c in KEY), "is_final": True},
    ],
)
def test_a_frame_that_could_hold_the_key_is_scrubbed(frame: dict[str, object]) -> None:
    raw = json.dumps(frame).replace("\\\\", "\\")  # the escapes as the service sent them
    scrubber = Scrubber(KEY)
    assert scrubber.may_hide_in(raw)
    message = parse_message(raw, scrubber.scrub)
    assert KEY[:6] not in repr(message) and REDACTED in repr(message)


def test_a_frame_with_no_piece_of_the_key_is_not_walked() -> None:
    raw = json.dumps({"transcript": "hello there", "is_final": True, "words": []})
    assert not Scrubber(KEY).may_hide_in(raw)
    assert not Scrubber().may_hide_in(raw)
    assert Scrubber(KEY).may_hide_in(raw.replace("there", "th\\u00e9re"))  # an escape


class _Source:
    """Ten chunks of 0.25 s; ``stall`` (when given) holds the read of the eighth (in the
    second batch)."""

    def __init__(self, stall: threading.Event | None = None) -> None:
        self.stall = stall
        self.position_s = 0.0

    def __iter__(self) -> Iterator[bytes]:
        for index in range(10):
            if index == 7 and self.stall is not None:
                self.stall.wait(30)
            self.position_s = (index + 1) * 0.25
            yield bytes(8000)


async def _drain(reader: ReadAhead) -> float:
    """Seconds until the whole source was taken."""
    began = time.monotonic()
    try:
        while await reader.next():
            pass
    finally:
        reader.close()
    return time.monotonic() - began


@pytest.mark.anyio
async def test_a_stalled_read_holds_up_other_readers_only_briefly() -> None:
    stall = threading.Event()
    stalled = ReadAhead(_Source(stall))
    assert await stalled.next()  # its first batch; the second read stalls in a reader
    try:
        await asyncio.sleep(0.05)
        quick = await asyncio.wait_for(_drain(ReadAhead(_Source())), 5 * TIME_UNIT_S)
    finally:
        stall.set()
        stalled.close()
    assert quick < 1.0 * TIME_UNIT_S  # a spare reader took over after READER_STALL_S


@pytest.mark.anyio
async def test_sessions_that_ask_together_share_a_reader() -> None:
    def readers() -> int:
        return sum(t.name == "pulse-batch-reader" for t in threading.enumerate())

    before = readers()
    await asyncio.gather(*(_drain(ReadAhead(_Source())) for _ in range(32)))
    assert readers() - before <= 2  # not one a session
