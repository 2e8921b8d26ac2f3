"""List files (CSV or JSONL) and other text inputs, read the way their authors wrote them.

Text is UTF-8 (a byte-order mark, as Excel writes, is fine) or UTF-16 with a BOM. A list
file that is not UTF-8 but reads as Windows-1252 / Latin-1 text is read as that, with a
warning naming the file; anything else is refused with a `ManifestError` naming the file
and what its bytes look like. CSV dialects are sniffed (``,`` ``;`` tab ``|``, quoted
fields); a header without a ``path`` column is refused with the columns that were found.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from batch.errors import ManifestError, quoted

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DELIMITERS = ",;\t|"
# Columns the runner reads itself; matched without regard to case or surrounding spaces.
KNOWN_COLUMNS = ("path", "language", "channels", "reference", "reference_path")
_FILE_COLUMNS = frozenset({"path", "reference_path"})
_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
# Beyond letters, what Windows-1252 text plausibly holds; other bytes mean another encoding.
_CP1252_MARKS = set("’‘“”–—…€£¥°§©®´·×÷ªº¿¡«»±µ¶¢¤¦¨¬¯²³¹¼½¾\u00a0")


def decode_text(data: bytes, path: Path | str, *, what: str, latin1_ok: bool) -> str:
    """``data`` as text. Raises `ManifestError` naming the file and the encoding it seems
    to be in when it cannot be read (or, with ``latin1_ok`` False, is not UTF-8/16)."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                bad = f"is not valid {codec} at byte {exc.start}"
                raise ManifestError(
                    path, f"{what} has a {codec} byte-order mark but {bad}"
                ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem = exc
    if b"\x00" in data[:4096]:
        raise ManifestError(
            path, f"{what} looks like UTF-16 without a byte-order mark; save it as UTF-8"
        )
    line = data.count(b"\n", 0, problem.start) + 1
    found = f"byte 0x{data[problem.start]:02x} on line {line}"
    latin = _as_cp1252(data)
    if latin is None:
        raise ManifestError(
            path, f"{what} is not UTF-8 ({found}) nor Windows-1252/Latin-1 text; save it as UTF-8"
        )
    if not latin1_ok:
        raise ManifestError(
            path,
            f"{what} is not UTF-8 ({found}); it looks like Windows-1252/Latin-1: save it as UTF-8",
        )
    logger.warning("%s is not UTF-8 (%s); read as Windows-1252/Latin-1", path, found)
    return latin


def _as_cp1252(data: bytes) -> str | None:
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    odd = [ch for ch in text if ord(ch) > 127 and not ch.isalpha() and ch not in _CP1252_MARKS]
    return None if odd else text


def read_local(path: Path, *, what: str) -> bytes:
    """A local file's bytes; raises `ManifestError` naming it if it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(path, f"{what} not found") from None
    except IsADirectoryError:
        raise ManifestError(path, f"{what} is a folder, not a file") from None
    except OSError as exc:
        raise ManifestError(path, f"cannot read {what}: {exc.strerror or exc}") from None


def read_text(path: Path, *, what: str, latin1_ok: bool) -> str:
    """The file's text (see `decode_text`); raises `ManifestError` if it cannot be read."""
    return decode_text(read_local(path, what=what), path, what=what, latin1_ok=latin1_ok)


def read_rows(
    location: str, data: bytes, name: str, metadata_columns: frozenset[str] = frozenset()
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each row of the CSV or JSONL list ``data`` read from
    ``location`` (``name``'s suffix tells the format); known column names are lower-cased.
    A column whose name is close to a known one (``langauge``) is refused unless it is in
    ``metadata_columns``. Raises `ManifestError` naming the file and line."""
    text = decode_text(data, location, what="list file", latin1_ok=True)
    if Path(name).suffix.lower() in JSONL_SUFFIXES:
        checked: set[str] = set()
        for number, row in _jsonl_rows(text, location):
            for column in row.keys() - checked:
                _check_column(column, metadata_columns, location, number)
                checked.add(column)
            yield number, row
    else:
        yield from _csv_rows(text, location, metadata_columns)


def _check_column(name: str, declared: frozenset[str], path: str, line: int) -> None:
    """Refuse a metadata column named almost like a column the runner reads: a misspelt
    ``language`` would otherwise be kept as metadata and the row transcribed in the
    manifest's language. Raises `ManifestError`."""
    if name in KNOWN_COLUMNS or name.strip() in declared:
        return
    spelled = re.sub(r"[\s-]+", "_", name.strip().lower())
    close = difflib.get_close_matches(spelled, KNOWN_COLUMNS, n=1, cutoff=_CLOSE)
    if close:
        raise ManifestError(
            path,
            f"line {line}: column {quoted(name, 60)} is not one the runner reads; did you mean "
            f"{close[0]!r}? Rename it, or keep it as metadata by declaring it on the list "
            f"input: metadata_columns: [{quoted(name.strip(), 60)}]",
        )


# How alike (difflib's ratio) a column name must be to a known one to be taken for a typo:
# langauge, channel, references, reference-path are; lang, team, channel_name are not.
_CLOSE = 0.8


def _jsonl_rows(text: str, path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(path, f"line {number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise ManifestError(path, f"line {number}: expected a JSON object")
        row = {_column(str(k)): _jsonl_value(k, v) for k, v in row.items()}
        if "path" not in row:
            raise ManifestError(
                path, f"line {number}: no 'path' key; the object has keys {quoted(sorted(row))}"
            )
        yield number, row


def _jsonl_value(key: str, value: Any) -> Any:
    """A metadata value of a JSONL row as text: lists, objects, numbers and booleans as
    JSON (``["a"]``, ``true``), not as Python writes them (``['a']``, ``True``)."""
    if _column(key) in KNOWN_COLUMNS or value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def _column(name: str) -> str:
    bare = name.strip()
    return bare.lower() if bare.lower() in KNOWN_COLUMNS else bare


def _header(line: str, dialect: type[csv.Dialect] | csv.Dialect) -> list[str]:
    return [_column(n) for n in next(csv.reader([line], dialect), [])]


def _dialect(text: str, path: str) -> tuple[type[csv.Dialect] | csv.Dialect, list[str]]:
    """The sniffed dialect and the header it gives; the delimiter that yields a ``path``
    column wins when sniffing guessed otherwise."""
    header_line = next((line for line in text.splitlines() if line.strip()), "")
    try:
        sniffed: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(
            text[:65536], delimiters=DELIMITERS
        )
    except csv.Error:  # one column, or too little text to tell
        sniffed = csv.excel
    names = _header(header_line, sniffed)
    if "path" in names:
        return sniffed, names
    for delimiter in DELIMITERS:
        candidate = type("listed", (csv.excel,), {"delimiter": delimiter})
        if "path" in _header(header_line, candidate):
            return candidate, _header(header_line, candidate)
    shown = [n for n in names if n] or ["(none)"]
    raise ManifestError(
        path,
        f"no 'path' column; the header has {len(shown)} column(s): {quoted(shown)} "
        f"(separated by {getattr(sniffed, 'delimiter', ',')!r}). Name the column that holds "
        "the files 'path' (language, channels and any other columns are optional)",
    )


def _csv_rows(
    text: str, path: str, metadata_columns: frozenset[str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    if not text.strip():
        return
    # No cell can be longer than the text: a reference of a three-hour meeting is read,
    # not refused by the csv module's 131,072-character default.
    csv.field_size_limit(max(csv.field_size_limit(), len(text) + 1))
    dialect, names = _dialect(text, path)
    header_line = next(n for n, line in enumerate(text.splitlines(), 1) if line.strip())
    for column in names:
        _check_column(column, metadata_columns, path, header_line)
    reader = csv.reader(io.StringIO(text, newline=""), dialect)
    try:
        yield from _csv_cells(reader, names, path)
    except csv.Error as exc:
        line = reader.line_num
        raise ManifestError(path, f"line {line}: cannot be read as CSV ({exc})") from None


def _csv_cells(reader: Any, names: list[str], path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for header in reader:  # the header, already read (after any blank lines)
        if any(field.strip() for field in header):
            break
    for row in reader:
        number = reader.line_num
        if not any(field.strip() for field in row):
            continue
        if len(row) > len(names):
            raise ManifestError(
                path,
                f"line {number}: {len(row)} fields but the header has {len(names)} columns; "
                "quote fields that hold the separator",
            )
        cells = dict(zip(names, row + [""] * (len(names) - len(row)), strict=True))
        for column in _FILE_COLUMNS.intersection(cells):
            # Spreadsheets and hand-typed lists pad cells (`a.wav , en`): a file name that
            # ends in a space is far rarer than a row that does.
            cells[column] = cells[column].strip()
        yield number, cells
