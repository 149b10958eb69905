"""Webhook delivery: POST a finished job's result to its `callback_url`, signed, retried by RQ.

`worker.outcome.finish` queues one `deliver` job on llm-webhooks per finished job that asked for a
webhook; `python -m worker.webhooks` works that queue (RQ retries a failed delivery after 1, 4, 16,
64 and 256 s). The engine workers never deliver webhooks, so a slow receiver cannot hold an engine slot.

Signature: `X-Webhook-Signature: sha256=<hex>` is HMAC-SHA256 with WEBHOOK_SECRET over
`<X-Webhook-Timestamp>.<body>`; receivers recompute it and reject old timestamps.
SSRF: the host must be in WEBHOOK_ALLOWED_HOSTS, and every address it resolves to must be public
unless WEBHOOK_ALLOW_PRIVATE is on; the request then goes to the address that was checked, so a
second DNS answer cannot point it elsewhere.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from loguru import logger
from redis import Redis
from rq import get_current_job
from rq.worker import SimpleWorker
from rq.worker_pool import WorkerPool

from worker import contract, outcome

USER_AGENT = "llm-queue-webhook/1"


@dataclass(frozen=True)
class WebhookSettings:
    secret: str
    allowed_hosts: list[str]
    allow_private: bool
    timeout: float  # seconds
    workers: int
    redis_url: str
    log_dir: str
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WebhookSettings:
        return cls(
            secret=env.get("WEBHOOK_SECRET", ""),
            allowed_hosts=contract.host_list(env.get("WEBHOOK_ALLOWED_HOSTS", "")),
            allow_private=contract.flag(env.get("WEBHOOK_ALLOW_PRIVATE")),
            timeout=contract.env_float(env, "WEBHOOK_TIMEOUT", 10.0, positive=True),
            workers=contract.env_int(env, "WEBHOOK_WORKERS", 2, minimum=1),
            redis_url=contract.redis_url(env),
            log_dir=env.get("LOG_DIR") or contract.DEFAULT_LOG_DIR,
            log_level=contract.log_level(env),
        )


class WebhookRefused(Exception):
    """The callback URL may not be called (not allowed, or resolves to a non-public address)."""


class WebhookFailed(Exception):
    """The receiver could not be reached or did not answer 2xx; the delivery is retried."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """Return the `X-Webhook-Signature` value for `body` sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def resolve(url: str, settings: WebhookSettings) -> tuple[str, str]:
    """Check the URL and every address its host resolves to; return (URL with the checked address, host).

    Raises:
        WebhookRefused: not allowed, or some resolved address is not public.
    """
    problem = contract.callback_url_problem(url, settings.allowed_hosts, settings.allow_private)
    if problem:
        raise WebhookRefused(problem)
    parts = urlsplit(url)
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookFailed(f"cannot resolve {host}: {exc}") from exc
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    for address in addresses:
        if problem := contract.address_problem(address, settings.allow_private):
            raise WebhookRefused(f"{host} resolves to {address}: {problem}")
    address = addresses[0]
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = f"{literal}:{parts.port}" if parts.port else literal
    return urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")), host


def deliver(task_id: str, url: str, body: dict[str, Any]) -> int:
    """POST `body` to `url`, signed; record the outcome under the task's webhook state. Returns the status code.

    Raises:
        WebhookFailed: for RQ to retry (network error or a non-2xx answer), unless this was the last attempt.
    """
    settings = WebhookSettings.from_env()
    job = get_current_job()
    connection = job.connection
    key = outcome.webhook_key(task_id)
    attempts = connection.hincrby(key, "attempts", 1)
    last_attempt = not job.retries_left
    try:
        target, host = resolve(url, settings)
        data = json.dumps(body).encode()
        timestamp = int(time.time())
        headers = {
            "Host": urlsplit(url).netloc,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Task-Id": task_id,
            "X-Webhook-Timestamp": str(timestamp),
            "X-Webhook-Signature": sign(settings.secret, timestamp, data),
        }
        extensions = {"sni_hostname": host} if url.startswith("https:") else {}
        try:
            # Redirects are not followed: their target would skip the checks above.
            with httpx.Client(timeout=settings.timeout, follow_redirects=False) as http:
                response = http.post(target, content=data, headers=headers, extensions=extensions)
        except httpx.HTTPError as exc:
            raise WebhookFailed(f"{type(exc).__name__}: {exc}") from exc
        connection.hset(key, "last_status_code", response.status_code)
        if not 200 <= response.status_code < 300:
            raise WebhookFailed(f"the receiver answered {response.status_code}")
    except WebhookRefused as exc:
        connection.hset(key, mapping={"status": "refused", "last_error": str(exc)})
        logger.warning("webhook for job {} refused: {}", task_id, exc)
        return 0
    except WebhookFailed as exc:
        status = "failed" if last_attempt else "retrying"
        connection.hset(key, mapping={"status": status, "last_error": str(exc)})
        logger.warning("webhook for job {} attempt {} failed: {} ({})", task_id, attempts, exc, status)
        if last_attempt:
            return 0
        raise
    connection.hset(key, "status", "delivered")
    connection.hdel(key, "last_error")
    logger.info("webhook for job {} delivered on attempt {} ({})", task_id, attempts, response.status_code)
    return response.status_code


class WebhookWorker(SimpleWorker):
    """RQ's SimpleWorker, listing its queue for `rq info` and rq-dashboard when it starts (`contract.list_queues`)."""

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        contract.list_queues(self.connection, self.queues)


def main() -> None:
    """Work the webhook queue with WEBHOOK_WORKERS processes until SIGTERM/SIGINT."""
    with contract.settings_checked():
        settings = WebhookSettings.from_env()
        contract.bind_to_service_cpus()
    contract.configure_logging(settings.log_dir, settings.log_level)
    if not settings.allowed_hosts:
        logger.info("WEBHOOK_ALLOWED_HOSTS is empty: the API refuses callback_url, nothing will be delivered")
    elif not settings.secret:
        logger.warning("WEBHOOK_SECRET is empty: webhooks are sent with a signature anyone can forge")
    pool = WorkerPool(
        [contract.QUEUE_WEBHOOKS],
        connection=Redis.from_url(settings.redis_url, retry=contract.redis_retry(contract.REDIS_OUTAGE_WAIT)),
        num_workers=settings.workers,
        worker_class=WebhookWorker,
    )
    pool.start(logging_level=settings.log_level)


if __name__ == "__main__":
    main()
