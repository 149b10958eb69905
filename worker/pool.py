"""RQ's WorkerPool with several workers in threads of each process.

A worker spends its job waiting on the engine's stream, so a thread is enough to hold a request in
flight; one process per request would cost memory and, with many in flight, CPU time switching between
processes. The pool runs WORKER_CONCURRENCY workers as processes of WORKER_THREADS threads each; RQ's
WorkerPool starts the processes, respawns one that dies, and sends each SIGINT on shutdown.

A worker process's signals:
- the first SIGINT/SIGTERM is a warm shutdown: every worker finishes its running job, takes no other,
  and the process exits once all have left (an idle worker leaves when its current wait for a job ends,
  within a second);
- another one a second or more later is a cold shutdown: every running job's engine request is cut and
  the job queued again at once, then the process exits (a job still running COLD_SHUTDOWN_WAIT later is
  left to the sweep for abandoned jobs, as after a kill: docs/RELIABILITY.md). RQ's pool forwards the
  signal it got, so two within a second count as one.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterable
from typing import Any

from loguru import logger
from redis import ConnectionPool
from rq.job import Job
from rq.worker import WorkerStatus
from rq.worker_pool import ForkProcess, WorkerPool

from worker.runner import EngineWorker

DUPLICATE_SIGNAL_WINDOW = 1.0  # seconds within which a second signal repeats the first, as RQ counts it
COLD_SHUTDOWN_WAIT = 3.0  # seconds a cold shutdown waits for the cut jobs to be queued again


class ThreadedWorkerPool(WorkerPool):
    """A WorkerPool whose `num_workers` processes each run `threads` workers."""

    def __init__(self, *args: Any, threads: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.threads = threads

    def get_worker_process(self, name: str, burst: bool, _sleep: float = 0, logging_level: str = "INFO"):
        return ForkProcess(
            target=run_workers,
            args=(name, self.threads, self._queue_names, self._connection_class, self._pool_class, self._pool_kwargs),
            kwargs={
                "burst": burst,
                "logging_level": logging_level,
                "worker_class": self.worker_class,
                "job_class": self.job_class,
            },
            name=f"Worker {name} (WorkerPool {self.name})",
        )


class ShutdownSignals:
    """A worker process's SIGINT/SIGTERM handler: warm shutdown first, cold on a signal a second or more later.

    A signal that arrives while the handler runs for another is a repeat of it and is passed over: the
    process gets the stop signal both from whoever stops the process group (honcho, a terminal) and from
    RQ's pool, which forwards the one it got, and the handler must not run inside itself (loguru's
    handlers are not re-entrant: the second's log lines would be lost with an error).
    """

    def __init__(self, workers: list[EngineWorker], running: list[threading.Thread]):
        self.workers = workers
        self.running = running
        self.requested_at: float | None = None  # time.monotonic() of the warm shutdown
        self._handling = False

    def warm_stop(self) -> None:
        self.requested_at = time.monotonic()
        for worker in self.workers:
            worker.stop_after_job()

    def __call__(self, signum: int, frame: Any) -> None:
        if self._handling:
            return
        self._handling = True
        try:
            self._handle()
        finally:
            self._handling = False

    def _handle(self) -> None:
        if self.requested_at is None:
            count = len(self.workers)
            logger.info("worker process {}: warm shutdown, {} workers finish their jobs", os.getpid(), count)
            self.warm_stop()
        elif time.monotonic() - self.requested_at >= DUPLICATE_SIGNAL_WINDOW:
            busy = sum(worker.get_state() == WorkerStatus.BUSY for worker in self.workers)
            logger.warning("worker process {}: cold shutdown, {} running jobs go back to the queue", os.getpid(), busy)
            for worker in self.workers:
                worker.shut_down_now()
            until = time.monotonic() + COLD_SHUTDOWN_WAIT
            for thread in self.running:
                thread.join(max(until - time.monotonic(), 0))
            os._exit(1)


def run_workers(
    name: str,
    threads: int,
    queue_names: Iterable[str],
    connection_class: Any,
    connection_pool_class: Any,
    connection_pool_kwargs: dict[str, Any],
    burst: bool = False,
    logging_level: str = "INFO",
    worker_class: type[EngineWorker] = EngineWorker,
    job_class: type[Job] = Job,
) -> None:
    """Run `threads` workers named `name-1`... in this process until they all leave (see the module's signals)."""
    queue_names = list(queue_names)
    workers = []
    for number in range(1, threads + 1):
        # A connection pool per worker: a worker's blocking wait for a job holds its connection.
        pool = ConnectionPool(connection_class=connection_pool_class, **connection_pool_kwargs)
        workers.append(
            worker_class(
                queue_names, name=f"{name}-{number}", connection=connection_class(connection_pool=pool),
                job_class=job_class,
            )
        )  # fmt: skip
    running = [
        threading.Thread(
            target=worker.work,
            kwargs={"burst": burst, "logging_level": logging_level, "with_scheduler": number == 0},
            name=worker.name,
        )
        for number, worker in enumerate(workers)
    ]
    stop = ShutdownSignals(workers, running)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    logger.info("worker process {} runs {} workers: {}", os.getpid(), threads, ", ".join(w.name for w in workers))
    for thread in running:
        thread.start()
    while any(thread.is_alive() for thread in running):
        for thread in running:
            thread.join(1)  # timed, so the main thread also runs the signal handler when one arrives
        if stop.requested_at is None and not all(thread.is_alive() for thread in running):
            # RQ ends a worker on an error it cannot handle (Redis timing out, a bug): the process leaves
            # after the others' jobs, and the pool starts a full one in its place.
            logger.warning("worker process {}: a worker has stopped, so the others stop after their jobs", os.getpid())
            stop.warm_stop()
