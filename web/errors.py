"""Errors of the HTTP API and the one place that turns exceptions into JSON responses."""

from __future__ import annotations

from typing import Any

import redis.exceptions
from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException


class Unauthorized(Exception):
    """The request has no API key, or one that is not configured."""


class TaskNotFound(Exception):
    """No task with that id belongs to the caller's key."""


class ServiceMisconfigured(Exception):
    """The service cannot serve requests as configured."""


class QueueFull(Exception):
    """More jobs are waiting than MAX_QUEUED_JOBS allows."""


class RateLimited(Exception):
    """The API key has used its RATE_LIMIT_PER_MINUTE submits of the current window."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class InvalidHeader(Exception):
    """A request header the API reads has a value it cannot use."""


class AlreadyFinished(Exception):
    """The task has already ended; it cannot be cancelled."""


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class IdempotencyInProgress(Exception):
    """The Idempotency-Key's first request has not queued its tasks yet (or its outcome is not known yet)."""

    retry_after = 1


class SubmitNotAnswered(Exception):
    """Redis did not answer a submit's transaction in time; it may still queue the tasks when it goes on."""

    def __init__(self, task_ids: list[str]):
        ids = ", ".join(task_ids)
        super().__init__(
            f"the job queue did not answer in time and may still queue the submitted tasks ({ids}) once it does: "
            "GET /status/<task_id> finds each one it queued"
        )
        self.task_ids = task_ids


# Exception -> (HTTP status, error_type). The only place exceptions become statuses.
ERROR_MAP: dict[type[BaseException], tuple[int, str]] = {
    Unauthorized: (401, "unauthorized"),
    TaskNotFound: (404, "not_found"),
    ServiceMisconfigured: (503, "misconfigured"),
    QueueFull: (503, "queue_full"),
    InvalidHeader: (400, "validation_error"),
    AlreadyFinished: (409, "already_finished"),
    IdempotencyConflict: (409, "idempotency_conflict"),
    IdempotencyInProgress: (409, "idempotency_in_progress"),
    RateLimited: (429, "rate_limited"),
    SubmitNotAnswered: (503, "queue_unavailable"),
    redis.exceptions.ConnectionError: (503, "queue_unavailable"),
    redis.exceptions.TimeoutError: (503, "queue_unavailable"),
}
_HTTP_ERROR_TYPES = {400: "validation_error", 413: "payload_too_large", 422: "validation_error"}
REDIS_ERROR_MESSAGE = "the job queue is unavailable, try again shortly"
"""Said instead of a Redis error's own text."""
RETRY_AFTER_SECONDS = 5
"""Retry-After sent with 503 answers."""


def _message(exc: Exception) -> str:
    return REDIS_ERROR_MESSAGE if isinstance(exc, redis.exceptions.RedisError) else str(exc)


def _retry_after(exc: Exception) -> int:
    """Seconds a client should wait: what is left of a rate limit's window, else RETRY_AFTER_SECONDS."""
    return getattr(exc, "retry_after", RETRY_AFTER_SECONDS)


def error_body(error_type: str, message: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the API's one error shape; `detail` repeats the message for the previous API's clients."""
    body: dict[str, Any] = {"status": "error", "error_type": error_type, "error_message": message, "detail": message}
    if fields:
        body["errors"] = fields
    return body


def http_error_response(error: HTTPException) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Render a werkzeug/webargs HTTP error (validation, 404, 405, 413, ...) in the error shape."""
    data = getattr(error, "data", None) or {}
    fields = _flatten_fields(data.get("messages") or data.get("errors"))
    status = 400 if error.code == 422 else error.code or 500
    error_type = _HTTP_ERROR_TYPES.get(status, error.name.lower().replace(" ", "_"))
    if fields:
        message = "invalid request: " + "; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in fields.items())
    else:
        message = data.get("message") or error.description or error.name
    # Keep the exception's own headers (e.g. Allow on 405), but the body is JSON.
    headers = {key: value for key, value in error.get_headers() if key.lower() != "content-type"}
    headers.update(data.get("headers") or {})
    return error_body(error_type, message, fields), status, headers


def _flatten_fields(messages: Any) -> dict[str, list[str]] | None:
    """Turn webargs' {location: {field: [msgs]}} into {field: [msgs]}, naming nested fields with dots."""
    if not messages:
        return None
    flat: dict[str, list[str]] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                name = "body" if key == "_schema" else str(key)
                walk(f"{prefix}.{name}" if prefix else name, sub)
        elif isinstance(value, list) and all(isinstance(item, str) for item in value):
            flat.setdefault(prefix or "body", []).extend(value)
        else:
            flat.setdefault(prefix or "body", []).append(str(value))

    for location_messages in messages.values() if isinstance(messages, dict) else [messages]:
        walk("", location_messages)
    return flat


def register_error_handlers(app: Flask) -> None:
    """Answer every exception in `ERROR_MAP` with its status and the error shape."""

    def handle(exc: Exception):
        status, error_type = next(ERROR_MAP[cls] for cls in type(exc).__mro__ if cls in ERROR_MAP)
        body = error_body(error_type, _message(exc))
        if isinstance(exc, SubmitNotAnswered):
            body["task_ids"] = exc.task_ids
        response = jsonify(body)
        if status in (429, 503) or hasattr(exc, "retry_after"):
            response.headers["Retry-After"] = str(_retry_after(exc))
        if status == 503:
            app.logger.warning("%s: %s", error_type, exc)
        return response, status

    for exc_class in ERROR_MAP:
        app.register_error_handler(exc_class, handle)
