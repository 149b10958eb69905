"""Worker settings, read from the environment once per process (units in the names or comments)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from worker import contract

DEFAULT_WORKER_THREADS = 8
"""Workers per worker process: WORKER_CONCURRENCY is spread over as few processes as this allows."""
DEFAULT_JOB_MONITORING_INTERVAL = 5
"""Seconds between heartbeats of a running job."""
DEFAULT_HEARTBEAT_GRACE = 10
"""Seconds a running job's heartbeat may be late before the job counts as abandoned (RQ uses 60)."""
DEFAULT_MAINTENANCE_INTERVAL = 5
"""Seconds between sweeps for abandoned jobs (RQ uses 600)."""
DEFAULT_WORKER_TTL = 20
"""Seconds a silent worker stays registered."""
DEFAULT_ENGINE_RETRY_BACKOFF = 1
"""Seconds before the first retry after an engine failure; doubles each attempt, at most 30 s."""
DEFAULT_PRIORITY_AGING = 60
"""Seconds after which the oldest job of a lower priority class is served before newer higher ones; 0: never."""
DEFAULT_STREAM_FLUSH_INTERVAL = 0.25
"""Seconds between `token` events of a running job: the engine's text is published in batches this often."""
DEFAULT_ENGINE_STREAM_INTERVAL = 1
"""Tokens per stream event a worker asks the engine for (vLLM's `stream_interval`); 1: every token."""


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    engine_url: str
    engine_health_path: str
    served_model_name: str
    concurrency: int
    threads: int
    task_time_limit: int  # seconds
    connect_timeout: float  # seconds
    job_monitoring_interval: int  # seconds
    heartbeat_grace: int  # seconds
    maintenance_interval: int  # seconds
    worker_ttl: int  # seconds
    engine_retry_backoff: int  # seconds
    queue_ttl: int  # seconds
    priority_aging: float  # seconds
    stream_flush_interval: float  # seconds
    engine_stream_interval: int  # tokens
    result_ttl: int  # seconds
    log_prompts: bool
    log_dir: str
    log_level: str

    @property
    def redis_outage_wait(self) -> float:
        """Seconds of Redis outage a worker waits out: `contract.REDIS_OUTAGE_WAIT`, or less with a short
        HEARTBEAT_GRACE, so that Redis is back well before a running job's heartbeat could count as expired."""
        return min(contract.REDIS_OUTAGE_WAIT, 0.75 * self.heartbeat_grace)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WorkerSettings:
        """Read every worker setting from `env`, with the defaults listed in .env.sample."""
        return cls(
            redis_url=contract.redis_url(env),
            engine_url=env.get("ENGINE_URL") or contract.DEFAULT_ENGINE_URL,
            engine_health_path=env.get("ENGINE_HEALTH_PATH") or "/health",
            served_model_name=env.get("SERVED_MODEL_NAME") or contract.DEFAULT_SERVED_MODEL_NAME,
            concurrency=contract.worker_concurrency(env),
            threads=contract.env_int(env, "WORKER_THREADS", DEFAULT_WORKER_THREADS, minimum=1),
            task_time_limit=contract.env_int(env, "TASK_TIME_LIMIT", contract.DEFAULT_TASK_TIME_LIMIT, minimum=1),
            connect_timeout=contract.env_float(env, "ENGINE_CONNECT_TIMEOUT", 5.0, positive=True),
            job_monitoring_interval=contract.env_int(
                env, "JOB_MONITORING_INTERVAL", DEFAULT_JOB_MONITORING_INTERVAL, minimum=1
            ),
            heartbeat_grace=contract.env_int(env, "HEARTBEAT_GRACE", DEFAULT_HEARTBEAT_GRACE, minimum=0),
            maintenance_interval=contract.env_int(env, "MAINTENANCE_INTERVAL", DEFAULT_MAINTENANCE_INTERVAL, minimum=1),
            worker_ttl=contract.env_int(env, "WORKER_TTL", DEFAULT_WORKER_TTL, minimum=1),
            engine_retry_backoff=contract.env_int(env, "ENGINE_RETRY_BACKOFF", DEFAULT_ENGINE_RETRY_BACKOFF, minimum=0),
            queue_ttl=contract.env_int(env, "QUEUE_TTL", contract.DEFAULT_QUEUE_TTL, minimum=1),
            priority_aging=contract.env_float(env, "PRIORITY_AGING", DEFAULT_PRIORITY_AGING),
            stream_flush_interval=contract.env_float(env, "STREAM_FLUSH_INTERVAL", DEFAULT_STREAM_FLUSH_INTERVAL),
            engine_stream_interval=contract.env_int(
                env, "ENGINE_STREAM_INTERVAL", DEFAULT_ENGINE_STREAM_INTERVAL, minimum=1
            ),
            result_ttl=contract.env_int(env, "RESULT_TTL", contract.DEFAULT_RESULT_TTL, minimum=1),
            log_prompts=contract.flag(env.get("LOG_PROMPTS")),
            log_dir=env.get("LOG_DIR") or contract.DEFAULT_LOG_DIR,
            log_level=contract.log_level(env),
        )
