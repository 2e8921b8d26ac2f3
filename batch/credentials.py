"""The API key: read once, normalised or refused before any session, and scrubbed from text.

The key travels in the ``Authorization`` header only. Anything that came back from the
service (error bodies, close reasons, error messages) may echo that header, so such text
goes through `Scrubber.scrub` before it is logged, stored or reported. Messages here never
print the key, not even part of it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import unicodedata

from batch.errors import ManifestError

logger = logging.getLogger(__name__)

REDACTED = "[redacted]"
# A key echoed and then cut off (a 200-byte body, a 123-byte close reason, a debug line
# shortened in the middle) leaves a piece of itself; pieces this long are scrubbed too.
_MIN_PIECE = 6
_BEARER = re.compile(r"^\s*bearer(\s+|$)", re.IGNORECASE)


def normalise_api_key(raw: str, variable: str) -> str:
    """The key as it goes into ``Authorization: Bearer <key>``.

    Surrounding whitespace and a pasted ``Bearer `` prefix are removed (logged, without the
    key). Whitespace inside the key or control characters (a CR/LF would split the HTTP
    header) are refused with a `ManifestError` naming the variable.
    """
    key = raw.strip()
    if _BEARER.match(key):
        key = _BEARER.sub("", key, count=1).strip()
        logger.info("%s starts with 'Bearer '; the prefix was removed", variable)
    elif key != raw:
        logger.info("%s has whitespace around the key; it was removed", variable)
    if not key:
        raise ManifestError(f"pulse.api_key_env={variable}", f"{variable} is empty")
    if any(unicodedata.category(ch) == "Cc" for ch in key):
        raise ManifestError(
            f"pulse.api_key_env={variable}",
            f"{variable} holds control characters (a line break or tab?); "
            "export the key alone, on one line",
        )
    if any(ch.isspace() for ch in key):
        raise ManifestError(
            f"pulse.api_key_env={variable}",
            f"{variable} holds whitespace inside the key; export the key alone, without spaces",
        )
    if not key.isascii():
        raise ManifestError(
            f"pulse.api_key_env={variable}",
            f"{variable} holds non-ASCII characters, which an HTTP header cannot carry; "
            "check that the key was copied whole",
        )
    return key


def api_key_from_env(name: str, *, required: bool) -> str | None:
    """The normalised key from environment variable ``name``; raises `ManifestError` when it
    is required and unset, or unusable."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        if required:
            raise ManifestError(
                f"pulse.api_key_env={name}",
                f"environment variable {name} is not set; export your Pulse API key in it",
            )
        return None
    return normalise_api_key(raw, name)


class Scrubber:
    """Removes secrets from text: whole occurrences, and any piece of one at least
    `_MIN_PIECE` characters long (what is left where a log line or a body was cut)."""

    def __init__(self, *secrets: str | None) -> None:
        # Longest first, so a raw value holding the normalised key is replaced whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
            text = _scrub_pieces(text, secret)
        return text

    def scrub_whole(self, text: str) -> str:
        """Whole occurrences only: for structured text (a JSON frame), where replacing a
        short piece could change what it says."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def may_hide_in(self, frame: str) -> bool:
        """Whether strings decoded from the JSON text ``frame`` could hold a secret or a
        piece of one. Without a backslash, every decoded string (key or value) is a run of
        ``frame`` itself, so a frame with no piece in it needs no string scrubbed; with
        one (``\\u0073k...``, ``\\/``), an escape could spell a piece: assume so."""
        if not self.secrets:
            return False
        if "\\" in frame:
            return True
        return any(_piece_starts(secret).search(frame) for secret in self.secrets)

    def __bool__(self) -> bool:
        return bool(self.secrets)


@functools.lru_cache(maxsize=16)
def _piece_starts(secret: str) -> re.Pattern[str]:
    """Every `_MIN_PIECE`-long piece of ``secret``, as one pattern (searched in C: service
    text can be long)."""
    size = min(_MIN_PIECE, len(secret))
    pieces = {secret[i : i + size] for i in range(len(secret) - size + 1)}
    return re.compile("|".join(re.escape(piece) for piece in sorted(pieces)))


def _scrub_pieces(text: str, secret: str) -> str:
    """Replace every run of text that is a piece of ``secret`` (pieces are found by their
    first `_MIN_PIECE` characters, then grown)."""
    size = min(_MIN_PIECE, len(secret))
    pattern = _piece_starts(secret)
    kept: list[str] = []
    done = 0
    while (match := pattern.search(text, done)) is not None:
        start = match.start()
        end = start + size
        while end < len(text) and text[start : end + 1] in secret:
            end += 1
        kept += [text[done:start], REDACTED]
        done = end
    return "".join(kept) + text[done:] if kept else text


def scrubber_for_env(name: str | None) -> Scrubber:
    """A scrubber for the key in ``name``, raw and normalised (whichever reached a header)."""
    raw = os.environ.get(name) if name else None
    if not raw:
        return Scrubber()
    pieces = [raw, raw.strip(), _BEARER.sub("", raw.strip(), count=1).strip()]
    # A key with inner whitespace is refused, but its words must not leak from logs either.
    pieces += [word for word in raw.split() if len(word) >= 8 and word.lower() != "bearer"]
    return Scrubber(*pieces)


# --- credentials by pattern, whatever their source ----------------------------------
# A storage SDK signs with whatever it found (a profile file, an instance role, web
# identity, a SAS in a URL); its debug lines print the headers and the canonical request.
# Values are not known in advance, so they are found by what surrounds them.
_HEADER_NAMES = (
    r"(?:proxy-)?authorization|x-amz-security-token|x-amz-signature|x-goog-signature"
    r"|x-ms-(?:copy-source-)?authorization|x-api-key|api-key|cookie|set-cookie"
)
# ``'Authorization': b'AWS4-HMAC...'`` (a dict's repr), ``"X-Amz-Security-Token": "..."``
_QUOTED_HEADER = re.compile(
    rf"""(?i)(?<![\w-])((?:{_HEADER_NAMES})['"]?\s*[:=]\s*b?(['"]))(?:\\.|(?!\2).)*(\2)"""
)
# ``Authorization: Bearer ...`` on a line of its own, ``x-amz-security-token:...`` in
# botocore's canonical request: the rest of the line.
_PLAIN_HEADER = re.compile(rf"(?i)(?<![\w-])((?:{_HEADER_NAMES})\s*:)(?!\s*\[redacted\])[^\r\n]*")
# Query or connection-string fields: presigned S3/GCS URLs, Azure SAS ``sig=``, ``AccountKey=``.
_FIELD = re.compile(
    r"(?i)(?<![\w-])((?:x-amz-security-token|x-amz-signature|x-goog-signature|sig|signature"
    r"|access_token|id_token|refresh_token|token|accountkey|sharedaccesssignature|password)=)"
    r"(?!\[redacted\])[^&\s'\";,#]+"
)
# A bearer token outside a header (an exception's text): long, and not a plain word.
_BEARER_TOKEN = re.compile(r"(?i)\b(bearer\s+)(?=[\w\-.~+/]*[\d\-.~+/_])[\w\-.~+/]{12,}=*")
# The signature botocore logs on the line after ``Signature:``.
_SIGNATURE_LINE = re.compile(r"(?i)(\bsignature:\s*)[0-9a-f]{32,}")
_USERINFO = re.compile(r"(://[^/\s:@'\"]+:)[^@/\s'\"]+@")


def redact_credentials(text: str) -> str:
    """``text`` with credential-bearing headers, query fields and tokens replaced by
    ``[redacted]``, by pattern: the values need not be known (see `_HEADER_NAMES`)."""
    text = _QUOTED_HEADER.sub(rf"\1{REDACTED}\3", text)
    text = _PLAIN_HEADER.sub(rf"\1 {REDACTED}", text)
    text = _FIELD.sub(rf"\1{REDACTED}", text)
    text = _BEARER_TOKEN.sub(rf"\1{REDACTED}", text)
    text = _SIGNATURE_LINE.sub(rf"\1{REDACTED}", text)
    return _USERINFO.sub(rf"\1{REDACTED}@", text)


class RedactingFilter(logging.Filter):
    """For a log handler: no record, ours or a library's, carries a known secret (the API
    key as exported or normalised, the storage SDKs' secret variables) or a credential
    found by pattern (`redact_credentials`). The message, a formatted traceback and stack
    are all cleaned, and so are the structured fields a JSON log line carries
    (`batch.logjson.FIELDS`, given as ``extra=``)."""

    # As `batch.logjson.FIELDS` (not imported: logjson is the CLI's, this the library's).
    FIELDS = ("job", "run_id", "shard", "item_id", "source", "channel", "error_kind", "status")

    def __init__(self, scrubber: Scrubber) -> None:
        super().__init__()
        self.scrubber = scrubber

    def clean(self, text: str) -> str:
        return redact_credentials(self.scrubber.scrub(text) if self.scrubber else text)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        cleaned = self.clean(text)
        if cleaned != text:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            # Formatted here (as the handler's formatter would) so the traceback is cleaned.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.clean(record.exc_text)
        if record.stack_info:
            record.stack_info = self.clean(record.stack_info)
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if isinstance(value, str):
                setattr(record, name, self.clean(value))
        return True
