"""The sender's hot path: when each chunk is due, and one send without a timer per chunk.

Sixty-four sessions at real time send 500 chunks a second. Each used to cost a timer of its
own (the write timeout's cancel scope), a wake of the event loop of its own (500 a second,
each an ``epoll_wait``), and a move of the session deadline; together they were most of the
client's CPU. Here:

- Due times are rounded up to a shared grid of `TICK_S`, so sessions whose chunks fall due
  within one tick wake together: at most 1/`TICK_S` wakes a second, whatever the number
  of sessions. A chunk goes out at most `TICK_S` late and never early (the pace is an upper
  bound); lateness never accumulates, as each due time counts from the session's start.
- Sessions due in the same tick wait on one timer (`Grid`): one timer a tick for every
  session, not one per chunk each (a timer is a heap push and pop among every session's
  deadlines, and anyio's sleep looks up its backend per call).
- A send that cannot wait (the connection's write buffer has room for the whole frame, so
  websockets will not pause for a drain) runs without a timeout; only one that may wait on
  a peer that stopped reading gets ``write_timeout_s``.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from typing import Final

import anyio
from websockets.asyncio.client import ClientConnection

from batch.errors import SessionTimeout

TICK_S: Final = 0.02  # under the service's shortest advised interval between chunks
# websockets' high-water mark (its default, passed explicitly by the session) and a frame
# header's largest size (14 bytes for a masked frame of 64 KiB or more).
WRITE_LIMIT_BYTES: Final = 2**15
_FRAME_HEADER_BYTES: Final = 14


def wake_at(started: float, position_s: float, pace: float, tick_s: float = TICK_S) -> float:
    """When the sender may go on, once the audio up to ``position_s`` is sent: its due
    time (``started`` + ``position_s`` / ``pace``) rounded up to the grid of ``tick_s``."""
    due = started + position_s / pace
    return math.ceil(due / tick_s) * tick_s if tick_s > 0 else due


class Grid:
    """Waits until a due time rounded up to the grid of ``tick_s``, on one event loop: the
    first waiter of a tick schedules its one timer, which wakes every waiter of the tick.

    Each waiter has a future of its own, so cancelling one (a cancel scope, a failed
    session) cancels no other."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = TICK_S) -> None:
        self._loop = loop
        self._tick_s = tick_s
        self._due: dict[int, list[asyncio.Future[None]]] = {}

    def wait_until(self, due: float) -> asyncio.Future[None]:
        """A future done at the first tick at or after ``due`` (the loop's clock)."""
        tick = math.ceil(due / self._tick_s)
        waiter = self._loop.create_future()
        waiters = self._due.get(tick)
        if waiters is None:
            waiters = self._due[tick] = []
            self._loop.call_at(tick * self._tick_s, self._wake, tick)
        waiters.append(waiter)
        return waiter

    def _wake(self, tick: int) -> None:
        for waiter in self._due.pop(tick):
            if not waiter.done():  # a cancelled waiter is done
                waiter.set_result(None)


_grids: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Grid] = weakref.WeakKeyDictionary()


def grid() -> Grid:
    """The running event loop's grid (made on first use)."""
    loop = asyncio.get_running_loop()
    found = _grids.get(loop)
    if found is None:
        found = _grids[loop] = Grid(loop)
    return found


def may_wait(ws: ClientConnection, size: int) -> bool:
    """Whether sending ``size`` bytes could wait for a drain: the frame would take the
    write buffer past websockets' high-water mark (only a slow or stopped peer fills it)."""
    queued = ws.transport.get_write_buffer_size()
    return queued + size + _FRAME_HEADER_BYTES > WRITE_LIMIT_BYTES


async def send(ws: ClientConnection, data: str | bytes, write_timeout_s: float) -> None:
    """Send one message; raises `SessionTimeout` when the peer takes none of it within
    ``write_timeout_s`` (a send that cannot wait needs no timer)."""
    size = len(data) * (4 if isinstance(data, str) else 1)  # UTF-8: at most 4 bytes a char
    if not may_wait(ws, size):
        await ws.send(data)
        return
    with anyio.move_on_after(write_timeout_s) as scope:
        await ws.send(data)
    if scope.cancelled_caught:
        raise SessionTimeout("write_timeout_s", write_timeout_s)
