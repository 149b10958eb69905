"""Service index and health check (no API key needed)."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version

import httpx
import redis.exceptions
from flask import current_app

from web import tasks
from web.api import Blueprint
from web.schemas import HealthSchema, IndexSchema

bp = Blueprint("health", __name__, description="Service index and health.")


def service_version() -> str:
    try:
        return version("llm-queue")
    except PackageNotFoundError:
        return "0+unknown"


@bp.get("/")
@bp.doc(security=[])
@bp.response(200, IndexSchema)
def index():
    """Name the service and where its documentation is."""
    return {"service": "llm-queue", "version": service_version(), "docs": "/docs", "openapi": "/openapi.json"}


@bp.get("/health")
@bp.doc(security=[])
@bp.response(200, HealthSchema, description="Redis, engine and workers are up")
@bp.alt_response(503, schema=HealthSchema, description="Degraded: Redis, the engine or the workers are down")
def health():
    """Report whether Redis answers, the engine has its model loaded, and workers are listening."""
    connection = tasks.redis_connection()
    try:
        connection.ping()
        workers = tasks.engine_workers(connection)
        queued = tasks.queued_jobs(connection)
        redis_ok = True
    except redis.exceptions.RedisError:
        redis_ok, workers, queued = False, None, None
    model_loaded = _engine_ready()
    healthy = redis_ok and model_loaded and bool(workers)
    body = {
        "status": "healthy" if healthy else "degraded",
        "redis_connected": redis_ok,
        "model_loaded": model_loaded,
        "workers": workers,
        "queued_jobs": queued,
        "version": service_version(),
    }
    return body, 200 if healthy else 503


@functools.cache
def _engine_http() -> httpx.Client:
    """One client per process, made on first use: a new one per check costs ~20 ms building its TLS context."""
    return httpx.Client()


def _engine_ready() -> bool:
    config = current_app.config
    try:
        response = _engine_http().get(
            config["ENGINE_URL"] + config["ENGINE_HEALTH_PATH"], timeout=config["HEALTH_TIMEOUT"]
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200
