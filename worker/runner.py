"""The RQ worker class the pool runs: a SimpleWorker tuned so no job is lost or run twice.

- A running job's heartbeat is renewed from a background thread every JOB_MONITORING_INTERVAL
  seconds, with a short grace, so a worker killed mid-job is noticed in seconds, not minutes.
- Registries are swept for abandoned jobs every MAINTENANCE_INTERVAL seconds (RQ's default is 10
  minutes); RQ then retries them (see `worker.jobs.on_failure`).
- Before taking a job the worker waits until the engine is healthy, so an engine outage leaves jobs
  queued instead of failing them one after another.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from loguru import logger
from rq.job import Job
from rq.queue import Queue
from rq.worker import SimpleWorker, WorkerStatus

from worker.jobs import engine_client, worker_settings

ENGINE_POLL_INTERVAL = 1.0  # seconds between engine health checks while it is down
ENGINE_CHECK_EVERY = 2.0  # seconds a healthy answer is trusted before asking again


class EngineWorker(SimpleWorker):
    def __init__(self, *args: Any, **kwargs: Any):
        settings = worker_settings()
        kwargs.setdefault("job_monitoring_interval", settings.job_monitoring_interval)
        kwargs.setdefault("maintenance_interval", settings.maintenance_interval)
        kwargs.setdefault("worker_ttl", settings.worker_ttl)
        super().__init__(*args, **kwargs)
        self.heartbeat_grace = settings.heartbeat_grace
        self._engine_ok_at = 0.0

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Keep a running job alive for one monitoring interval plus a short grace."""
        return self.job_monitoring_interval + self.heartbeat_grace

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this process while a thread keeps its heartbeat fresh."""
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        while not stop.wait(self.job_monitoring_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:  # a missed beat is retried next interval; the job goes on
                logger.warning("heartbeat for job {} failed: {!r}", job.id, exc)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """Wait for a healthy engine, then take the next job as RQ does."""
        self._wait_for_engine()
        if self._stop_requested:
            return None
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def _wait_for_engine(self) -> None:
        if time.monotonic() - self._engine_ok_at < ENGINE_CHECK_EVERY:
            return
        settings = worker_settings()
        waiting_since = None
        while not self._stop_requested:
            if engine_client().is_ready(settings.engine_health_path):
                if waiting_since is not None:
                    logger.info("engine is back after {:.0f} s; taking jobs again", time.monotonic() - waiting_since)
                self._engine_ok_at = time.monotonic()
                return
            if waiting_since is None:
                waiting_since = time.monotonic()
                logger.warning("engine at {} is not ready; waiting before taking jobs", settings.engine_url)
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            time.sleep(ENGINE_POLL_INTERVAL)
