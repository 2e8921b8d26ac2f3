"""The API key: read once, normalised or refused before any session, and scrubbed from text.

The key travels in the ``Authorization`` header only. Anything that came back from the
service (error bodies, close reasons, error messages) may echo that header, so such text
goes through `Scrubber.scrub` before it is logged, stored or reported. Messages here never
print the key, not even part of it.
"""

from __future__ import annotations

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

    def __bool__(self) -> bool:
        return bool(self.secrets)


def _scrub_pieces(text: str, secret: str) -> str:
    """Replace every run of text that is a piece of ``secret`` (linear in the text: pieces
    are found by their first `_MIN_PIECE` characters, then grown)."""
    size = min(_MIN_PIECE, len(secret))
    starts = {secret[i : i + size] for i in range(len(secret) - size + 1)}
    kept: list[str] = []
    i = done = 0
    while i <= len(text) - size:
        if text[i : i + size] not in starts:
            i += 1
            continue
        end = i + size
        while end < len(text) and text[i : end + 1] in secret:
            end += 1
        kept += [text[done:i], REDACTED]
        i = done = end
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
