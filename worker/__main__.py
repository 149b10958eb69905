"""`python -m worker`: run a pool of RQ workers that forward jobs to the engine.

Each worker process holds one request in flight, so WORKER_CONCURRENCY processes keep that many
requests at the engine for vLLM to batch. The workers are SimpleWorkers (see worker/runner.py): the
job only waits on HTTP, so forking a work horse per job would cost time and memory for nothing.
RQ's WorkerPool respawns a worker process that dies.
"""

from __future__ import annotations

from loguru import logger
from redis import Redis
from rq.worker_pool import WorkerPool

from worker import contract
from worker.jobs import EngineJob
from worker.runner import EngineWorker
from worker.settings import WorkerSettings


def main() -> None:
    """Start the worker pool and block until SIGTERM/SIGINT."""
    settings = WorkerSettings.from_env()
    contract.configure_logging(settings.log_dir, settings.log_level)
    logger.info(
        "starting {} workers on queues {} for engine {}",
        settings.concurrency,
        ",".join(contract.QUEUES),
        settings.engine_url,
    )
    pool = WorkerPool(
        contract.QUEUES,
        connection=Redis.from_url(settings.redis_url),
        num_workers=settings.concurrency,
        worker_class=EngineWorker,
        job_class=EngineJob,
    )
    pool.start(logging_level=settings.log_level)


if __name__ == "__main__":
    main()
