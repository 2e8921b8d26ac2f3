"""Accuracy against references: normalisation, WER and CER (jiwer), and their summaries.

Both texts are normalised the same way before scoring (README, "Accuracy"):

1. Unicode NFKC, then lower case.
2. Numbers become words with num2words in the item's language (``42`` → ``forty two``,
   ``3.5`` → ``three point five``, ``1,000`` → ``one thousand``; in English ``3rd`` →
   ``third`` and ``%`` → ``percent``). In a language num2words lacks, digits stay digits.
3. Punctuation and symbols (Unicode categories P and S: ``.,?!"'-`` ...) become spaces, so
   ``don't`` → ``don t`` on both sides and ``well-known`` → ``well known``.
4. Runs of white space become one space.

WER is word edits over reference words; CER is character edits over reference characters of
the normalised text, spaces included (as jiwer counts them). A reference that normalises to
nothing cannot be scored: its scores are null. Summaries pool edits over items (jiwer's
corpus-level figure: total edits / total reference words), not a mean of ratios.

All pure but `read_reference` and `score_job` (which reads an output, through
`batch.output.OutputReader`, and a list file).
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from typing import Any

import jiwer
from num2words import num2words

from batch import storage
from batch.errors import ManifestError, ReferenceUnreadable
from batch.model import ItemStatus, Reference
from batch.output import OutputReader
from batch.plan import read_list_rows, reference_of  # the same reader as job inputs use

logger = logging.getLogger(__name__)

WORST_LISTED = 5

_ORDINAL_EN = re.compile(r"\b(\d+)(st|nd|rd|th)\b")
_THOUSANDS = re.compile(r"\b\d{1,3}(?:,\d{3})+\b")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@dataclass(frozen=True)
class Scores:
    wer: float | None
    cer: float | None


def read_reference(reference: Reference) -> str:
    """The reference text; raises `ReferenceUnreadable` naming the file if it cannot be read."""
    if reference.text is not None:
        return reference.text
    assert reference.path is not None
    try:
        if storage.is_url(reference.path):
            return storage.read_bytes(reference.path, {}).decode("utf-8-sig")
        return Path(reference.path).read_text(encoding="utf-8-sig")
    except ManifestError as exc:  # storage's translation of a URL that cannot be read
        raise ReferenceUnreadable(str(exc)) from None
    except FileNotFoundError:
        raise ReferenceUnreadable(f"{reference.path}: reference file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReferenceUnreadable(f"{reference.path}: cannot read reference text ({exc})") from None


def columns(reference: Reference | None, transcript: str, language: str) -> dict[str, Any]:
    """The ``reference``, ``wer`` and ``cer`` columns of an ok item's transcript row (all
    null without a reference; an unreadable reference file is logged and left unscored)."""
    if reference is None:
        return {"reference": None, "wer": None, "cer": None}
    try:
        text = read_reference(reference)
    except ReferenceUnreadable as exc:
        logger.warning("not scored: %s", exc)
        return {"reference": None, "wer": None, "cer": None}
    scores = score(text, transcript, language)
    return {"reference": text, "wer": scores.wer, "cer": scores.cer}


@cache
def _speaks_numbers(language: str) -> bool:
    try:
        num2words(1, lang=language)
    except (NotImplementedError, KeyError, ImportError):
        return False
    return True


def _number_words(text: str, language: str) -> str:
    if not _speaks_numbers(language):
        return text
    if language == "en":
        text = _ORDINAL_EN.sub(lambda m: f" {num2words(int(m[1]), to='ordinal')} ", text)
        text = text.replace("%", " percent ")
    text = _THOUSANDS.sub(lambda m: m[0].replace(",", ""), text)

    def spoken(match: re.Match[str]) -> str:
        try:
            return f" {num2words(Decimal(match[0]), lang=language)} "
        except (InvalidOperation, OverflowError, NotImplementedError):
            return match[0]

    return _NUMBER.sub(spoken, text)


def normalise(text: str, language: str = "en") -> str:
    """The text as it is scored (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = _number_words(text, (language or "en").split("-")[0].lower())
    kept = (" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join("".join(kept).split())


def score(reference: str, hypothesis: str, language: str = "en") -> Scores:
    """WER and CER of one hypothesis against its reference, both normalised."""
    ref, hyp = normalise(reference, language), normalise(hypothesis, language)
    if not ref:
        return Scores(None, None)
    return Scores(
        wer=float(jiwer.wer(ref, hyp)),
        cer=float(jiwer.cer(ref, hyp)),
    )


def channel_label(row: Mapping[str, Any]) -> str:
    if row.get("channel_name"):
        return str(row["channel_name"])
    return "mixed" if row.get("channel") is None else f"ch{row['channel']}"


def summarise(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The accuracy section of a report, from transcript rows holding ``reference``,
    ``transcript``, ``language``, ``wer`` and ``cer``: pooled over the job, per language and
    per channel, and the worst items. None when no row has a reference."""
    scored = [
        r for r in rows if r.get("reference") is not None and r.get("status") == ItemStatus.OK
    ]
    if not scored:
        return None

    def group(key: Any) -> dict[str, Any]:
        groups: dict[str, list[Mapping[str, Any]]] = {}
        for row in scored:
            groups.setdefault(key(row), []).append(row)
        return {name: _pooled_rows(members) for name, members in sorted(groups.items())}

    ranked = sorted(
        (r for r in scored if r.get("wer") is not None),
        key=lambda r: (-float(r["wer"]), -float(r.get("cer") or 0.0), str(r.get("source"))),
    )
    return {
        "normalisation": "NFKC, lower case, numbers as words (num2words), punctuation removed",
        **_pooled_rows(scored),
        "unscorable": len([r for r in scored if r.get("wer") is None]),
        "by_language": group(lambda r: str(r.get("language"))),
        "by_channel": group(channel_label),
        "worst": [
            {
                "item_id": r["item_id"],
                "source": r.get("source"),
                "channel": channel_label(r),
                "wer": round(float(r["wer"]), 4),
                "cer": None if r.get("cer") is None else round(float(r["cer"]), 4),
            }
            for r in ranked[:WORST_LISTED]
        ],
    }


def _pooled_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Edits pooled over rows, each normalised in its own language."""
    refs, hyps = [], []
    for row in rows:
        language = str(row.get("language") or "en")
        ref = normalise(str(row["reference"]), language)
        if ref:
            refs.append(ref)
            hyps.append(normalise(str(row.get("transcript") or ""), language))
    if not refs:
        return {"items": 0, "reference_words": 0, "wer": None, "cer": None}
    return {
        "items": len(refs),
        "reference_words": sum(len(r.split()) for r in refs),
        "wer": round(float(jiwer.wer(refs, hyps)), 4),
        "cer": round(float(jiwer.cer(refs, hyps)), 4),
    }


# --- after the fact: `pulse-batch score` ------------------------------------------------


def _keys(raw: str, base: Path) -> set[str]:
    """Ways a listed path may appear in ``source``: as written, absolute, and resolved."""
    path = Path(raw)
    absolute = path if path.is_absolute() else base / path
    return {raw, str(absolute), os.path.abspath(absolute), str(absolute.resolve())}


def references_from_list(list_path: Path) -> tuple[dict[str, Reference], dict[str, Reference]]:
    """A list file's references, by every spelling of its paths and by ``item_id``.

    Raises `ManifestError` (naming the file and line) for a row with no reference."""
    by_path: dict[str, Reference] = {}
    by_id: dict[str, Reference] = {}
    folder = list_path.parent

    def resolve(listed: str) -> str:
        return str(Path(listed) if Path(listed).is_absolute() else folder / listed)

    for row in read_list_rows(str(list_path)):
        where = f"line {row.get('__line__')}"
        reference = reference_of(row, resolve)
        if reference is None:
            raise ManifestError(list_path, f"{where}: needs a 'reference' or 'reference_path'")
        if row.get("item_id"):
            by_id[str(row["item_id"])] = reference
        if row.get("path"):
            for key in _keys(str(row["path"]), list_path.parent):
                by_path[key] = reference
        elif not row.get("item_id"):
            raise ManifestError(list_path, f"{where}: needs a 'path' (or 'item_id') column")
    return by_path, by_id


@dataclass(frozen=True)
class JobScores:
    items: list[dict[str, Any]]  # per item: item_id, source, channel, language, wer, cer
    summary: dict[str, Any] | None
    unmatched: int  # ok items the references file says nothing about
    problems: list[str]  # references that could not be read


def score_job(location: str | Path, job: str, references: Path) -> JobScores:
    """Score every ok item of ``job`` that ``references`` covers. Writes nothing."""
    by_path, by_id = references_from_list(references)
    tables = OutputReader(location).job_tables(job, with_details=False)
    rows, problems, unmatched = [], [], 0
    for item in tables.items:
        reference = by_id.get(item["item_id"]) or by_path.get(str(item["source"]))
        if reference is None:
            unmatched += 1
            continue
        try:
            text = read_reference(reference)
        except ReferenceUnreadable as exc:
            problems.append(str(exc))
            continue
        scores = score(text, str(item.get("transcript") or ""), str(item.get("language")))
        rows.append({**item, "reference": text, "wer": scores.wer, "cer": scores.cer})
    per_item = [
        {
            "item_id": r["item_id"],
            "source": r["source"],
            "channel": channel_label(r),
            "language": r.get("language"),
            "wer": r["wer"],
            "cer": r["cer"],
        }
        for r in rows
    ]
    return JobScores(per_item, summarise(rows), unmatched, problems)
