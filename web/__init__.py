"""The HTTP API: a Flask app that validates, authenticates and enqueues; it never runs jobs."""

from __future__ import annotations

import select
from typing import Any

from flask import Flask
from flask_swagger_ui import get_swaggerui_blueprint
from gevent import monkey
from redis import Redis
from redis.backoff import NoBackoff
from redis.connection import DefaultParser
from redis.retry import Retry

from web import errors
from web.api import Api
from web.schemas import MAX_RESULT_WAIT, document_request_limits
from web.settings import config_from_env
from worker import contract

_POLL = monkey.get_original("select", "poll")  # the system's poll(2), also once gevent has patched `select`


class ReplyParser(DefaultParser):
    """redis-py's reply parser, whose check for unread data on an idle connection is a plain poll(2) that returns
    at once.

    redis-py asks that of each connection it takes from its pool, before every command. With hiredis it polls
    through the `select` module, which gunicorn's gevent workers patch: gevent's poll starts a watcher and
    switches to its hub for a turn of the event loop, about 19 us against 0.8 us, and 9% of gunicorn's busy time
    at full load. Where the socket has something to read, or the reader something buffered, redis-py's own check
    decides, as it does for a call with a timeout.
    """

    def can_read(self, timeout: float = 0) -> bool:
        sock, reader = getattr(self, "_sock", None), getattr(self, "_reader", None)
        if timeout == 0 and sock is not None and reader is not None and not reader.has_data():
            if not (hasattr(sock, "pending") and sock.pending()):  # an SSL socket's decrypted bytes
                poller = _POLL()
                poller.register(sock, select.POLLIN)
                if not poller.poll(0):
                    return False
        return super().can_read(timeout)


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

    app.extensions["redis"] = Redis.from_url(
        app.config["REDIS_URL"],
        socket_connect_timeout=0.5,
        socket_timeout=1.0,
        retry=Retry(NoBackoff(), 1, supported_errors=contract.RESENT_ON),  # a pooled connection Redis closed
        health_check_interval=30,
        parser_class=ReplyParser,
    )
    # Long polls (/result?wait=N) block on Redis: they get connections whose reads may last that long.
    app.extensions["redis_blocking"] = Redis.from_url(
        app.config["REDIS_URL"],
        socket_connect_timeout=0.5,
        socket_timeout=MAX_RESULT_WAIT + 5,
        parser_class=ReplyParser,
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
