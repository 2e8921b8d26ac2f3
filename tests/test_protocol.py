"""The protocol core, bytes and strings in, values out: no sockets."""

from __future__ import annotations

import pytest

from batch.pulse import protocol


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('["product:5.0", "name:4"]', ("product:5.0", "name:4")),  # the reference page
        ("product:5.0,name:4", ("product:5.0", "name:4")),  # the SDK
        ("", ()),
        ("auto", ()),  # what the reference page's own example sends by default
        ("None", ()),
    ],
)
def test_keywords_in_every_spelling(raw: str, expected: tuple[str, ...]) -> None:
    assert protocol.parse_keywords(raw) == expected


@pytest.mark.parametrize("raw", ["product", "product:0", "product:-1", ":5", "[1, 2]", "[nope"])
def test_bad_keywords_name_the_parameter(raw: str) -> None:
    with pytest.raises(protocol.ParamError) as caught:
        protocol.parse_keywords(raw)
    assert caught.value.name == "keywords"


def test_query_round_trip_sends_every_option_explicitly() -> None:
    options = protocol.PulseOptions(language="de", encoding="mulaw", sample_rate=8000,
                                    keywords=("rechnung:3.0",), diarize=True)  # fmt: skip
    query = protocol.build_query(options)
    assert set(query) >= {"language", "encoding", "sample_rate", "word_timestamps",
                          "full_transcript", "sentence_timestamps", "redact_pii",
                          "redact_pci", "numerals", "keywords", "diarize"}  # fmt: skip
    parsed = protocol.parse_query({k: [v] for k, v in query.items()})
    assert parsed == options
    unified = protocol.build_query(options, protocol.Generation.UNIFIED)
    assert unified["model"] == "pulse"
    parsed = protocol.parse_query({k: [v] for k, v in unified.items()}, protocol.Generation.UNIFIED)
    assert parsed == options


def test_messages_of_every_shape() -> None:
    final = protocol.parse_message(
        '{"type": "transcription", "transcription": "hi there", "is_final": true,'
        ' "is_last": false, "session_id": "s1", "language": "en",'
        ' "words": [{"word": "hi", "start": 0.1, "end": 0.3, "speaker": "1"}]}'
    )
    assert isinstance(final, protocol.Transcription)
    assert (final.transcript, final.words[0].speaker, final.is_final) == ("hi there", "1", True)
    for raw in (
        '{"type": "error", "status": "error", "message": "boom"}',
        '{"status": "error", "error": {"message": "boom", "code": "500"}}',
        '{"error": "boom", "code": 42}',
    ):
        error = protocol.parse_message(raw)
        assert isinstance(error, protocol.ServerError) and error.message == "boom"
    for raw in ("not json", "[1, 2]", '{"is_final": true, "words": [{"word": "x"}]}'):
        with pytest.raises(protocol.MalformedMessage):
            protocol.parse_message(raw)
