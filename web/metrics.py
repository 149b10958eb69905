"""`GET /metrics`: Prometheus gauges read from Redis at scrape time, so every gunicorn worker agrees."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis import Redis
from rq import Queue
from rq.rate_limit import RateLimitRegistry

from web import tasks
from web.auth import require_api_key
from worker import contract

bp = Blueprint("metrics", __name__)
bp.before_request(require_api_key)


class QueueCollector:
    """Jobs per queue and state, and registered workers, as Redis has them now."""

    def __init__(self, connection: Redis):
        self.connection = connection

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("llm_queue_jobs", "Jobs by queue and state.", labels=["queue", "state"])
        for name in contract.QUEUES:
            queue = Queue(name, connection=self.connection)
            jobs.add_metric([name, "queued"], self.connection.llen(queue.key))
            registries = {
                "started": queue.started_job_registry,
                "scheduled": queue.scheduled_job_registry,
                "finished": queue.finished_job_registry,
                "failed": queue.failed_job_registry,
                "canceled": queue.canceled_job_registry,
            }
            for state, registry in registries.items():
                # No cleanup: a scrape must not act on jobs (RQ's count would sweep abandoned ones).
                jobs.add_metric([name, state], registry.get_job_count(cleanup=False))
        yield jobs
        waiting = GaugeMetricFamily(
            "llm_queue_fair_share_waiting", "Jobs held back until their API key has a free fair-share slot."
        )
        waiting.add_metric(
            [], sum(registry.get_rate_limited_job_count() for registry in RateLimitRegistry.all(self.connection))
        )
        yield waiting
        workers = GaugeMetricFamily("llm_queue_workers", "Engine workers registered (webhook workers not counted).")
        workers.add_metric([], tasks.engine_workers(self.connection))
        yield workers


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text exposition of the queue's state."""
    registry = CollectorRegistry()
    registry.register(QueueCollector(tasks.redis_connection()))
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
