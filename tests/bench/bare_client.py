"""The least a Python client can do: ``sessions`` websockets connections, each sending
the same decoded audio (a raw 16 kHz linear16 file, read into memory once) in 4096-byte
chunks paced at real time with plain ``asyncio.sleep``, then the end signal, then reading
(``json.loads``) every answer to ``is_last``. No decoding, no reading ahead, no liveness,
no runner: the baseline `client_cpu` holds the pump's CPU against, in the same run.

    python -m tests.bench.bare_client URL SESSIONS PCM_FILE
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from websockets.asyncio.client import connect

CHUNK_BYTES = 4096  # 128 ms of 16 kHz linear16
CHUNK_S = CHUNK_BYTES / 32000


async def _session(url: str, pcm: bytes) -> None:
    query = "language=en&encoding=linear16&sample_rate=16000&word_timestamps=true"
    async with connect(f"{url}?{query}", compression=None, max_size=None) as ws:

        async def drain() -> None:
            async for raw in ws:
                if json.loads(raw).get("is_last"):
                    return

        reader = asyncio.create_task(drain())
        start = time.monotonic()
        for i, at in enumerate(range(0, len(pcm), CHUNK_BYTES), 1):
            await ws.send(pcm[at : at + CHUNK_BYTES])
            await asyncio.sleep(max(0.0, start + i * CHUNK_S - time.monotonic()))
        await ws.send(json.dumps({"type": "end"}))
        await reader


async def main(url: str, sessions: int, pcm: bytes) -> None:
    await asyncio.gather(*(_session(url, pcm) for _ in range(sessions)))


if __name__ == "__main__":
    with open(sys.argv[3], "rb") as handle:
        audio = handle.read()
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), audio))
