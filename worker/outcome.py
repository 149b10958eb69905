"""What clients are told about a job, and the events that tell them: shared by web and worker.

A leaf beside `contract`: the web app describes jobs and publishes the final event of a job it
cancels in the queue with the same code the worker uses for the jobs it runs.
- `describe` builds the public body of `/status` and `/result`, the final stream event and the webhook.
- `publish` appends one event to the job's Redis stream (`GET /stream/<task_id>` reads it).
- `finish` publishes the final event exactly once and queues the webhook delivery, if any.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from loguru import logger
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation
from rq.utils import utcformat

from worker import contract

if TYPE_CHECKING:
    from redis import Redis
    from redis.client import Pipeline
    from rq.job import Job

MESSAGES = {
    contract.STATUS_QUEUED: "Task is queued",
    contract.STATUS_PROCESSING: "Task is being processed",
    contract.STATUS_COMPLETED: "Task completed",
    contract.STATUS_ERROR: "Task failed",
    contract.STATUS_CANCELLED: "Task was cancelled",
}
WEBHOOK_RETRY_INTERVALS = [1, 4, 16, 64, 256]
"""Seconds between webhook delivery attempts after a failed one (6 attempts over about 6 minutes)."""
WEBHOOK_JOB_TIMEOUT = 60
"""Seconds one delivery attempt (DNS, connect, POST) may take."""


def webhook_key(task_id: str) -> str:
    """Redis hash of the job's webhook delivery: status, attempts, last_error, last_status_code."""
    return f"{contract.KEY_PREFIX}webhook:{task_id}"


def describe(job: Job, status: str | None = None, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe the job as `/result` does: status, then result and metrics, error, or partial output.

    Args:
        status: Public status to report instead of the stored one (a callback runs before RQ stores it).
        result: The task's return value when RQ has not stored it yet.
    """
    status = status or contract.public_status(job.get_status(refresh=False))
    described: dict[str, Any] = {"status": status, "task_id": job.id, "message": MESSAGES[status]}
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
    if status == contract.STATUS_COMPLETED:
        result = result if result is not None else job.return_value() or {}
        described["result"] = result.get(contract.RESULT_TEXT, "")
        described["finish_reason"] = result.get(contract.RESULT_FINISH_REASON)
        described["metrics"] = contract.job_metrics(job.created_at, job.started_at, job.ended_at, result)
    elif status == contract.STATUS_CANCELLED:
        partial = job.meta.get(contract.META_PARTIAL) or {}
        described["result"] = partial.get(contract.RESULT_TEXT, "")
        described["finish_reason"] = "cancelled"
        described["metrics"] = contract.job_metrics(job.created_at, job.started_at, job.ended_at, partial)
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


def file_as_cancelled(job: Job, ttl: int) -> None:
    """Store when the job ended (`job.ended_at`, else now) and started, move it to RQ's canceled registry,
    and keep it `ttl` seconds.

    RQ's cancel takes it out of its queue or the fair-share wait and frees its fair-share slot; the
    web app (a queued job) and the worker (a running one) both end a cancelled job this way.
    """
    job.ended_at = job.ended_at or datetime.now(UTC)
    times = {"ended_at": utcformat(job.ended_at)}
    if job.started_at:
        times["started_at"] = utcformat(job.started_at)  # the times the final event was computed from
    job.connection.hset(job.key, mapping=times)
    try:
        job.cancel()
    except InvalidJobOperation:
        pass  # already cancelled: the web app and a worker taking the job raced
    job.cleanup(ttl=ttl, remove_from_queue=False)


def publish(connection: Redis | Pipeline, task_id: str, event: str, data: dict[str, Any]) -> None:
    """Append one event to the job's stream; its stream id is the event id clients resume from."""
    connection.xadd(contract.events_key(task_id), {"event": event, "data": json.dumps(data)})


# Publish the final event and keep the stream for as long as the result, once per job: the
# worker and the web app (cancel) may both try, and an abandoned job's failure callback can run twice.
# KEYS: events, finished stream, recent processing times. ARGV: event, data, ttl, processing time or "",
# recent jobs kept, then the `token` event's name and data for text not yet published, or "".
_FINISH_SCRIPT = """
if redis.call('EXISTS', KEYS[2]) == 1 then
    return 0
end
if ARGV[7] ~= '' then
    redis.call('XADD', KEYS[1], '*', 'event', ARGV[6], 'data', ARGV[7])
end
redis.call('XADD', KEYS[2], '*', 'event', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[1], '*', 'event', ARGV[1], 'data', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if ARGV[4] ~= '' then
    redis.call('LPUSH', KEYS[3], ARGV[4])
    redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[5]) - 1)
end
return 1
"""


def finish(connection: Redis, job: Job, body: dict[str, Any], pending_text: str = "") -> bool:
    """Publish the job's final event (its data is `body`) and queue its webhook; False if already done.

    `pending_text`, generated text not yet in a `token` event, is published as one just before the final
    event, in the same round trip. The job's stream and the marker expire with the result. A completed
    job's processing time joins the recent ones the queue ETA is computed from.
    """
    event = {
        contract.STATUS_COMPLETED: contract.EVENT_COMPLETED,
        contract.STATUS_ERROR: contract.EVENT_ERROR,
        contract.STATUS_CANCELLED: contract.EVENT_CANCELLED,
    }[body["status"]]
    ttl = max(int(job.result_ttl or contract.DEFAULT_RESULT_TTL), 1)
    processing = (body.get("metrics") or {}).get("processing_time") if event == contract.EVENT_COMPLETED else None
    script = connection.register_script(_FINISH_SCRIPT)
    first = script(
        keys=[contract.events_key(job.id), contract.finished_key(job.id), contract.RECENT_PROCESSING_KEY],
        args=[
            event,
            json.dumps(body),
            ttl,
            "" if processing is None else processing,
            contract.RECENT_JOBS,
            contract.EVENT_TOKEN,
            json.dumps({"text": pending_text}) if pending_text else "",
        ],
    )
    if not first:
        return False
    callback_url = job.meta.get(contract.META_CALLBACK_URL)
    if callback_url:
        with connection.pipeline() as pipe:
            Queue(contract.QUEUE_WEBHOOKS, connection=connection).enqueue(
                contract.DELIVER_WEBHOOK_PATH,
                job.id,
                callback_url,
                body,
                retry=Retry(max=len(WEBHOOK_RETRY_INTERVALS), interval=WEBHOOK_RETRY_INTERVALS),
                job_timeout=WEBHOOK_JOB_TIMEOUT,
                result_ttl=ttl,
                failure_ttl=ttl,
                description=f"webhook for {job.id}",
                pipeline=pipe,
            )
            pipe.hset(webhook_key(job.id), mapping={"status": "pending", "attempts": 0})
            pipe.expire(webhook_key(job.id), ttl)
            pipe.execute()
    return True


def webhook_state(connection: Redis, task_id: str) -> dict[str, Any] | None:
    """Return the job's webhook delivery state, or None if it has none (yet)."""
    raw = connection.hgetall(webhook_key(task_id))
    if not raw:
        return None
    state = {key.decode(): value.decode() for key, value in raw.items()}
    described: dict[str, Any] = {"status": state["status"], "attempts": int(state.get("attempts", 0))}
    if state.get("last_status_code"):
        described["last_status_code"] = int(state["last_status_code"])
    if state.get("last_error"):
        described["last_error"] = state["last_error"]
    return described


def log_finished(job: Job, body: dict[str, Any], texts: str = "") -> None:
    """Write the job's line to the request log (`logs/llm_requests.log`), in the seed's key=value format."""
    metrics = body.get("metrics") or contract.job_metrics(job.created_at, job.started_at, job.ended_at, None)
    times = "queue_wait={}s processing_time={}s total_time={}s".format(
        metrics["queue_wait_time"], metrics["processing_time"], metrics["total_time"]
    )
    status = body["status"]
    if status == contract.STATUS_COMPLETED:
        line = (
            f"status=success prompt_tokens={metrics['prompt_tokens']} completion_tokens={metrics['completion_tokens']} "
            f"tokens_per_sec={metrics['tokens_per_second']} time_to_first_token={metrics['time_to_first_token']}s"
        )
    elif status == contract.STATUS_CANCELLED:
        line = f"status=cancelled completion_tokens={metrics['completion_tokens']}"
    else:
        line = f"status=error error_type={body['error_type']} error={body['error_message']!r}"
    logger.bind(request_log=True).info("task_id={} {} {}{}", job.id, line, times, texts)
