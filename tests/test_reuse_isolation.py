"""A file that always breaks its session must not take a neighbour in a reused session with
it (found by the QA pass of issue 22: "one file's trouble never loses another item's result"):
the unfinished files of a failed reused session go on each in a session of its own.

A small server on loopback, on the `current` path (it has ``finalize``): a final with one
word per unit at each ``finalize`` and at the end; a session that is fed the poison file
(full-scale audio) is closed 1011 at once, every time, as a service that chokes on one
recording does.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve

from batch.job import RunOptions, run_job
from batch.manifest import load_manifest
from batch.pulse import protocol
from tests.conftest import TIME_UNIT_S, point_at, write_manifest
from tests.media import Burst, tone_track, write_audio
from tests.tables import sql

RATE = 16000
POISON_LEVEL = 28000  # no normal file comes near it (tones at half scale)


def _final(start_s: float, *, is_last: bool = False) -> str:
    word = {"word": "unit", "start": round(start_s + 0.1, 3), "end": round(start_s + 0.2, 3)}
    return json.dumps({"type": "transcription", "session_id": "poison-test", "transcript": "unit",
                       "is_final": True, "is_last": is_last, "words": [word]})  # fmt: skip


async def _choke_on_poison(ws: ServerConnection) -> None:
    samples = unit_start = 0
    async for message in ws:
        if isinstance(message, bytes):
            pcm = np.frombuffer(message[: len(message) // 2 * 2], dtype="<i2")
            if pcm.size and int(np.abs(pcm.astype(np.int32)).max()) >= POISON_LEVEL:
                await ws.close(1011, "cannot transcribe this recording")
                return
            samples += pcm.size
            continue
        kind = json.loads(message).get("type")
        if kind == "finalize":
            await ws.send(_final(unit_start / RATE))
            unit_start = samples
        elif kind == "close_stream":
            await ws.send(_final(unit_start / RATE, is_last=True))
            return


@contextlib.asynccontextmanager
async def _server() -> AsyncIterator[str]:
    async with serve(_choke_on_poison, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}{protocol.CURRENT_PATH}"


@pytest.mark.anyio
async def test_a_file_that_always_breaks_its_session_fails_alone(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    tone = tone_track([Burst(0.2, 0.3, 440)], 1.0, RATE)
    for name in ("a", "b", "d"):
        write_audio(media / f"{name}.wav", [tone], RATE)
    write_audio(media / "c.wav", [np.clip(tone * 1.95, -1, 1)], RATE)  # the poison
    manifest = write_manifest(
        tmp_path,
        pulse={"endpoint": "local", "protocol": "current"},
        run={"concurrency": 1, "order": "listing", "pace": 4.0, "max_attempts": 3,
             "reuse_sessions": True, "final_timeout_s": 5.0 * TIME_UNIT_S},
    )  # fmt: skip
    async with _server() as url:
        point_at(manifest, url)
        await run_job(load_manifest(manifest), RunOptions())
    rows = sql(
        tmp_path / "out",
        "select regexp_extract(source, '[^/]+$'), status, error_kind from {transcripts} order by 1",
    )
    assert rows == [
        ("a.wav", "ok", None),
        ("b.wav", "ok", None),
        ("c.wav", "failed", "connection_lost"),
        ("d.wav", "ok", None),
    ]
    # b and d went on in sessions of their own after the one c broke; c used its budget.
    attempts = dict(sql(tmp_path / "out", "select regexp_extract(source, '[^/]+$'), attempts "
                                          "from {transcripts}"))  # fmt: skip
    assert attempts == {"a.wav": 1, "b.wav": 2, "c.wav": 3, "d.wav": 2}
