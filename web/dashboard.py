"""`python -m web.dashboard`: rq-dashboard under gunicorn, behind HTTP Basic credentials.

It refuses to start without RQ_DASHBOARD_USERNAME and RQ_DASHBOARD_PASSWORD unless bound to
loopback, since the dashboard can delete and requeue jobs.
"""

from __future__ import annotations

import hmac
import os
import sys
from collections.abc import Mapping

from flask import Flask, Response, request
from rq_dashboard.cli import make_flask_app
from rq_dashboard.web import setup_rq_connection

from worker import contract

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_dashboard(env: Mapping[str, str] = os.environ) -> Flask:
    """Build the rq-dashboard app for the service's Redis."""
    app = make_flask_app(None, None, None, "")
    app.config["RQ_DASHBOARD_REDIS_URL"] = contract.redis_url(env)
    setup_rq_connection(app)
    username, password = env.get("RQ_DASHBOARD_USERNAME", ""), env.get("RQ_DASHBOARD_PASSWORD", "")
    if username and password:
        app.before_request(lambda: _check_credentials(username, password))
    return app


def _check_credentials(username: str, password: str) -> Response | None:
    auth = request.authorization
    given_user = (auth.username or "") if auth else ""
    given_password = (auth.password or "") if auth else ""
    ok = hmac.compare_digest(given_user.encode(), username.encode())
    ok &= hmac.compare_digest(given_password.encode(), password.encode())
    if auth is None or not ok:
        return Response("credentials required", 401, {"WWW-Authenticate": 'Basic realm="rq-dashboard"'})
    return None


def dashboard_host(env: Mapping[str, str]) -> str:
    """The address the dashboard is served on: RQ_DASHBOARD_HOST, loopback if unset or empty."""
    return env.get("RQ_DASHBOARD_HOST") or "127.0.0.1"


def refusal(env: Mapping[str, str]) -> str | None:
    """Return why the dashboard must not start with these settings, or None."""
    host = dashboard_host(env)
    has_credentials = bool(env.get("RQ_DASHBOARD_USERNAME") and env.get("RQ_DASHBOARD_PASSWORD"))
    if not has_credentials and host not in LOOPBACK:
        return (
            f"refusing to serve rq-dashboard on {host} without credentials: "
            "set RQ_DASHBOARD_USERNAME and RQ_DASHBOARD_PASSWORD, or bind RQ_DASHBOARD_HOST to 127.0.0.1"
        )
    return None


def main() -> None:
    """Check the settings, then replace this process with gunicorn serving the dashboard."""
    env = os.environ
    with contract.settings_checked():
        reason = refusal(env)
        if reason:
            raise contract.SettingsError(reason)
        contract.redis_url(env)  # read again by `create_dashboard` under gunicorn, where an error is a traceback
        port = contract.env_port(env, "RQ_DASHBOARD_PORT", 9181)
        contract.bind_to_service_cpus()  # gunicorn, started in its place, keeps it
    bind = f"{dashboard_host(env)}:{port}"
    gunicorn = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    os.execv(gunicorn, [gunicorn, "--workers", "1", "--bind", bind, "web.dashboard:create_dashboard()"])


if __name__ == "__main__":
    main()
