"""Redaction for the local server, by patterns only: what a small offline stack can find.

``redact_pci``: card numbers (13-19 digits passing the Luhn check), CVV/CVC codes and
expiry dates after their keywords, account and routing numbers after theirs.
``redact_pii``: email addresses (written or spoken: "jane at example dot com") and phone
numbers. Names, addresses and other personal data need an NER model the local engine does
not have: they are not redacted, and the job says so (see `batch.server.limits`).

Each found entity becomes a placeholder in the service's style, numbered per session and
kind (``[CREDITCARDNUMBER_1]``); the words it covered become one word spanning their time.
Pure apart from the per-session counters a `Redactor` keeps.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from batch.pulse.protocol import Word


def luhn_ok(digits: str) -> bool:
    """The check digit card numbers carry (ISO/IEC 7812)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


@dataclass(frozen=True)
class _Pattern:
    kind: str  # the placeholder's name
    regex: re.Pattern[str]
    group: int = 0  # the part of the match that is the entity (keywords stay)

    def spans(self, text: str) -> list[tuple[int, int]]:
        found = []
        for match in self.regex.finditer(text):
            if self.kind == "CREDITCARDNUMBER":
                digits = re.sub(r"\D", "", match[0])
                if not (13 <= len(digits) <= 19 and luhn_ok(digits)):
                    continue
            found.append(match.span(self.group))
        return found


_I = re.IGNORECASE
_LEAD: Final = r"(?:\s+(?:is|was|number|no\.?|code|date|on|of)|\s*[:#])*\s*"
# Digits as recognisers write them: grouped ("4111 1111"), dashed, or one by one ("4, 1, 1").
_SEP: Final = r"(?:,\s?|[ .-])?"
PCI_PATTERNS: Final = (
    _Pattern("CREDITCARDNUMBER", re.compile(r"(?<![\d])\d(?:" + _SEP + r"\d){12,18}(?![\d])")),
    _Pattern(
        "CVV",
        re.compile(
            r"\b(?:cv[cv]?2?|security code|card verification (?:code|value))"
            + _LEAD
            + r"(\d(?:"
            + _SEP
            + r"\d){2,3})(?!\d)",
            _I,
        ),
        1,
    ),
    _Pattern(
        "EXPIRYDATE",
        re.compile(
            r"\b(?:expir(?:y|ation|es)|exp\.?|valid (?:thru|through|until))"
            + _LEAD
            + r"((?:0?[1-9]|1[0-2])\s*[/-]\s*(?:\d{4}|\d{2}))(?!\d)",
            _I,
        ),
        1,
    ),
    _Pattern(
        "ACCOUNTNUMBER",
        re.compile(r"\b(?:account|acct|iban|routing)" + _LEAD + r"(\d(?:[ -]?\d){7,16})(?!\d)", _I),
        1,
    ),
)
PII_PATTERNS: Final = (
    _Pattern("EMAIL", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    _Pattern(
        "EMAIL",
        re.compile(r"\b[\w.+-]+ at [\w-]+(?: dot [\w-]+)+\b", _I),
    ),
    _Pattern(
        "PHONENUMBER",
        re.compile(
            r"(?<![\d\w])(?:\+\d{1,3}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]?\d{3}[ .-]?\d{4}(?!\d)"
        ),
    ),
)


def _offsets(words: Sequence[Word]) -> tuple[str, list[tuple[int, int]]]:
    """The words joined by single spaces, and each word's (start, end) in that text."""
    spans, position = [], 0
    for word in words:
        spans.append((position, position + len(word.word)))
        position += len(word.word) + 1
    return " ".join(w.word for w in words), spans


class Redactor:
    """Redacts one session's finals; placeholders are numbered across the session."""

    def __init__(self, *, pci: bool, pii: bool) -> None:
        self._patterns = (PCI_PATTERNS if pci else ()) + (PII_PATTERNS if pii else ())
        self._counts: Counter[str] = Counter()

    @property
    def active(self) -> bool:
        return bool(self._patterns)

    def redact(self, words: Sequence[Word]) -> tuple[list[Word], list[str]]:
        """The words with every entity replaced, and the placeholders used, in order."""
        result, entities = list(words), []
        for pattern in self._patterns:  # card numbers before phones: the longer claim wins
            text, spans = _offsets(result)
            hits = pattern.spans(text)
            for start, end in reversed(hits):  # from the end: earlier offsets stay valid
                covered = [i for i, (a, b) in enumerate(spans) if a < end and b > start]
                if not covered or any("{" in result[i].word for i in covered):
                    continue
                first, last = covered[0], covered[-1]
                placeholder = f"{{{pattern.kind}}}"  # numbered below, in reading order
                prefix = result[first].word[: max(0, start - spans[first][0])]
                suffix = result[last].word[max(0, end - spans[last][0]) :]
                merged = replace(
                    result[first], word=prefix + placeholder + suffix, end_s=result[last].end_s
                )
                result[first : last + 1] = [merged]
        for index, word in enumerate(result):  # number the placeholders left to right
            for kind in re.findall(r"\{([A-Z]+)\}", word.word):
                self._counts[kind] += 1
                name = f"[{kind}_{self._counts[kind]}]"
                entities.append(name)
                word = replace(word, word=word.word.replace(f"{{{kind}}}", name, 1))
            result[index] = word
        return result, entities
