"""The RQ worker class the pool runs: a SimpleWorker tuned so no job is lost or run twice.

- A running job's heartbeat is renewed from a background thread every JOB_MONITORING_INTERVAL
  seconds, with a short grace, so a worker killed mid-job is noticed in seconds, not minutes.
- Registries are swept for abandoned jobs every MAINTENANCE_INTERVAL seconds (RQ's default is 10
  minutes); RQ then retries them (see `worker.jobs.on_failure`).
- A worker waits until the engine is healthy before its first job, and whenever a job could not reach
  the engine (the pool shares that mark in Redis), so an outage leaves jobs queued instead of failing
  them one after another.
- Priorities: the worker takes from llm-high, llm-normal, llm-low in that order (RQ's default
  dequeue strategy), except that a lower queue whose oldest job has waited PRIORITY_AGING seconds
  goes first (ageing), so low is never starved for good.
- Taking a job moves it into its queue's intermediate list in the same step (`EngineQueue`), as RQ does
  for a worker of one queue: a worker killed before it marks the job started leaves it there, and RQ's
  sweep takes it up about a minute later. RQ's `BLPOP` over several queues would leave it nowhere. The
  same step reads the job, which RQ does in a round trip of its own.
- Redis lost mid-job for longer than the job's heartbeat lives: if the registry sweep has taken the job up
  by the time its worker can handle the failure, the worker leaves it to the sweep (`_finalize_failure`).
- Cancel: RQ's stop-job command reaches `kill_horse`, which cuts the engine stream; the job then
  ends in RQ's canceled registry with what it had generated (see `worker.jobs.on_failure`).
- Live text: a job publishes its text as it comes only while a client reads its events (`/stream`); the web
  says so with a mark the start transaction reads, or, once the job runs, with a command on RQ's pubsub channel
  (`handle_payload`).
- Threads: the pool runs several workers in threads of one process (worker/pool.py). A job's time limit
  is therefore kept by the engine client (`EngineDeadline`), not by RQ's SIGALRM, and a worker outside
  the main thread leaves signals to the process (`stop_after_job`).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from rq.callbacks import execute_failure_callback
from rq.command import handle_command, parse_payload
from rq.exceptions import AbandonedJobError, DequeueTimeout
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.rate_limit import release_slot
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.suspension import WORKERS_SUSPENDED
from rq.timeouts import BaseDeathPenalty
from rq.utils import backend_class, current_timestamp, now, utcparse
from rq.worker import SimpleWorker, WorkerStatus

from worker import contract, outcome
from worker.engine import EngineClient
from worker.exceptions import WorkerShutDown
from worker.jobs import (
    LISTENED,
    REDIS_UNREACHABLE,
    EngineJob,
    begin_attempt,
    engine_client,
    note_attempt,
    send_ahead,
    worker_settings,
)

ENGINE_POLL_INTERVAL = 1.0  # seconds between engine health checks while it is down
HEARTBEAT_MARGIN = 5.0  # seconds a worker's registration must outlive its next wait for a job
AGING_CHECK_EVERY = 1.0  # seconds the queue order chosen by ageing is kept before looking again
IDLE_WAIT = 1  # seconds an idle worker waits for a job at a time: a stop asked from another thread is seen after it
SUSPENSION_ANSWER_AGE = 1.0  # seconds an answer read at a job's end stands for the loop's suspension check
SWEEP_KEY = f"{contract.KEY_PREFIX}sweep"  # held by the worker sweeping the registries this interval
STARTED_HERE = "_started_here"
"""Attribute a job gets once this worker's start transaction for it has come back (`prepare_job_execution`)."""


class EngineDeadline(BaseDeathPenalty):
    """RQ's job time limit, kept by this thread's engine client: it stops reading the stream at the deadline.

    RQ's default raises the timeout from a SIGALRM handler, which only the main thread can set up. A job
    spends its time reading the engine's stream, so the client raises `TimeLimitExceeded` there (and closes
    the request, which the engine aborts). RQ also runs a job's callbacks under a limit; a limit set inside
    another is undone when it ends.
    """

    def setup_death_penalty(self) -> None:
        client = engine_client()
        self._outer = client.deadline
        if self._timeout > 0:
            client.deadline = time.monotonic() + self._timeout

    def cancel_death_penalty(self) -> None:
        engine_client().deadline = self._outer


TAKE_SCRIPT = """
for i = 2, #KEYS, 2 do
    local job_id = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT')
    if job_id then
        if ARGV[3] == '1' then
            redis.call('LPOP', KEYS[1])
        end
        local job = redis.call('HGETALL', ARGV[1] .. job_id)
        return {KEYS[i], job_id, job, redis.call('EXISTS', ARGV[2] .. job_id)}
    end
end
return false
"""
"""Move the first job of the first non-empty queue to its intermediate list, use up one wake entry, and read the job.

KEYS: the wake list, then each queue in order followed by its intermediate list. ARGV: the prefixes of the job
hashes and of the cancel keys, then '1' to pop a wake entry for the job taken, '0' when the worker's wait for
one (`BLPOP`) has already taken it: popping another would leave a job in the queue that no idle worker is woken
for, until one's wait ends (up to IDLE_WAIT).
Returns [queue key, job id, the job's hash as a flat list, whether its owner cancelled it (0 or 1)]: what RQ's
fetch after a take reads, and the cancel mark, without a round trip of their own.
"""


_thread_worker = threading.local()
"""`worker`: the EngineWorker waiting for a job in this thread, for `EngineQueue.dequeue_any`; None otherwise."""


class EngineQueue(Queue):
    """RQ's Queue whose `dequeue_any` moves the job it takes from any of several queues atomically, and reads it."""

    _take: Any = None

    @classmethod
    def dequeue_any(
        cls,
        queues: Any,
        timeout: int | None,
        connection: Any = None,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> Any:
        """Take the first job of the first non-empty queue with its data (TAKE_SCRIPT); when all are empty,
        wait up to `timeout` seconds for a wake entry (contract.WAKE_KEY) and look again.

        Returns (job, queue) as RQ's does; a job whose hash is gone is passed over, as RQ does. Returns None at
        once for a worker asked to stop: RQ's loop tries again and again while Redis is unreachable, and this
        ends it.

        Raises:
            DequeueTimeout: nothing came within `timeout` (RQ's worker loop then waits again).
        """
        worker = getattr(_thread_worker, "worker", None)
        if worker is not None and worker._stop_requested:
            return None
        if cls._take is None:
            cls._take = connection.register_script(TAKE_SCRIPT)
        keys = [contract.WAKE_KEY]
        for queue in queues:
            keys += [queue.key, queue.intermediate_queue_key]
        job_class = backend_class(cls, "job_class", override=job_class)
        args = [job_class.redis_job_namespace_prefix, contract.cancel_key(""), 1]
        while True:
            taken = cls._take(keys=keys, args=args, client=connection)
            if taken is None:
                if timeout is None:
                    return None
                if connection.blpop([contract.WAKE_KEY], timeout) is None:
                    raise DequeueTimeout(timeout, keys[1::2])
                args[2] = 0  # this worker has its wake entry
                continue
            queue_key, job_id, fields, cancelled = taken
            if not fields:
                continue  # deleted while it waited
            queue = cls.from_queue_key(
                queue_key.decode(), connection=connection, job_class=job_class, serializer=serializer,
                death_penalty_class=death_penalty_class,
            )  # fmt: skip
            job = job_class(job_id.decode(), connection=connection, serializer=serializer)
            try:
                job.restore(dict(zip(fields[::2], fields[1::2], strict=True)))
            except Exception as exc:  # what RQ's dequeue attaches, for its worker's report
                exc.job_id, exc.queue = job.id, queue
                raise
            job.cancel_requested = bool(cancelled)
            return job, queue


_taken = threading.local()


class TakenLineLater(logging.Filter):
    """Hold back RQ's log line for a job taken until the worker has sent the job's request (`release_taken_line`).

    RQ writes that line between taking a job and running it. A log record costs this process about 0.15 ms
    (for each of two sinks, a pickle and a write to the pool's parent, which writes the files), so an
    EngineWorker writes it once the engine is working on the job. Other workers' lines, and RQ's other lines,
    pass.
    """

    LINES = ("Worker %s: %s: %s (%s)", "Worker %s: %s: %s")  # with the job's description, and without

    def filter(self, record: logging.LogRecord) -> bool:
        # A record is held once: the one released below passes this filter on its way out.
        if getattr(_taken, "holding", False) and record.msg in self.LINES and not hasattr(record, "held"):
            release_taken_line()  # one not written yet, if the worker failed between taking a job and running it
            record.held = True
            _taken.record = record
            return False
        return True


def release_taken_line() -> None:
    """Write the line `TakenLineLater` held back in this thread, if any."""
    record, _taken.record = getattr(_taken, "record", None), None
    if record is not None:
        logging.getLogger(record.name).handle(record)


class EngineWorker(SimpleWorker):
    job_class = EngineJob
    queue_class = EngineQueue
    death_penalty_class = EngineDeadline
    # RQ's wait before it tries Redis again, doubling from 1 s (60 s at most in RQ): each try already waited out
    # REDIS_OUTAGE_WAIT in redis-py's retries (contract.redis_retry).
    max_connection_wait_time = 2.0

    def __init__(self, *args: Any, **kwargs: Any):
        contract.quicken_rq_serializer_check()
        settings = worker_settings()
        kwargs.setdefault("job_monitoring_interval", settings.job_monitoring_interval)
        kwargs.setdefault("maintenance_interval", settings.maintenance_interval)
        kwargs.setdefault("worker_ttl", settings.worker_ttl)
        super().__init__(*args, **kwargs)
        self.heartbeat_grace = settings.heartbeat_grace
        self._engine_seen = False
        self._engine_down = False
        self._start_pipeline: Any = None
        self._suspension_answer: tuple[float, int, int] | None = None  # (when, suspended, engine down)
        self._registered_until = 0.0  # monotonic time the worker's registration expires, as last renewed
        self.log_result_lifespan = False  # "result is kept for N seconds" for every job says nothing new
        self._ordered_at = 0.0
        self._priority_order = list(self._ordered_queues)
        self._engine: EngineClient | None = None  # the client of the thread running this worker's jobs
        self._running: Job | None = None  # the job `execute_job` runs, for the pubsub thread (`handle_payload`)
        if not any(isinstance(each, TakenLineLater) for each in self.log.filters):
            self.log.addFilter(TakenLineLater())

    def validate_queues(self) -> None:
        """Accept RQ's own Queue objects too (`rq worker`, tests): only `EngineQueue.dequeue_any` is needed."""
        for queue in self.queues:
            if not isinstance(queue, Queue):
                raise TypeError(f"{queue} is not a Queue")

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        """Start as RQ does, list the worker's queues for `rq info` and rq-dashboard (`contract.list_queues`), and ask
        Redis its version now: RQ otherwise asks when taking the first job."""
        super().bootstrap(*args, **kwargs)
        contract.list_queues(self.connection, self.queues)
        self.get_redis_server_version()

    def _install_signal_handlers(self) -> None:
        """Install RQ's SIGINT/SIGTERM handlers in the main thread; in another, the process calls `stop_after_job`."""
        if threading.current_thread() is threading.main_thread():
            super()._install_signal_handlers()

    def stop_after_job(self) -> None:
        """Warm shutdown asked from another thread: finish the running job, take no other, then leave.

        An idle worker leaves when its current wait for a job ends (IDLE_WAIT); a job it takes in that wait
        goes back to its queue (`execute_job`).
        """
        if not self._stop_requested:
            self.log.info("Worker %s: warm shut down requested", self.name)
        self._stop_requested = True

    def shut_down_now(self) -> None:
        """Cold shutdown asked from another thread: cut the running job's engine request and take no other job.

        The job then fails with WorkerShutDown and is queued again at once, as after RQ's own cold shutdown.
        """
        self._stop_requested = True
        if self._engine is not None:
            self._engine.interrupt(WorkerShutDown("the worker process was shut down"))

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """Renew the worker's registration when it would not outlive the next wait for a job, or when RQ sets a TTL.

        RQ renews it before and after every wait and after every job, three separate writes each time;
        here a plain renewal is skipped while the registration still has longer to live than a wait
        for a job (`dequeue_timeout`) plus HEARTBEAT_MARGIN, and otherwise sent in one round trip.
        Renewals with a timeout or inside a pipeline (job start, the running job's heartbeat) go through.
        """
        if pipeline is None and timeout is None:
            registered_for = self._registered_until - time.monotonic()
            if self._stop_requested or registered_for > self.dequeue_timeout + HEARTBEAT_MARGIN:
                return None  # a worker on its way out deregisters in `teardown`
            with self.connection.pipeline(transaction=False) as pipe:
                super().heartbeat(timeout, pipe)
                pipe.execute()
        else:
            super().heartbeat(timeout, pipeline)
        self._registered_until = time.monotonic() + (timeout or self.worker_ttl + 60)
        return None

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """Write the worker's state unless it already has it (RQ sets "idle" twice between jobs)."""
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        """Ask once per loop whether workers are suspended and the engine is marked down.

        A job that has just succeeded asked in its end transaction (`handle_job_success`); otherwise it is
        one round trip. RQ renews the registration in the same pipeline; `heartbeat` does that on its own
        schedule here.
        """
        answer, self._suspension_answer = self._suspension_answer, None
        if answer is None or time.monotonic() - answer[0] > SUSPENSION_ANSWER_AGE:
            with self.connection.pipeline(transaction=False) as pipe:
                self._ask_suspension(pipe)
                answer = (time.monotonic(), *pipe.execute())
        _, suspended, self._engine_down = answer
        if suspended:
            super().check_for_suspension(burst)  # RQ's wait until `rq resume`

    @staticmethod
    def _ask_suspension(pipe: Any) -> None:
        """Queue on `pipe` the two reads `check_for_suspension` needs (two replies)."""
        pipe.exists(WORKERS_SUSPENDED)
        pipe.exists(contract.ENGINE_DOWN_KEY)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Keep a running job alive for one monitoring interval plus a short grace."""
        return self.job_monitoring_interval + self.heartbeat_grace

    def execute_job(self, job: Job, queue: Queue) -> None:
        """Run the job in this worker's thread while another keeps its heartbeat fresh.

        A generation's request goes to the engine first (`worker.jobs.send_ahead`): the engine works on it
        during RQ's start transaction. A job taken in the wait that a shutdown from another thread ended
        goes back to the front of its queue instead.
        """
        if self._stop_requested:
            release_taken_line()
            with self.connection.pipeline() as pipe:
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)  # where `EngineQueue` moved it
                queue.push_job_id(job.id, pipeline=pipe, at_front=True)
                pipe.execute()
            self.log.info("Worker %s: stopping; job %s goes back to the front of %s", self.name, job.id, queue.name)
            return
        self._engine, self._running = engine_client(), job
        if job.func_name == contract.TASK_PATH:
            send_ahead(job)
        release_taken_line()
        try:
            execution = self.prepare_execution(job)
            stop = threading.Event()
            beat = threading.Thread(target=self._beat, args=(job, execution, stop), daemon=True)
            beat.start()
            try:
                self.perform_job(job, queue, execution)
            finally:
                stop.set()
                beat.join()
        finally:
            self._engine.discard()  # a request sent ahead for a job that never read it
            self._running = None
        self.set_state(WorkerStatus.IDLE)

    def prepare_execution(self, job: Job) -> Execution:
        """Create the job's execution record in the pipeline `prepare_job_execution` sends (RQ sends two).

        A generation's attempt begins in the same transaction (`worker.jobs.begin_attempt`), first, so its
        cancel check is the transaction's first reply.
        """
        pipeline = self._start_pipeline = self.connection.pipeline()
        if job.func_name == contract.TASK_PATH:
            begin_attempt(job, pipeline)
        execution = Execution.create(job, self.get_heartbeat_ttl(job), pipeline=pipeline, worker_name=self.name)
        self.executions[execution.id] = execution
        self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
        return execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        """RQ's bookkeeping before a job runs (heartbeats, status started, out of the intermediate list), sent with
        the execution record."""
        attempt_begun = self._start_pipeline is not None and job.func_name == contract.TASK_PATH
        pipeline, self._start_pipeline = self._start_pipeline or self.connection.pipeline(), None
        with pipeline:
            ttl = self.get_heartbeat_ttl(job)
            self.heartbeat(ttl, pipeline=pipeline)
            job.heartbeat(now(), ttl, pipeline=pipeline)
            job.prepare_for_execution(self.name, pipeline=pipeline)
            pipeline.persist(job.key)
            # Always: `EngineQueue` takes every job through the intermediate list, not only from one queue.
            pipeline.lrem(Queue(job.origin, connection=self.connection).intermediate_queue_key, 1, job.id)
            replies = pipeline.execute()
        setattr(job, STARTED_HERE, True)
        if attempt_begun:
            note_attempt(job, replies)

    def cleanup_execution(self, job: Job, pipeline: Any, execution: Execution | None = None) -> None:
        """RQ's cleanup of the execution record, with the worker's state back to idle in the same transaction."""
        super().cleanup_execution(job, pipeline, execution)
        self.set_state(WorkerStatus.IDLE, pipeline=pipeline)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: Any, execution: Execution) -> None:
        """File a finished job as RQ does, in one transaction and without RQ's look for dependent jobs.

        RQ first watches the job's dependents and reads them (two round trips per job) to enqueue the
        jobs that waited on this one; the service never makes jobs that depend on others, nor repeating
        jobs. The rest is RQ's body: counters, result, expiry, execution record, then the fair-share slot.
        The transaction also reads what the worker loop checks before its next job (`check_for_suspension`).
        """
        with self.connection.pipeline() as pipeline:
            self.increment_successful_job_count(pipeline=pipeline)
            self.increment_total_working_time(job.ended_at - job.started_at, pipeline)
            result_ttl = job.get_result_ttl(self.default_result_ttl)
            if result_ttl != 0:
                job._handle_success(
                    result_ttl,
                    pipeline=pipeline,
                    worker_name=self.name,
                    execution_id=execution.id,
                    execution_started_at=execution.created_at,
                    execution_ended_at=job.ended_at,
                )
            job.cleanup(result_ttl, pipeline=pipeline, remove_from_queue=False)
            job._status = JobStatus.FINISHED
            self.cleanup_execution(job, pipeline=pipeline, execution=execution)
            self._ask_suspension(pipeline)  # for the loop's next `check_for_suspension`
            *_, suspended, engine_down = pipeline.execute()
        self._suspension_answer = (time.monotonic(), suspended, engine_down)
        self._release_slot(job)

    def _release_slot(self, job: Job) -> None:
        """Release the job's fair-share slot as RQ does, and wake a worker for each job it let into a queue."""
        promoted = release_slot(job)
        if promoted:
            with self.connection.pipeline(transaction=False) as pipe:
                contract.wake_workers(pipe, len(promoted))
                pipe.execute()

    def _release_slot_safely(self, job: Job) -> None:
        """RQ's release after a failure or a cancel, with `_release_slot`'s wake entries."""
        try:
            self._release_slot(job)
        except Exception:
            self.log.exception("Worker %s: failed to release rate limit slot of job %s", self.name, job.id)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        """Note the end time. RQ also renews the job's heartbeat here; the heartbeat thread does until it is filed."""
        job.ended_at = now()

    def _beat(self, job: Job, execution: Any, stop: threading.Event) -> None:
        while not stop.wait(self.job_monitoring_interval):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:  # a missed beat is retried next interval; the job goes on
                logger.warning("heartbeat for job {} failed: {!r}", job.id, exc)

    def dequeue_job_and_maintain_ttl(self, timeout: int | None, max_idle_time: int | None = None):
        """Wait for a healthy engine, then take the next job as RQ does, aged queues first.

        RQ waits for a job until one comes; here each wait lasts IDLE_WAIT at most (one `BLPOP` a second
        while idle), so that a worker asked to stop from another thread (`stop_after_job`) leaves, and the
        queues' order is checked again, after it. Returns None (the worker leaves) when asked to stop, or when
        a burst or `max_idle_time` wait ends empty.
        """
        wait = None if timeout is None else min(timeout, IDLE_WAIT)
        while True:
            self._wait_for_engine()
            if self._stop_requested:
                return None
            self._order_queues()
            _taken.holding = True  # RQ's line for the job it takes waits for `execute_job`
            _thread_worker.worker = self
            try:
                result = super().dequeue_job_and_maintain_ttl(wait, max_idle_time or wait)
            finally:
                _taken.holding = False
                _thread_worker.worker = None
            if result is not None or timeout is None or max_idle_time is not None:
                return result

    def teardown(self) -> None:
        """Deregister as RQ does; with Redis unreachable, say so in one line instead of ending the thread on it."""
        try:
            super().teardown()
        except REDIS_UNREACHABLE as exc:
            self.log.warning("Worker %s: leaving without deregistering, Redis is unreachable (%s)", self.name, exc)

    def _order_queues(self) -> None:
        """Put lower-priority queues whose oldest job waited PRIORITY_AGING seconds first, else keep priority order."""
        aging = worker_settings().priority_aging
        if not aging or time.monotonic() - self._ordered_at < AGING_CHECK_EVERY:
            return
        self._ordered_at = time.monotonic()
        lower = self._priority_order[1:]
        with self.connection.pipeline(transaction=False) as pipe:
            for queue in lower:
                pipe.lindex(queue.key, 0)
            heads = pipe.execute()
        waiting = [(queue, head) for queue, head in zip(lower, heads, strict=True) if head]
        with self.connection.pipeline(transaction=False) as pipe:
            for _, head in waiting:
                pipe.hget(Job.key_for(head.decode()), "enqueued_at")
            enqueued = pipe.execute()
        current = datetime.now(UTC)
        aged = [
            queue
            for (queue, _), at in zip(waiting, enqueued, strict=True)
            if at and (current - utcparse(at.decode())).total_seconds() >= aging
        ]
        self._ordered_queues = aged + [queue for queue in self._priority_order if queue not in aged]

    def handle_payload(self, message: dict[str, Any]) -> None:
        """RQ's worker commands, and the web's word that a client now reads the running job's events live
        (contract.LISTEN_COMMAND): the job then publishes its text as it comes (`worker.jobs.TokenPublisher`).

        RQ calls this from the worker's pubsub thread.
        """
        self.log.debug("Worker %s: received message: %s", self.name, message)
        payload = parse_payload(message)
        if payload.get("command") != contract.LISTEN_COMMAND:
            handle_command(self, payload)
            return
        job = self._running
        if job is not None and job.id == payload.get("job_id"):
            setattr(job, LISTENED, True)

    def kill_horse(self, sig: Any = None) -> None:
        """Cut the running job's engine stream when RQ's stop-job command asks to stop it (a cancel).

        RQ calls this from the worker's pubsub thread; the job itself runs in the worker's thread.
        """
        if self._stopped_job_id is not None and self._engine is not None:
            self._engine.interrupt()

    def _finalize_failure(self, job: Job, queue: Queue, execution: Execution, exc_info: Any) -> None:
        """RQ's handling of a failed attempt, unless the attempt failed because Redis was lost and the registry sweep
        has taken the job up meanwhile (Redis was away longer than the job's heartbeat lives): the sweep has
        then run its failure callback and queued it again, and handling it here too would queue it twice."""
        exc_type = exc_info[0]
        if exc_type is not None and issubclass(exc_type, REDIS_UNREACHABLE) and self._swept(job, queue, execution):
            self.log.warning(
                "Worker %s: job %s was taken up by the registry sweep while this worker had lost Redis; leaving it",
                self.name, job.id,
            )  # fmt: skip
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()
            return
        super()._finalize_failure(job, queue, execution, exc_info)

    def _swept(self, job: Job, queue: Queue, execution: Execution) -> bool:
        """Tell whether the sweep has taken up this attempt, which started: its execution is no longer in the started
        registry (the sweep removes it with the retry, in one transaction). False for an attempt whose start
        transaction did not come back, and while Redis is still unreachable: RQ's handling follows then."""
        if not getattr(job, STARTED_HERE, False):
            return False
        try:
            return self.connection.zscore(queue.started_job_registry.key, execution.composite_key) is None
        except REDIS_UNREACHABLE:
            return False

    def handle_job_failure(self, job: Job, queue: Queue, started_job_registry=None, exc_string="", execution=None):
        """File a cancelled job under RQ's canceled registry, keeping what it generated; others as RQ does.

        Only RQ's sweep of the intermediate lists fails a job here without an execution: a job taken by a
        worker that died before starting it. It goes through the failure callback first, as RQ's sweep of
        abandoned jobs does, so it is retried as `worker_died`, or ends with that error type and its final event.
        """
        if execution is None:
            # Its attempt ended before the start transaction, which counts attempts (`begin_attempt`); RQ counts
            # it as a try all the same (its retries left go down by one).
            job.meta[contract.META_ATTEMPT] = job.meta.get(contract.META_ATTEMPT, 0) + 1
            died = AbandonedJobError(exc_string)
            try:
                execute_failure_callback(job, self.death_penalty_class, AbandonedJobError, died, None)
            except Exception:
                logger.exception("failure callback of job {}, found stuck in an intermediate list, raised", job.id)
        if contract.META_PARTIAL not in job.meta:
            return super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        self._stopped_job_id = None
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            pipe.execute()
        outcome.file_as_cancelled(job, worker_settings().result_ttl)
        return None

    @property
    def should_run_maintenance_tasks(self) -> bool:
        """As RQ decides, but never for a worker asked to stop: with Redis unreachable RQ's loop would try the sweep
        again and again instead of letting the worker leave."""
        return not self._stop_requested and super().should_run_maintenance_tasks

    def clean_registries(self) -> None:
        """Sweep the registries once per MAINTENANCE_INTERVAL for the whole pool, not once per worker.

        RQ has every worker sweep; with 64 workers and a 5 s interval that is 13 sweeps a second. The
        worker that takes the lock sweeps (RQ's sweep, then canceled entries older than RESULT_TTL,
        which RQ never drops); the others count the interval as done.
        """
        if not self.connection.set(SWEEP_KEY, self.name, nx=True, ex=max(self.maintenance_interval, 1)):
            self.last_cleaned_at = now()
            return
        for queue in self.queues:
            # Abandoned jobs first: RQ's sweep would run their failure callback under SIGALRM, which a
            # worker thread cannot set up; so it finds none left.
            StartedJobRegistry(
                queue.name, connection=self.connection, job_class=self.job_class, serializer=self.serializer,
                death_penalty_class=self.death_penalty_class,
            ).cleanup(exception_handlers=self._exc_handlers)  # fmt: skip
        super().clean_registries()
        horizon = current_timestamp() - worker_settings().result_ttl
        for queue in self.queues:
            registry = CanceledJobRegistry(queue.name, connection=self.connection)
            self.connection.zremrangebyscore(registry.key, "-inf", horizon)

    def _wait_for_engine(self) -> None:
        """Before taking a job, wait for the engine if it is known to be down or this worker has not seen it up.

        The engine is marked down (in Redis, for the whole pool) when a job cannot reach it; the first
        worker to get a 200 from its health endpoint clears the mark. While it is up, taking a job costs
        no health request: under load the engine's API server can take seconds to answer one, and
        workers waiting on it would leave jobs sitting in the queue.
        """
        if self._engine_seen and not self._engine_down:
            return
        settings = worker_settings()
        waiting_since = None
        # A worker that has not seen the engine yet is starting with it (`make run` starts both): no warning then.
        level, ready = ("WARNING", "is back") if self._engine_seen else ("INFO", "is ready")
        while not self._stop_requested:
            if engine_client().is_ready(settings.engine_health_path):
                if waiting_since is not None:
                    logger.info("engine {} after {:.0f} s; taking jobs", ready, time.monotonic() - waiting_since)
                self._engine_seen, self._engine_down = True, False
                self.connection.delete(contract.ENGINE_DOWN_KEY)
                return
            if waiting_since is None:
                waiting_since = time.monotonic()
                logger.log(level, "engine at {} is not ready; waiting before taking jobs", settings.engine_url)
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            time.sleep(ENGINE_POLL_INTERVAL)
