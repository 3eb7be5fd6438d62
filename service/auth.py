"""API keys (API_KEYS): who may call a service whose URL is public (a Fly app; a Cloud Run service opened to
allUsers, or one behind IAM that wants a second factor).

When keys are set, every request but the health routes needs one, as `Authorization: Bearer KEY` or
`X-API-Key: KEY`. X-API-Key wins when both are sent: on Cloud Run, Authorization carries the caller's IAM
identity token, which the platform checks and passes on. A refusal is a 401 with `WWW-Authenticate: Bearer` and
the route's error body (`{"detail"}`, `{"error"}` on the V2 routes). Keys are compared in constant time, and are
never logged or echoed: the access log writes the path, status, size and user agent, never a request header.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Iterable

import orjson

# Routes a platform's health checks and load balancers call without credentials (Cloud Run's startup probe, Fly's
# checks, Kubernetes' probes on V2).
OPEN_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})
# Swagger UI: a browser loads the page, its files and the document before the user can enter a key in it.
DOCS_PATHS = frozenset({"/docs", "/openapi.json"})
DOCS_FILES = "/docs/static/"

MISSING = "this service needs an API key: send `Authorization: Bearer KEY` or `X-API-Key: KEY`"
WRONG = ("the API key is not valid: send one of the service's API_KEYS (where Authorization carries a platform's "
         "token, such as Cloud Run's IAM identity token, send the key as X-API-Key)")


def open_paths(docs_open: bool) -> frozenset[str]:
    """The routes that need no key: the health routes, and Swagger UI's page and document unless DOCS=false."""
    return OPEN_PATHS | DOCS_PATHS if docs_open else OPEN_PATHS


class ApiKeys:
    """The accepted keys, kept as sha256 digests, and the check every request goes through first."""

    def __init__(self, keys: Iterable[str], docs_open: bool = True):
        # Digests are all 32 bytes, so that comparing them says nothing about a key's length.
        self.digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys)
        self.open_paths = open_paths(docs_open)
        self.docs_open = docs_open

    def accepts(self, key: bytes) -> bool:
        """Whether `key` is one of the keys, in time that depends on neither which one nor how much matched."""
        digest = hashlib.sha256(key).digest()
        found = False
        for known in self.digests:  # every key compared, no early exit
            found |= hmac.compare_digest(digest, known)
        return found

    def refusal(self, scope: dict) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """None when the request may go on; else the 401 answer (status, headers, body)."""
        path = scope["path"]
        if path in self.open_paths or (self.docs_open and path.startswith(DOCS_FILES)):
            return None
        key = bearer = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                key = value
            elif name == b"authorization":
                bearer = value
        if key is None and bearer is not None:
            scheme, _, credentials = bearer.partition(b" ")
            key = credentials if scheme.lower() == b"bearer" else None
        if key is not None and self.accepts(key.strip()):
            return None
        message = MISSING if key is None else WRONG
        challenge = b"Bearer" if key is None else b'Bearer error="invalid_token"'
        body = orjson.dumps({"error": message} if path == "/v2" or path.startswith("/v2/") else {"detail": message})
        return 401, [(b"content-type", b"application/json"), (b"www-authenticate", challenge)], body


def parse(value: str) -> tuple[str, ...]:
    """API_KEYS, comma-separated (spaces around a key ignored), as keys; ValueError naming the fix, never a key."""
    keys = tuple(key.strip() for key in value.split(",") if key.strip())
    for position, key in enumerate(keys, 1):
        if len(key) < 16 or any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError(
                f"key {position} of {len(keys)} is too short or holds spaces: each key needs 16 printable "
                "characters or more, keys separated by commas (`invoke fly.api-key` makes a strong one)"
            )
    return keys

