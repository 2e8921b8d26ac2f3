"""Text from recognised words, as the service writes it: joins, sentences, numerals.

Pure functions over `Word` lists (times are kept: a word split in two shares its span; words
merged into one span both). Used by the local server's message builder.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Final

from batch.pulse.protocol import Word

# A token that belongs to the word before it: closing punctuation, a percent sign, or the
# rest of a number the recogniser cut at its thousands separator (",000").
_ATTACHES_LEFT: Final = re.compile(r"^(?:[,.;:!?%)\]}”’»…]|'s\b|,\d)")
# A token that belongs to the word after it.
_ATTACHES_RIGHT: Final = re.compile(r"^[$€£(\[{“‘«]+$")
SENTENCE_ENDS: Final = (".", "?", "!")
# A full stop after these is not the end of a sentence.
ABBREVIATIONS: Final = frozenset(
    [
        "dr",
        "mr",
        "mrs",
        "ms",
        "mx",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "e.g",
        "i.e",
        "approx",
        "dept",
        "inc",
        "ltd",
        "co",
        "corp",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
        "mt",
        "ft",
        "rev",
        "gen",
        "col",
        "lt",
        "sgt",
        "capt",
    ]
)


def attaches_left(token: str) -> bool:
    return bool(_ATTACHES_LEFT.match(token))


def join_words(words: Sequence[str]) -> str:
    """Words as text: punctuation attaches to its word (``25,000``, ``12%``, ``($5)``)."""
    text = ""
    glue = False  # the previous token opens (``$``, ``(``): no space after it
    for token in words:
        if not token:
            continue
        if text and not glue and not attaches_left(token):
            text += " "
        text += token
        glue = bool(_ATTACHES_RIGHT.match(token))
    return text


def merge_fragments(words: Sequence[Word]) -> list[Word]:
    """One `Word` per written word: fragments that attach left join their predecessor."""
    merged: list[Word] = []
    for word in words:
        if merged and attaches_left(word.word):
            last = merged[-1]
            merged[-1] = replace(
                last, word=last.word + word.word, end_s=max(last.end_s, word.end_s)
            )
        else:
            merged.append(word)
    return merged


def ends_sentence(word: str, following: str | None) -> bool:
    """A sentence ends after ``.``/``?``/``!``, but not after ``Dr.``, ``e.g.`` or an
    initial (``J.``), and not before a word that starts in lower case."""
    if not word.endswith(SENTENCE_ENDS):
        return False
    if word.endswith("."):
        stem = word.rstrip(".").lower().strip("\"'()")
        if stem in ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()):
            return False
        if following is not None and following[:1].islower():
            return False
    return True


def sentences(words: Sequence[Word]) -> list[list[Word]]:
    """Words grouped into sentences; a trailing remainder counts as one."""
    result: list[list[Word]] = []
    current: list[Word] = []
    for index, word in enumerate(words):
        current.append(word)
        following = words[index + 1].word if index + 1 < len(words) else None
        if ends_sentence(word.word, following):
            result.append(current)
            current = []
    if current:
        result.append(current)
    return result


# --- numerals --------------------------------------------------------------------

_NUMBER: Final = re.compile(r"(?P<pre>[^\d]*?)(?P<num>\d[\d,]*(?:\.\d+)?)(?P<post>.*)$")
_PLACEHOLDER: Final = re.compile(r"\[[A-Z]+_\d+\]")  # a redaction: its number stays
_ORDINAL: Final = re.compile(r"^(st|nd|rd|th)\b", re.IGNORECASE)
_NUMBER_WORDS: Final = frozenset(
    [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
        "thirty",
        "forty",
        "fifty",
        "sixty",
        "seventy",
        "eighty",
        "ninety",
        "hundred",
        "thousand",
        "million",
        "billion",
        "trillion",
        "point",
    ]
)


def _spoken(token: str) -> str | None:
    """``25,000`` -> ``twenty-five thousand``; ``12%`` -> ``twelve percent``; None when
    the token holds no number."""
    from num2words import num2words  # only the local engine needs it

    match = _NUMBER.match(token)
    if match is None:
        return None
    pre, number, post = match["pre"], match["num"].replace(",", ""), match["post"]
    ordinal = _ORDINAL.match(post)
    if ordinal and "." not in number:
        words = num2words(int(number), to="ordinal")
        post = post[ordinal.end() :]
    else:
        words = num2words(float(number) if "." in number else int(number))
    if pre.endswith("$"):
        pre, words = pre[:-1], f"{words} dollars"
    if post.startswith("%"):
        post, words = post[1:], f"{words} percent"
    rest = _spoken(post) if any(c.isdigit() for c in post) else post
    return f"{pre}{words}{' ' + rest if rest and rest[0].isalnum() else rest or ''}"


def _split_span(word: Word, texts: list[str]) -> list[Word]:
    """One word's span shared evenly by the words it became."""
    step = (word.end_s - word.start_s) / len(texts)
    return [
        replace(
            word,
            word=text,
            start_s=round(word.start_s + i * step, 3),
            end_s=round(word.start_s + (i + 1) * step, 3),
        )
        for i, text in enumerate(texts)
    ]


def digits_as_words(words: Sequence[Word]) -> list[Word]:
    """``numerals=false``: every number written out in words (num2words)."""
    out: list[Word] = []
    for word in words:
        numeric = any(c.isdigit() for c in word.word) and not _PLACEHOLDER.search(word.word)
        spoken = _spoken(word.word) if numeric else None
        out.extend(_split_span(word, spoken.split()) if spoken else [word])
    return out


def _is_number_word(token: str) -> bool:
    parts = token.lower().strip(",.;:!?").split("-")
    return all(part in _NUMBER_WORDS for part in parts)


def words_as_digits(words: Sequence[Word]) -> list[Word]:
    """``numerals=true``: runs of number words become digits (text2num's alpha2digit,
    which leaves lone small numbers such as "one of them" alone)."""
    from text_to_num import alpha2digit

    out: list[Word] = []
    index = 0
    while index < len(words):
        end = index
        while end < len(words) and (
            _is_number_word(words[end].word)
            or (words[end].word.lower() == "and" and end > index and end + 1 < len(words)
                and _is_number_word(words[end + 1].word))
        ):  # fmt: skip
            end += 1
        if end == index:
            out.append(words[index])
            index += 1
            continue
        run = words[index:end]
        converted = alpha2digit(" ".join(w.word for w in run), "en")
        if converted.split() == [w.word for w in run]:
            out.extend(run)
        else:
            texts = converted.split()
            span = replace(run[0], end_s=run[-1].end_s)
            out.extend(
                _split_span(span, texts) if len(texts) > 1 else [replace(span, word=texts[0])]
            )
        index = end
    return out
