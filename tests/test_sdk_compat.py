"""The vendor's official SDK (`smallestai`) against the local server, on the unified path.

The SDK is in the dev extra (`make test` installs it); where it is missing the test is
skipped, and fails in CI.
"""

from __future__ import annotations

import pytest

from batch.decode import DecodedAudio, WireFormat
from batch.server import local_server
from tests.media import DEMO_CLIPS
from tests.needs import need_module

smallestai = need_module("smallestai", "the vendor SDK is in the dev extra: run `make test`")

# The SDK imports names websockets has deprecated: its business, not ours.
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.whisper,
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


async def test_official_sdk_streams_and_gets_is_last() -> None:
    from smallestai.environment import SmallestAIEnvironment
    from smallestai.waves.speech_to_text.types.close_stream import CloseStream

    audio = b"".join(DecodedAudio(DEMO_CLIPS / "callback.flac", WireFormat("linear16", 16000)))
    async with local_server(engine="whisper", api_key="sdk-key") as server:
        base = f"127.0.0.1:{server.port}"
        environment = SmallestAIEnvironment(
            atoms=f"http://{base}", waves=f"http://{base}", waves_ws=f"ws://{base}",
            payment=f"http://{base}",
        )  # fmt: skip
        client = smallestai.AsyncSmallestAI(api_key="sdk-key", environment=environment)
        query = {
            "model": "pulse",
            "language": "en",
            "sample_rate": "16000",
            "encoding": "linear16",
            "word_timestamps": "true",
            "eou_timeout_ms": "1000",
        }
        finals = []
        async with client.waves.speech_to_text.stream(
            request_options={"additional_query_parameters": query}
        ) as socket:
            for start in range(0, len(audio), 4096):
                await socket.send_audio_chunk_out(audio[start : start + 4096])
            await socket.send_close_stream(CloseStream(type="close_stream"))
            async for event in socket:
                if getattr(event, "is_final", False) and event.transcript:
                    finals.append(event.transcript)
                if getattr(event, "is_last", False):
                    break
            else:
                pytest.fail("the stream ended without is_last")
    assert "call me back tomorrow morning" in " ".join(finals).lower()
