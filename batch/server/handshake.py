"""The stateless part of the handshake gate: path, API key and query parameters.

Pure: a request target and its ``Authorization`` header in, an `Admission` or a
`Refusal` out. Stateful checks (concurrency limit, injected refusals) live in
`batch.server.app`. Refusal reasons never include the key.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from batch.pulse.protocol import (
    KNOWN_PATHS,
    Generation,
    ParamError,
    PulseOptions,
    parse_query,
)


@dataclass(frozen=True)
class Refusal:
    """An HTTP answer instead of the upgrade; ``retry_after_s`` becomes ``Retry-After``."""

    status: int
    reason: str
    retry_after_s: float | None = None


@dataclass(frozen=True)
class Admission:
    """A request that may be upgraded, with its validated options."""

    path: str
    options: PulseOptions
    query: dict[str, str]

    @property
    def generation(self) -> Generation:
        return next(g for g in Generation if g.path == self.path)


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    """True when the header is ``Bearer <api_key>``; compared in constant time."""
    if authorization is None:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def check_request(
    target: str, authorization: str | None, api_key: str | None
) -> Admission | Refusal:
    """Decide 404 (path), 401 (key, only when one is configured) and 400 (parameters)."""
    parts = urlsplit(target)
    # Strict: each generation at exactly its own path.
    generation = next((g for g in Generation if g.path == parts.path), None)
    if generation is None:
        return Refusal(404, f"no endpoint at {parts.path!r}; use one of {', '.join(KNOWN_PATHS)}")
    if api_key is not None and not bearer_matches(authorization, api_key):
        return Refusal(401, "missing or invalid API key; send 'Authorization: Bearer <key>'")
    params = parse_qs(parts.query, keep_blank_values=True)
    try:
        options = parse_query(params, generation)
    except ParamError as exc:
        return Refusal(400, str(exc))
    query = {name: values[-1] for name, values in params.items()}
    return Admission(parts.path, options, query)
