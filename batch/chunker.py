"""Fixed-size wire chunks cut from a byte stream."""

from __future__ import annotations

from collections.abc import Iterator


class Chunker:
    """Cuts a byte stream into fixed-size chunks without re-copying the tail each time."""

    def __init__(self, chunk_bytes: int) -> None:
        self._size = chunk_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[bytes]:
        self._buffer += data
        size = self._size
        if len(self._buffer) < size:
            return
        whole = len(self._buffer) - len(self._buffer) % size
        view = bytes(self._buffer[:whole])
        del self._buffer[:whole]
        for start in range(0, whole, size):
            yield view[start : start + size]

    def rest(self) -> Iterator[bytes]:
        if self._buffer:
            yield bytes(self._buffer)
            self._buffer.clear()
