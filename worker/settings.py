"""Worker settings, read from the environment once per process (units in the names or comments)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from worker import contract

DEFAULT_WORKER_CONCURRENCY = 8
"""Worker processes, hence requests in flight at the engine: vLLM batches them together."""


@dataclass(frozen=True)
class WorkerSettings:
    redis_url: str
    engine_url: str
    served_model_name: str
    concurrency: int
    task_time_limit: int  # seconds
    connect_timeout: float  # seconds
    log_dir: str
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> WorkerSettings:
        """Read every worker setting from `env`, with the defaults listed in .env.sample."""
        return cls(
            redis_url=contract.redis_url(env),
            engine_url=env.get("ENGINE_URL") or contract.DEFAULT_ENGINE_URL,
            served_model_name=env.get("SERVED_MODEL_NAME") or contract.DEFAULT_SERVED_MODEL_NAME,
            concurrency=int(env.get("WORKER_CONCURRENCY", DEFAULT_WORKER_CONCURRENCY)),
            task_time_limit=int(env.get("TASK_TIME_LIMIT", contract.DEFAULT_TASK_TIME_LIMIT)),
            connect_timeout=float(env.get("ENGINE_CONNECT_TIMEOUT", "5")),
            log_dir=env.get("LOG_DIR") or contract.DEFAULT_LOG_DIR,
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
        )
