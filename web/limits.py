"""The per-key submit rate limit, counted in Redis so every gunicorn worker shares it."""

from __future__ import annotations

import json

from flask import Flask, current_app, request
from flask_limiter import Limiter

from web.auth import HEADER, key_fingerprint


def api_key_bucket() -> str:
    """Count requests per API key (its fingerprint; the key itself is never stored)."""
    return key_fingerprint(request.headers.get(HEADER, ""))


def submit_rate() -> str:
    return f"{current_app.config['RATE_LIMIT_PER_MINUTE']}/minute"


def rate_limit_off() -> bool:
    return current_app.config["RATE_LIMIT_PER_MINUTE"] <= 0


limiter = Limiter(
    key_func=api_key_bucket,
    strategy="moving-window",
    # If Redis is down the submit itself answers 503; the limiter must not turn that into a 500.
    swallow_errors=True,
)


def init_limits(app: Flask) -> None:
    """Keep the limiter's counters in the service's Redis; switch it off entirely when the limit is 0."""
    app.config.setdefault("RATELIMIT_STORAGE_URI", app.config["REDIS_URL"])
    app.config.setdefault("RATELIMIT_ENABLED", app.config["RATE_LIMIT_PER_MINUTE"] > 0)
    limiter.init_app(app)


def batch_cost() -> int:
    """A batch counts as one submit per request it carries."""
    try:
        body = json.loads(request.get_data(cache=True) or b"null")
    except ValueError:
        return 1
    requests = body.get("requests") if isinstance(body, dict) else None
    return max(len(requests), 1) if isinstance(requests, list) else 1
