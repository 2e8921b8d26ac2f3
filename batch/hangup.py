"""Hanging up on the service so that nothing lingers in the kernel.

Closing a socket whose peer stopped reading leaves it in FIN-WAIT (an orphan after exit)
for minutes, holding the audio still queued to send. A zero linger makes the kernel reset
the connection instead and free its queues at once.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from asyncio import BaseTransport

from websockets.asyncio.client import ClientConnection


def reset_on_close(transport: BaseTransport) -> None:
    """Make the next close of ``transport``'s socket a reset (SO_LINGER 0)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def abort(ws: ClientConnection) -> None:
    """Drop an abandoned connection (a failure, the deadline, a stop) at once.

    A close from a cancelled scope never runs, and a plain close would linger (above).
    """
    reset_on_close(ws.transport)
    ws.transport.abort()


class ResettingConnection(ClientConnection):
    """A client connection that resets, rather than closes, a socket whose peer never sent
    its close frame.

    websockets aborts the transport itself when a keepalive pong or the closing handshake
    does not come in time (a deaf peer at a paced send rate ends this way, never reaching
    `write_timeout_s`); a plain abort lingers as above. asyncio calls `connection_lost`
    before it closes the socket, so the linger set here applies to that close. A peer that
    sent its close frame ends cleanly, as usual.
    """

    def connection_lost(self, exc: Exception | None) -> None:
        if self.protocol.close_rcvd is None:
            reset_on_close(self.transport)
        super().connection_lost(exc)
