"""The HTTP API: a Flask app that validates, authenticates and enqueues; it never runs jobs."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_swagger_ui import get_swaggerui_blueprint
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from web import errors
from web.api import Api
from web.schemas import MAX_RESULT_WAIT, document_request_limits
from web.settings import config_from_env
from worker import contract


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the API app from the environment, overridden by `test_config`."""
    from web import health, jobs, metrics

    testing = bool(test_config and test_config.get("TESTING"))
    with contract.settings_checked():  # in gunicorn's master, a bad setting is one line and status 2
        config = config_from_env()
        if not testing:
            contract.bind_to_service_cpus()  # with gunicorn's --preload, in the master: its workers inherit it
    contract.quicken_rq_serializer_check()
    app = Flask(__name__)
    app.config.update(config)
    app.config.update(
        API_TITLE="LLM queue",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS={
            "components": {"securitySchemes": {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
            "security": [{"ApiKey": []}],
        },
    )
    if test_config:
        app.config.update(test_config)
    if not testing:
        contract.configure_logging(app.config["LOG_DIR"], app.config["LOG_LEVEL"])

    # Under gunicorn's gevent workers redis-py's check of a pooled connection before each command polls through
    # gevent: a turn of its hub. A plain poll(2) in its place, without that turn, saved CPU, but at the highest
    # submit rate some requests then waited over a second (docs/bench/tuning.md, step 79).
    app.extensions["redis"] = Redis.from_url(
        app.config["REDIS_URL"],
        socket_connect_timeout=0.5,
        socket_timeout=1.0,
        retry=Retry(NoBackoff(), 1, supported_errors=contract.RESENT_ON),  # a pooled connection Redis closed
        health_check_interval=30,
    )
    # Long polls (/result?wait=N) block on Redis: they get connections whose reads may last that long.
    app.extensions["redis_blocking"] = Redis.from_url(
        app.config["REDIS_URL"], socket_connect_timeout=0.5, socket_timeout=MAX_RESULT_WAIT + 5
    )
    api = Api(app)
    api.register_blueprint(health.bp)
    api.register_blueprint(jobs.bp)
    document_request_limits(api.spec, app.config)
    app.register_blueprint(metrics.bp)
    # Swagger UI with its assets served from the installed package: no CDN needed.
    app.register_blueprint(get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "LLM queue"}))
    errors.register_error_handlers(app)
    return app
