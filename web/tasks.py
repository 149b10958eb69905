"""Submitting jobs to RQ and describing them to their owners; the routes stay thin."""

from __future__ import annotations

import re
import uuid
from typing import Any

from flask import current_app
from redis import Redis
from rq import Callback, Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job

from web.errors import QueueFull, TaskNotFound
from worker import contract

_TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_MESSAGES = {
    contract.STATUS_QUEUED: "Task is queued",
    contract.STATUS_PROCESSING: "Task is being processed",
    contract.STATUS_COMPLETED: "Task completed",
    contract.STATUS_ERROR: "Task failed",
    contract.STATUS_CANCELLED: "Task was cancelled",
}


def redis_connection() -> Redis:
    return current_app.extensions["redis"]


def queued_jobs(connection: Redis) -> int:
    """Count the jobs waiting in every queue, read in one transaction."""
    with connection.pipeline(transaction=True) as pipe:
        for name in contract.QUEUES:
            pipe.llen(Queue(name, connection=connection).key)
        return sum(pipe.execute())


def submit(payload: dict[str, Any], owner: str) -> str:
    """Enqueue a generation job owned by `owner` and return its task id.

    Raises:
        QueueFull: MAX_QUEUED_JOBS are already waiting. Submits running at the same moment in other
            gunicorn workers may each pass the check, so the cap can be passed by at most that many.
    """
    config = current_app.config
    connection = redis_connection()
    cap = config["MAX_QUEUED_JOBS"]
    if cap > 0 and queued_jobs(connection) >= cap:
        raise QueueFull(f"{cap} jobs are already waiting; try again later")
    queue = Queue(contract.QUEUE_NORMAL, connection=connection)
    # One round trip: RQ adds the job's writes to our pipeline, sent as one transaction.
    with connection.pipeline() as pipe:
        job = queue.enqueue(
            contract.TASK_PATH,
            payload,
            job_id=str(uuid.uuid4()),
            job_timeout=config["TASK_TIME_LIMIT"],
            result_ttl=config["RESULT_TTL"],
            failure_ttl=config["RESULT_TTL"],
            meta={contract.META_OWNER: owner, contract.META_MAX_ATTEMPTS: config["JOB_RETRIES"] + 1},
            retry=Retry(max=config["JOB_RETRIES"]) if config["JOB_RETRIES"] > 0 else None,
            on_success=Callback(contract.ON_SUCCESS_PATH),
            on_failure=Callback(contract.ON_FAILURE_PATH),
            description=f"generate max_tokens={payload['max_tokens']}",
            pipeline=pipe,
        )
        pipe.execute()
    return job.id


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


def wait_until_finished(job: Job, seconds: int) -> Job:
    """Block until the job has its final result (RQ's result stream) or `seconds` pass; return it fresh."""
    if contract.public_status(job.get_status(refresh=False)) not in contract.UNFINISHED_STATUSES:
        return job
    waiting = Job(job.id, connection=current_app.extensions["redis_blocking"])
    waiting.latest_result(timeout=seconds)
    job.refresh()
    return job


def status_of(job: Job) -> dict[str, Any]:
    """Describe where the job is in its lifecycle, and which attempt it is on once retried."""
    status = contract.public_status(job.get_status(refresh=False))
    described = {"status": status, "task_id": job.id, "message": _MESSAGES[status]}
    attempt = job.meta.get(contract.META_ATTEMPT, 0)
    retry_reason = job.meta.get(contract.META_RETRY_REASON)
    if retry_reason:
        described["attempt"] = attempt + 1 if status == contract.STATUS_QUEUED else attempt
        described["max_attempts"] = job.meta.get(contract.META_MAX_ATTEMPTS)
        if status == contract.STATUS_QUEUED:
            described["message"] = (
                f"Task is queued again after attempt {attempt} failed ({retry_reason}); "
                f"attempt {attempt + 1} of {described['max_attempts']} is next"
            )
    return described


def result_of(job: Job) -> dict[str, Any]:
    """Describe the job's outcome: result and metrics, error, or its status while unfinished."""
    described = status_of(job)
    status = described["status"]
    if status == contract.STATUS_COMPLETED:
        result = job.return_value() or {}
        described["result"] = result.get(contract.RESULT_TEXT, "")
        described["finish_reason"] = result.get(contract.RESULT_FINISH_REASON)
        described["metrics"] = contract.job_metrics(job.enqueued_at, job.started_at, job.ended_at, result)
    elif status == contract.STATUS_ERROR:
        described.update(_error_of(job))
    return described


def _error_of(job: Job) -> dict[str, str]:
    """Return the failure's type and message as the worker recorded them, or RQ's own record."""
    error_type = job.meta.get(contract.META_ERROR_TYPE)
    message = job.meta.get(contract.META_ERROR_MESSAGE)
    if error_type is None:
        # The failure callback never ran: the job was stopped, or its worker died mid-job.
        latest = job.latest_result()
        error_type = contract.ERROR_STOPPED if job.get_status(refresh=False) == "stopped" else contract.ERROR_INTERNAL
        message = (latest.exc_string or "").strip().splitlines()[-1:] if latest else []
        message = message[0] if message else "the job ended without a result"
    return {"error_type": error_type, "error_message": message}
