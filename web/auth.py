"""API-key authentication: `X-API-Key` checked in constant time against `API_KEYS`."""

from __future__ import annotations

import hashlib
import hmac

from flask import current_app, g, request

from web.errors import ServiceMisconfigured, Unauthorized

HEADER = "X-API-Key"


def key_fingerprint(key: str) -> str:
    """Return a stable id for a key, safe to store and log (the key itself never is)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def require_api_key() -> None:
    """Before-request hook: set `g.owner` to the caller's key fingerprint or raise Unauthorized."""
    keys: list[str] = current_app.config["API_KEYS"]
    if not keys:
        raise ServiceMisconfigured("no API keys are configured: set API_KEYS")
    given = request.headers.get(HEADER, "")
    # Compare against every key so the time taken does not tell which one nearly matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not given or not matched:
        raise Unauthorized(f"missing or invalid {HEADER} header")
    g.owner = key_fingerprint(given)
