"""The RQ task that forwards a generation request to the engine, and its end-of-job callbacks."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from loguru import logger
from rq import get_current_job
from rq.exceptions import AbandonedJobError
from rq.timeouts import JobTimeoutException

from worker import contract
from worker.engine import EngineClient
from worker.exceptions import (
    EngineProtocolError,
    EngineRejected,
    EngineServerError,
    EngineTimeout,
    EngineUnavailable,
    JobExpired,
)
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from types import TracebackType

    from redis import Redis
    from rq.job import Job

ERROR_TYPES: dict[type[BaseException], str] = {
    EngineUnavailable: contract.ERROR_ENGINE_UNAVAILABLE,
    EngineServerError: contract.ERROR_ENGINE_ERROR,
    EngineProtocolError: contract.ERROR_ENGINE_ERROR,
    EngineRejected: contract.ERROR_ENGINE_REJECTED,
    EngineTimeout: contract.ERROR_TIMEOUT,
    JobTimeoutException: contract.ERROR_TIMEOUT,
    JobExpired: contract.ERROR_EXPIRED,
    AbandonedJobError: contract.ERROR_WORKER_DIED,
    SystemExit: contract.ERROR_WORKER_DIED,  # RQ's cold shutdown raises it inside the running job
}
MAX_RETRY_DELAY = 30  # seconds
request_log = logger.bind(request_log=True)


@cache
def worker_settings() -> WorkerSettings:
    return WorkerSettings.from_env()


@cache
def engine_client() -> EngineClient:
    """Return this process's engine client, created on first use so its pool is not shared across forks."""
    settings = worker_settings()
    return EngineClient(
        settings.engine_url,
        settings.served_model_name,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.task_time_limit,
    )


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one generation on the engine and return its text, finish reason, usage and TTFT."""
    job = get_current_job()
    if job is not None:
        start_attempt(job, worker_settings().queue_ttl)
    completion = engine_client().generate(payload)
    return {
        contract.RESULT_TEXT: completion.text,
        contract.RESULT_FINISH_REASON: completion.finish_reason,
        contract.RESULT_PROMPT_TOKENS: completion.prompt_tokens,
        contract.RESULT_COMPLETION_TOKENS: completion.completion_tokens,
        contract.RESULT_TTFT: completion.time_to_first_token,
    }


def start_attempt(job: Job, queue_ttl: int) -> None:
    """Count this attempt in the job's meta; refuse a job that waited in the queue past `queue_ttl`."""
    job.meta[contract.META_ATTEMPT] = job.meta.get(contract.META_ATTEMPT, 0) + 1
    job.save_meta()
    if job.enqueued_at is not None:
        waited = (datetime.now(UTC) - job.enqueued_at).total_seconds()
        if waited > queue_ttl:
            raise JobExpired(f"waited {waited:.0f} s in the queue, longer than QUEUE_TTL ({queue_ttl} s)")


def on_success(job: Job, connection: Redis, result: dict[str, Any]) -> None:
    """Write the job's success line to the request log."""
    metrics = contract.job_metrics(job.enqueued_at, job.started_at, job.ended_at, result)
    request_log.info(
        "task_id={} status=success prompt_tokens={} completion_tokens={} tokens_per_sec={} "
        "time_to_first_token={}s queue_wait={}s processing_time={}s total_time={}s{}",
        job.id,
        metrics["prompt_tokens"],
        metrics["completion_tokens"],
        metrics["tokens_per_second"],
        metrics["time_to_first_token"],
        metrics["queue_wait_time"],
        metrics["processing_time"],
        metrics["total_time"],
        _texts(job, result.get(contract.RESULT_TEXT)),
    )


def on_failure(
    job: Job,
    connection: Redis,
    exc_type: type[BaseException],
    exc_value: BaseException,
    traceback: TracebackType | None,
) -> None:
    """Decide whether a failed attempt is retried; if not, record why the job failed and log it.

    Runs before RQ requeues the job, on the same Job object, so setting `retries_left` and
    `retry_intervals` here chooses RQ's next step: final failure, retry after a backoff, or at once.
    """
    error_type = classify(exc_type)
    message = str(exc_value) or exc_type.__name__
    if exc_type is JobTimeoutException:
        message = f"generation exceeded the task time limit of {job.timeout} s"
    elif exc_type is AbandonedJobError:
        message = "the worker running the job died"
    elif exc_type is SystemExit:
        message = "the worker running the job was shut down"
    if error_type not in contract.RETRYABLE_ERRORS:
        job.retries_left = 0
    if job.should_retry:
        attempt = job.meta.get(contract.META_ATTEMPT, 1)
        delay = 0 if error_type == contract.ERROR_WORKER_DIED else retry_delay(attempt)
        job.retry_intervals = [delay]
        job.meta[contract.META_RETRY_REASON] = error_type
        job.save_meta()
        logger.warning(
            "job {} attempt {} failed ({}: {}); retrying in {} s, {} retries left",
            job.id, attempt, error_type, message, delay, job.retries_left,
        )  # fmt: skip
        return
    job.meta[contract.META_ERROR_TYPE] = error_type
    job.meta[contract.META_ERROR_MESSAGE] = message
    job.save_meta()
    # RQ's exception handler has already written the traceback to the error log.
    logger.error("job {} failed: {}: {}", job.id, error_type, message)
    metrics = contract.job_metrics(job.enqueued_at, job.started_at, job.ended_at, None)
    request_log.info(
        "task_id={} status=error error_type={} error={!r} queue_wait={}s processing_time={}s total_time={}s{}",
        job.id,
        error_type,
        message,
        metrics["queue_wait_time"],
        metrics["processing_time"],
        metrics["total_time"],
        _texts(job, None),
    )


def _texts(job: Job, output: str | None) -> str:
    """Return the prompt and output for the request log when LOG_PROMPTS is on, else nothing."""
    if not worker_settings().log_prompts:
        return ""
    payload = job.args[0] if job.args else {}
    prompt = payload.get("prompt", payload.get("messages"))
    return f" prompt={prompt!r}" + ("" if output is None else f" output={output!r}")


def retry_delay(attempt: int) -> int:
    """Seconds to wait before retrying after failed attempt number `attempt` (exponential backoff)."""
    base = worker_settings().engine_retry_backoff
    return int(min(base * 2 ** (attempt - 1), MAX_RETRY_DELAY))


def classify(exc_type: type[BaseException]) -> str:
    """Return the client-facing error type for an exception class."""
    for cls in exc_type.__mro__:
        if cls in ERROR_TYPES:
            return ERROR_TYPES[cls]
    return contract.ERROR_INTERNAL
