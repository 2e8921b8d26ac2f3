"""The local engine's honest text: joins, sentences, numerals, redaction, stated limits."""

from __future__ import annotations

import pytest

from batch.pulse.protocol import PulseOptions, Word
from batch.server.limits import engine_limits
from batch.server.redact import Redactor, luhn_ok
from batch.server.text import (
    digits_as_words,
    join_words,
    merge_fragments,
    sentences,
    words_as_digits,
)


def words(text: str) -> list[Word]:
    return [Word(w, i * 0.5, i * 0.5 + 0.4) for i, w in enumerate(text.split())]


def text_of(ws: list[Word]) -> str:
    return join_words([w.word for w in ws])


def test_punctuation_attaches_to_its_word() -> None:
    assert join_words(["I", "paid", "$", "25", ",000", "or", "12", "%", "."]) == (
        "I paid $25,000 or 12%."
    )
    merged = merge_fragments(words("it costs 25 ,000 or 12 % ."))
    assert [w.word for w in merged] == ["it", "costs", "25,000", "or", "12%."]
    assert (merged[2].start_s, merged[2].end_s) == (1.0, 1.9)  # the fragments' whole span


def test_sentences_do_not_end_at_abbreviations_or_initials() -> None:
    found = sentences(words("Dr. Smith saw Mr. J. Jones today. He left! See e.g. this. End"))
    assert [text_of(s) for s in found] == [
        "Dr. Smith saw Mr. J. Jones today.",
        "He left!",
        "See e.g. this.",
        "End",
    ]


def test_numerals_both_ways() -> None:
    spoken = digits_as_words(words("I paid $25,000 and 12% on the 3rd"))
    assert text_of(spoken) == (
        "I paid twenty-five thousand dollars and twelve percent on the third"
    )
    assert spoken[-1].end_s == 3.9 and spoken[2].start_s == 1.0  # spans shared, in order
    written = words_as_digits(words("I paid twenty-five thousand dollars for one of them"))
    assert text_of(written) == "I paid 25000 dollars for one of them"


@pytest.mark.parametrize(
    ("number", "valid"),
    [("4111111111111111", True), ("4111111111111112", False), ("79927398713", True)],
)
def test_luhn(number: str, valid: bool) -> None:
    assert luhn_ok(number) is valid


def test_pci_redaction_with_placeholders_numbered_per_session() -> None:
    redactor = Redactor(pci=True, pii=False)
    said = "card 4111 1111 1111 1111, CVV is 123, expires 09/27 and account number 12345678."
    redacted, entities = redactor.redact(words(said))
    assert text_of(redacted) == (
        "card [CREDITCARDNUMBER_1], CVV is [CVV_1], expires [EXPIRYDATE_1] "
        "and account number [ACCOUNTNUMBER_1]."
    )
    assert entities == ["[CREDITCARDNUMBER_1]", "[CVV_1]", "[EXPIRYDATE_1]", "[ACCOUNTNUMBER_1]"]
    card = redacted[1]
    assert (card.start_s, card.end_s) == (0.5, 2.4)  # the four groups' whole span
    again, more = redactor.redact(words("and 5500 0000 0000 0004"))
    assert more == ["[CREDITCARDNUMBER_2]"] and "5500" not in text_of(again)


def test_pci_leaves_numbers_that_are_not_cards_alone() -> None:
    kept = "it was 4111 1111 1111 1112 or 25,000 or 1234"  # the first fails the Luhn check
    redacted, entities = Redactor(pci=True, pii=False).redact(words(kept))
    assert (text_of(redacted), entities) == (kept, [])


def test_pii_finds_emails_and_phones_only() -> None:
    said = (
        "I am Jane Doe, call 555-123-4567 or mail jane.doe@example.com or jane at example dot com"
    )
    redacted, entities = Redactor(pci=False, pii=True).redact(words(said))
    assert text_of(redacted) == (
        "I am Jane Doe, call [PHONENUMBER_1] or mail [EMAIL_1] or [EMAIL_2]"
    )  # the name stays: no NER model, and the job says so
    assert entities == ["[PHONENUMBER_1]", "[EMAIL_1]", "[EMAIL_2]"]


def test_limits_are_stated_not_faked() -> None:
    options = [
        PulseOptions(diarize=True, redact_pii=True, language="multi", keywords=("acme:2",)),
        PulseOptions(extra={"punctuate": "true", "vad_events": "true"}),
    ]
    notes = engine_limits("whisper", options)
    assert any("does not diarize: speaker is null" in n for n in notes)
    assert any("names" in n and "stay in clear" in n for n in notes)
    assert any("English only" in n and "'multi'" in n for n in notes)
    assert any("punctuate" in n and "vad_events" not in n for n in notes)
    assert not any("keywords" in n for n in notes)  # whisper takes them as hotwords
    assert any("keywords" in n for n in engine_limits("synthetic", options))
    assert engine_limits("whisper", [PulseOptions()]) == []
