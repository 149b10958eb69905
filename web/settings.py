"""Web settings: Flask config keys read from the environment (units in the comments)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from worker import contract

DEFAULT_MAX_TOKENS = 256
"""Tokens generated when a request does not say `max_tokens`."""
MAX_NEW_TOKENS = 1024
"""Upper bound for `max_tokens`."""
MAX_PROMPT_CHARS = 32_000
"""Longest `prompt`, or sum of `messages` contents, in characters."""
MAX_BODY_BYTES = 1_048_576
"""Largest request body; larger ones get 413."""
RATE_LIMIT_PER_MINUTE = 600
"""Submits one API key may make per minute (a window opened by its first submit); 0 turns the limit off."""
MAX_QUEUED_JOBS = 10_000
"""Jobs waiting across the queues above which submits get 503; 0 turns the cap off."""
HEALTH_TIMEOUT = 1.0
"""Seconds the health check waits for Redis and for the engine."""
MAX_BATCH = 32
"""Most requests one POST /generate/batch may carry."""


def config_from_env(env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Build the app's config from environment variables, with the defaults in .env.sample.

    Raises:
        SettingsError: for a value the API cannot run with, naming the variable.
    """
    config = {
        "API_KEYS": [key.strip() for key in env.get("API_KEYS", "").split(",") if key.strip()],
        "REDIS_URL": contract.redis_url(env),
        "ENGINE_URL": env.get("ENGINE_URL") or contract.DEFAULT_ENGINE_URL,
        "ENGINE_HEALTH_PATH": env.get("ENGINE_HEALTH_PATH") or "/health",
        "DEFAULT_MAX_TOKENS": contract.env_int(env, "DEFAULT_MAX_TOKENS", DEFAULT_MAX_TOKENS, minimum=1),
        "MAX_NEW_TOKENS": contract.env_int(env, "MAX_NEW_TOKENS", MAX_NEW_TOKENS, minimum=1),
        "MAX_PROMPT_CHARS": contract.env_int(env, "MAX_PROMPT_CHARS", MAX_PROMPT_CHARS, minimum=1),
        "MAX_CONTENT_LENGTH": contract.env_int(env, "MAX_BODY_BYTES", MAX_BODY_BYTES, minimum=1),
        "TASK_TIME_LIMIT": contract.env_int(env, "TASK_TIME_LIMIT", contract.DEFAULT_TASK_TIME_LIMIT, minimum=1),
        "RESULT_TTL": contract.env_int(env, "RESULT_TTL", contract.DEFAULT_RESULT_TTL, minimum=1),
        "JOB_RETRIES": contract.env_int(env, "JOB_RETRIES", contract.DEFAULT_JOB_RETRIES, minimum=0),
        "RATE_LIMIT_PER_MINUTE": contract.env_int(env, "RATE_LIMIT_PER_MINUTE", RATE_LIMIT_PER_MINUTE, minimum=0),
        "MAX_QUEUED_JOBS": contract.env_int(env, "MAX_QUEUED_JOBS", MAX_QUEUED_JOBS, minimum=0),
        "HEALTH_TIMEOUT": contract.env_float(env, "HEALTH_TIMEOUT", HEALTH_TIMEOUT, positive=True),
        "MAX_BATCH": contract.env_int(env, "MAX_BATCH", MAX_BATCH, minimum=1),
        "FAIR_SHARE_SLOTS": contract.fair_share_slots(env),
        "QUEUE_TTL": contract.env_int(env, "QUEUE_TTL", contract.DEFAULT_QUEUE_TTL, minimum=1),
        "WEBHOOK_ALLOWED_HOSTS": contract.host_list(env.get("WEBHOOK_ALLOWED_HOSTS", "")),
        "WEBHOOK_ALLOW_PRIVATE": contract.flag(env.get("WEBHOOK_ALLOW_PRIVATE")),
        "WEBHOOK_SECRET_SET": bool(env.get("WEBHOOK_SECRET")),
        "LOG_DIR": env.get("LOG_DIR") or contract.DEFAULT_LOG_DIR,
        "LOG_LEVEL": contract.log_level(env),
    }
    if config["DEFAULT_MAX_TOKENS"] > config["MAX_NEW_TOKENS"]:
        raise contract.SettingsError(
            f"DEFAULT_MAX_TOKENS ({config['DEFAULT_MAX_TOKENS']}) may not be more than MAX_NEW_TOKENS "
            f"({config['MAX_NEW_TOKENS']}): every request without max_tokens would be refused"
        )
    return config
