"""`python -m worker`: run a pool of RQ workers that forward jobs to the engine.

Each worker holds one request in flight, so WORKER_CONCURRENCY workers keep that many requests at the
engine for vLLM to batch. They run as threads, WORKER_THREADS to a process (worker/pool.py): a job only
waits on HTTP, so neither a process per worker nor RQ's work horse per job would buy anything but
memory and CPU time switching between processes. RQ's WorkerPool respawns a process that dies.
"""

from __future__ import annotations

import math

from loguru import logger
from redis import Redis

from worker import contract
from worker.jobs import EngineJob
from worker.pool import ThreadedWorkerPool
from worker.runner import EngineWorker
from worker.settings import WorkerSettings


def main() -> None:
    """Start the worker pool and block until SIGTERM/SIGINT."""
    with contract.settings_checked():
        settings = WorkerSettings.from_env()
        cpus = contract.bind_to_service_cpus()  # before any thread starts; the pool's processes inherit it
    contract.configure_logging(settings.log_dir, settings.log_level)
    processes = math.ceil(settings.concurrency / settings.threads)
    threads = math.ceil(settings.concurrency / processes)
    logger.info(
        "starting {} workers ({} processes of {} threads) on queues {} for engine {}, on CPUs {}",
        processes * threads,
        processes,
        threads,
        ",".join(contract.QUEUES),
        settings.engine_url,
        contract.cpu_list(cpus) if cpus else "any (SERVICE_CPUS)",
    )
    pool = ThreadedWorkerPool(
        contract.QUEUES,
        connection=Redis.from_url(settings.redis_url, retry=contract.redis_retry(settings.redis_outage_wait)),
        num_workers=processes,
        threads=threads,
        worker_class=EngineWorker,
        job_class=EngineJob,
    )
    pool.start(logging_level=settings.log_level)


if __name__ == "__main__":
    main()
