"""Submitting jobs to RQ, describing them to their owners, cancelling them; the routes stay thin.

Queue layout (all RQ): one queue per priority (llm-high, llm-normal, llm-low), taken in that order
by the workers, with ageing (worker/runner.py). Fair share between API keys is RQ's own
`RateLimit(owner:priority, FAIR_SHARE_SLOTS)`: at most that many jobs of one key and priority are in the
queues or running; the others wait as `rate_limited` (reported as queued) and RQ lets the oldest in as
one finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis.exceptions
from flask import current_app
from redis import Redis
from redis.client import Pipeline
from rq import Callback, Queue, Retry
from rq.command import send_command, send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.rate_limit import ACQUIRE_AND_ENQUEUE_SCRIPT, RateLimit, RateLimitRegistry
from rq.registry import StartedJobRegistry
from rq.worker_registration import WORKERS_BY_QUEUE_KEY

from web import limits
from web.errors import (
    AlreadyFinished,
    IdempotencyConflict,
    IdempotencyInProgress,
    QueueFull,
    SubmitNotAnswered,
    TaskNotFound,
)
from worker import contract, outcome

_TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
CANCEL_WAIT = 3.0
"""Seconds DELETE waits for a running job's worker to close the engine stream and file it as cancelled."""
STALE_RESERVATION = 10.0
"""Seconds after which an Idempotency-Key whose task no longer exists counts as free again."""
KEEPALIVE = 15
"""Seconds between SSE keep-alive comments while a task's stream has no new event."""


def redis_connection() -> Redis:
    return current_app.extensions["redis"]


def queue_lengths(connection: Redis) -> list[int]:
    """Jobs waiting in each queue, in priority order, read in one round trip."""
    with connection.pipeline(transaction=False) as pipe:
        _ask_queue_lengths(pipe, connection)
        return pipe.execute()


def _ask_queue_lengths(pipe: Pipeline, connection: Redis) -> None:
    """Queue on `pipe` the length of each queue, in priority order."""
    for name in contract.QUEUES:
        pipe.llen(Queue(name, connection=connection).key)


def queued_jobs(connection: Redis) -> int:
    """Count the jobs waiting in every queue."""
    return sum(queue_lengths(connection))


ENGINE_WORKERS_KEY = WORKERS_BY_QUEUE_KEY % contract.QUEUE_NORMAL
"""RQ's set of the workers listening on llm-normal: every engine worker does, webhook workers do not."""


def engine_workers(connection: Redis) -> int:
    """Count the registered engine workers."""
    return connection.scard(ENGINE_WORKERS_KEY)


def job_lifetime() -> int:
    """Seconds a job can live at most: waiting, every attempt, then its result (bounds the side keys' TTL)."""
    config = current_app.config
    attempts = config["JOB_RETRIES"] + 1
    return config["QUEUE_TTL"] + attempts * (config["TASK_TIME_LIMIT"] + 30) + config["RESULT_TTL"]


_last_ms = 0
_sequence = 0


def new_task_id() -> str:
    """Return a UUIDv7 (RFC 9562): ids sort by submit time, to the millisecond and in order within this process.

    RQ orders a key's jobs waiting for a fair-share slot by whole seconds, then by id, so time-ordered
    ids keep that wait first come, first served.
    """
    global _last_ms, _sequence
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        ms, _sequence = _last_ms, _sequence + 1
        if _sequence > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one
            ms, _sequence = ms + 1, 0
    else:
        _sequence = 0
    _last_ms = ms
    tail = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (_sequence << 64) | (0b10 << 62) | tail))


def submit(requests: list[dict[str, Any]], owner: str, task_ids: list[str] | None = None) -> list[str]:
    """Enqueue one job per request, owned by `owner`; return their task ids in order.

    Raises:
        RateLimited: the key has used its RATE_LIMIT_PER_MINUTE submits (a batch counts each request).
        QueueFull: the requests would take the waiting jobs past MAX_QUEUED_JOBS. Submits running at
            the same moment in other gunicorn workers may each pass the check, so the cap can be
            passed by at most that many.
        SubmitNotAnswered: Redis did not answer the transaction that queues them in time (it may still run it).
    """
    config = current_app.config
    connection = redis_connection()
    cap = config["MAX_QUEUED_JOBS"]
    lengths, admission_loaded = _read_before_submit(connection, owner, len(requests), config["RATE_LIMIT_PER_MINUTE"])
    if cap > 0 and sum(lengths) + len(requests) > cap:
        raise QueueFull(f"{cap} jobs are already waiting; try again later")
    task_ids = task_ids or [new_task_id() for _ in requests]
    with connection.pipeline() as pipe:  # one transaction for every job of the submit and its `queued` event
        pipe.multi()  # explicitly, as RQ's enqueue expects of a pipeline it is given
        for request, task_id in zip(requests, task_ids, strict=True):
            name = contract.PRIORITY_QUEUES[request.get("priority", contract.DEFAULT_PRIORITY)]
            own = contract.QUEUES.index(name)
            queue = Queue(name, connection=connection)
            _enqueue(pipe, queue, dict(request), owner, task_id, ahead=sum(lengths[: own + 1]))
            lengths[own] += 1
        contract.wake_workers(pipe, len(requests))
        if admission_loaded:
            # redis-py would ask again (SCRIPT EXISTS) before sending the transaction: one round trip more.
            pipe.scripts = {script for script in pipe.scripts if script.sha != ADMISSION_SHA}
        try:
            pipe.execute()
        except redis.exceptions.TimeoutError as exc:  # Redis holds the transaction, and may still run it
            raise SubmitNotAnswered(task_ids) from exc
    return task_ids


ADMISSION_SHA = hashlib.sha1(ACQUIRE_AND_ENQUEUE_SCRIPT.encode()).hexdigest()
"""RQ's fair-share admission script, which the submit transaction runs by its hash (EVALSHA)."""


def _read_before_submit(connection: Redis, owner: str, cost: int, rate: int) -> tuple[list[int], bool]:
    """Count the submit against `owner`'s rate limit (`rate` per minute, 0: off) and return the queue lengths
    (for the cap, and each job's position in its `queued` event) and whether Redis has RQ's admission
    script, all in one round trip.

    Raises:
        RateLimited: the submit would take `owner` past `rate`.
    """
    with connection.pipeline(transaction=False) as pipe:
        if rate > 0:
            limits.ask_count(pipe, owner, cost)
        _ask_queue_lengths(pipe, connection)
        pipe.script_exists(ADMISSION_SHA)
        replies = pipe.execute()
    if rate > 0:
        limits.check_count(replies[: limits.COUNT_REPLIES], connection, owner, cost, rate)
        replies = replies[limits.COUNT_REPLIES :]
    *lengths, (loaded,) = replies
    return lengths, loaded


def _enqueue(pipe: Pipeline, queue: Queue, request: dict[str, Any], owner: str, task_id: str, ahead: int) -> None:
    """Queue on `pipe` one job's `queued` event, then RQ's writes of the job (`ahead`: jobs queued before it).

    The event goes first: once the job is in a queue, a worker may publish `started` at once.
    A job held back by the fair share waits longer than `ahead` says; `/status` has its live position.
    """
    config = current_app.config
    priority = request.pop("priority", contract.DEFAULT_PRIORITY)
    callback_url = request.pop("callback_url", None)
    meta = {
        contract.META_OWNER: owner,
        contract.META_MAX_ATTEMPTS: config["JOB_RETRIES"] + 1,
        contract.META_PRIORITY: priority,
    }
    if callback_url:
        meta[contract.META_CALLBACK_URL] = callback_url
    slots = config["FAIR_SHARE_SLOTS"]
    # Slots per key and priority: a key's high job is not held behind its own earlier low ones.
    rate_limit = RateLimit(f"{owner}:{priority}", slots) if slots > 0 else None
    job = queue.create_job(
        contract.TASK_PATH,
        args=(request,),
        job_id=task_id,
        timeout=config["TASK_TIME_LIMIT"],
        result_ttl=config["RESULT_TTL"],
        failure_ttl=config["RESULT_TTL"],
        meta=meta,
        retry=Retry(max=config["JOB_RETRIES"]) if config["JOB_RETRIES"] > 0 else None,
        on_success=Callback(contract.ON_SUCCESS_PATH),
        on_failure=Callback(contract.ON_FAILURE_PATH),
        description=f"generate max_tokens={request['max_tokens']} priority={priority}",
        rate_limit=rate_limit,
    )
    _publish_queued(pipe, task_id, ahead)
    if rate_limit is None:
        queue.enqueue_job(job, pipeline=pipe)
        return
    # RQ's public enqueue refuses a pipeline for a rate-limited job (so a caller cannot save the job over
    # the status the enqueue sets); its own rate-limited enqueue takes one. In the transaction: the job,
    # its place among the key's waiting jobs, and RQ's script that lets it into the queue if a slot is free.
    pipe.sadd(queue.redis_queues_keys, queue.key)
    queue._enqueue_rate_limited_job(job, pipeline=pipe)


def _publish_queued(pipe: Pipeline, task_id: str, ahead: int) -> None:
    outcome.publish(pipe, task_id, contract.EVENT_QUEUED, {"position": ahead})
    pipe.expire(contract.events_key(task_id), job_lifetime())


def fingerprint(body: Any) -> str:
    """Hash a validated request body; equal bodies (defaults filled in) give equal fingerprints."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def reserve_idempotency_key(owner: str, key: str, body_fingerprint: str, count: int) -> tuple[list[str], bool]:
    """Claim `key` for this body and return (task ids to use, True); or (earlier task ids, False) on a retry.

    The claim is kept as long as the jobs' results; a claim whose jobs no longer exist is free again.

    Raises:
        IdempotencyConflict: the key was used with a different body.
        IdempotencyInProgress: the key's first request has not queued its tasks (yet), and claimed the key less
            than STALE_RESERVATION seconds ago.
    """
    connection = redis_connection()
    name = _idempotency_claim(owner, key)
    task_ids = [new_task_id() for _ in range(count)]
    claim = json.dumps({"fingerprint": body_fingerprint, "task_ids": task_ids, "at": time.time()})
    if connection.set(name, claim, nx=True, ex=job_lifetime()):
        return task_ids, True
    earlier = json.loads(connection.get(name) or "null")
    if earlier is None:  # expired in between
        return reserve_idempotency_key(owner, key, body_fingerprint, count)
    if earlier["fingerprint"] != body_fingerprint:
        raise IdempotencyConflict("this Idempotency-Key was already used with a different request body")
    if not Job.exists(earlier["task_ids"][0], connection=connection):  # a submit queues all its tasks or none
        if time.time() - earlier["at"] <= STALE_RESERVATION:
            raise IdempotencyInProgress(
                "the first request with this Idempotency-Key has not queued its task yet; retry in a moment"
            )
        connection.delete(name)  # its request failed without freeing the claim
        return reserve_idempotency_key(owner, key, body_fingerprint, count)
    return earlier["task_ids"], False


def release_idempotency_key(owner: str, key: str) -> None:
    """Free a claim whose jobs could not be enqueued, so the client's retry enqueues them."""
    redis_connection().delete(_idempotency_claim(owner, key))


def _idempotency_claim(owner: str, key: str) -> str:
    """Redis key of the claim on `key` by API key `owner` (the header's value is hashed, not stored)."""
    return f"{contract.KEY_PREFIX}idempotency:{owner}:{hashlib.sha256(key.encode()).hexdigest()}"


def find(task_id: str, owner: str) -> Job:
    """Fetch the caller's job; unknown ids and other keys' jobs both raise TaskNotFound."""
    if not _TASK_ID.match(task_id):
        raise TaskNotFound(f"no task {task_id}")
    try:
        job = Job.fetch(task_id, connection=redis_connection())
    except NoSuchJobError:
        raise TaskNotFound(f"no task {task_id}") from None
    if job.meta.get(contract.META_OWNER) != owner:
        raise TaskNotFound(f"no task {task_id}")
    return job


def wait_until_finished(job: Job, seconds: int) -> tuple[Job, dict[str, Any] | None]:
    """Block until the job's final event is published or `seconds` pass.

    Returns the job, and the final event's body if the job finished while waiting; if it did not, the
    job is read again. It waits on the job's one-entry "finished" stream, so token events do not wake it,
    and the read of the final event is sent with the wait, so Redis answers both in one round trip.
    """
    if contract.public_status(job.get_status(refresh=False)) not in contract.UNFINISHED_STATUSES:
        return job, None
    with current_app.extensions["redis_blocking"].pipeline(transaction=False) as pipe:
        pipe.xread({contract.finished_key(job.id): "0"}, count=1, block=seconds * 1000)
        pipe.xrevrange(contract.events_key(job.id), count=1)
        finished, last = pipe.execute()
    final = _final_of(last) if finished else None
    if final is None:
        job.refresh()
    return job, final


def result_of(job: Job, final: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe the job: result and metrics, error, partial text, or its status and place in the queue.

    `final` is the job's final event body when the caller has it. The worker publishes a job's final
    event a moment before RQ stores its outcome; in that moment the final event's body is the answer,
    so a client that saw `completed` on the stream never reads `processing` here.
    """
    described = final or outcome.describe(job)
    if described["status"] in contract.UNFINISHED_STATUSES:
        described = _final_of(redis_connection().xrevrange(contract.events_key(job.id), count=1)) or described
    return _with_extras(job, described)


status_of = result_of
"""`/status` answers like `/result`: the result is small, and the seed's clients ignore extra fields."""


def _final_of(entries: list[Any]) -> dict[str, Any] | None:
    """The body of the job's final event, given the last entry of its event stream; None if it has not ended."""
    if entries and entries[0][1][b"event"].decode() in contract.FINAL_EVENTS:
        return json.loads(entries[0][1][b"data"])
    return None


def _with_extras(job: Job, described: dict[str, Any]) -> dict[str, Any]:
    connection = redis_connection()
    if described["status"] == contract.STATUS_QUEUED:
        position = queue_position(connection, job)
        described["queue_position"] = position
        described["estimated_start_seconds"] = estimated_start(connection, position)
    if job.meta.get(contract.META_CALLBACK_URL):
        webhook = outcome.webhook_state(connection, job.id)
        if webhook:
            described["webhook"] = webhook
    return described


def queue_position(connection: Redis, job: Job) -> int | None:
    """Jobs that start before this one: the higher queues, then those ahead in its own queue.

    A job held back by its key's fair share also waits behind its own key's earlier held-back jobs.
    None for a job waiting on a retry backoff (RQ's scheduler puts it back in the queue later).
    """
    status = job.get_status(refresh=False)
    if job.origin not in contract.QUEUES or status not in (JobStatus.QUEUED, JobStatus.RATE_LIMITED):
        return None
    own = contract.QUEUES.index(job.origin)
    with connection.pipeline(transaction=False) as pipe:
        for name in contract.QUEUES[:own]:
            pipe.llen(Queue(name, connection=connection).key)
        if status == JobStatus.QUEUED:
            pipe.lpos(Queue(job.origin, connection=connection).key, job.id)
        else:
            pipe.llen(Queue(job.origin, connection=connection).key)
            pipe.zrank(RateLimitRegistry(job.rate_limit_key, connection=connection).rate_limited_key, job.id)
        counts = pipe.execute()
    return sum(count or 0 for count in counts)


def estimated_start(connection: Redis, position: int | None) -> float | None:
    """Seconds until a job with `position` jobs ahead should start, from recent throughput.

    Throughput = engine workers / mean processing time of the last RECENT_JOBS completed jobs; the
    estimate is (jobs ahead + 1 - free workers) / throughput. None without workers or history.
    """
    if position is None:
        return None
    with connection.pipeline(transaction=False) as pipe:
        pipe.lrange(contract.RECENT_PROCESSING_KEY, 0, -1)
        pipe.scard(ENGINE_WORKERS_KEY)
        for name in contract.QUEUES:
            pipe.zcard(StartedJobRegistry(name, connection=connection).key)
        recent, workers, *running = pipe.execute()
    if not recent or not workers:
        return None
    mean = sum(float(seconds) for seconds in recent) / len(recent)
    free = max(workers - sum(running), 0)
    return round(max(position + 1 - free, 0) * mean / workers, 1)


def cancel(job: Job) -> tuple[dict[str, Any], int]:
    """Cancel the caller's job: 200 with the final body once cancelled, 202 if its worker has not yet confirmed.

    A queued job leaves the queue at once; a running one is stopped through RQ's stop-job command
    (its worker cuts the engine stream and keeps the partial text).

    Raises:
        AlreadyFinished: the job has already completed, failed or been cancelled.
    """
    connection = redis_connection()
    status = contract.public_status(job.get_status())
    if status not in contract.UNFINISHED_STATUSES:
        raise AlreadyFinished(f"task {job.id} is already {status}; there is nothing to cancel")
    connection.set(contract.cancel_key(job.id), 1, ex=job_lifetime())
    started_before = job.started_at
    if job.get_status(refresh=False) == JobStatus.STARTED:
        _stop_running(connection, job)
    else:
        job.ended_at = datetime.now(UTC)  # not an earlier attempt's end, if it waits for a retry
        outcome.file_as_cancelled(job, current_app.config["RESULT_TTL"])
        job.refresh()
        if job.started_at != started_before:  # a worker started it meanwhile: stop that run too
            _stop_running(connection, job)
        else:
            body = outcome.describe(job, status=contract.STATUS_CANCELLED)
            if outcome.finish(connection, job, body):
                outcome.log_finished(job, body)
    job.refresh()
    described = result_of(job)
    return described, 200 if described["status"] == contract.STATUS_CANCELLED else 202


def _stop_running(connection: Redis, job: Job) -> None:
    """Ask the job's worker to stop it, then wait up to CANCEL_WAIT seconds for it to be filed as cancelled."""
    try:
        send_stop_job_command(connection, job.id)
    except (InvalidJobOperation, NoSuchJobError):
        return  # no longer running: it ended, or its worker checks the cancel flag before starting
    deadline = time.monotonic() + CANCEL_WAIT
    while time.monotonic() < deadline and job.get_status() == JobStatus.STARTED:
        time.sleep(0.05)


def listen(job: Job) -> None:
    """Have the job publish its text as it comes, for a client that reads its events live: a worker publishes a
    job's text only then (with its final event otherwise).

    The mark and the read of the job's worker go in one transaction, as the worker's start transaction names
    the worker and reads the mark: a worker that starts the job after this sees the mark, and one that started
    it before is told at once (contract.LISTEN_COMMAND), then publishes what it holds with the next token.
    """
    if contract.public_status(job.get_status(refresh=False)) not in contract.UNFINISHED_STATUSES:
        return  # its events are all there
    connection = redis_connection()
    with connection.pipeline() as pipe:
        pipe.set(contract.listen_key(job.id), 1, ex=job_lifetime())
        pipe.hmget(job.key, "status", "worker_name")
        _, (status, worker_name) = pipe.execute()
    if status == JobStatus.STARTED.encode() and worker_name:
        send_command(connection, worker_name.decode(), contract.LISTEN_COMMAND, job_id=job.id)


def last_event_id(value: str | None) -> str | None:
    """Return a valid stream event id (or "0" for none), or None if `value` is not one."""
    if not value:
        return "0"
    return value if _EVENT_ID.match(value) else None


def events(task_id: str, after: str) -> Iterator[str]:
    """Yield the job's events after event id `after` as Server-Sent Events, until its final event.

    Events come from the job's Redis stream, so any web process can serve them, a reconnecting
    client resumes where it left off, and a finished job replays from the start.
    """
    blocking = current_app.extensions["redis_blocking"]
    key = contract.events_key(task_id)
    while True:
        entries = blocking.xread({key: after}, count=100, block=KEEPALIVE * 1000)
        if not entries:
            if not blocking.exists(key):
                return  # the job and its events expired
            yield ": keep-alive\n\n"
            continue
        for entry_id, fields in entries[0][1]:
            after = entry_id.decode()
            event = fields[b"event"].decode()
            yield f"id: {after}\nevent: {event}\ndata: {fields[b'data'].decode()}\n\n"
            if event in contract.FINAL_EVENTS:
                return
