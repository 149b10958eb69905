"""The RQ task that forwards a generation request to the engine, and its end-of-job callbacks."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from loguru import logger
from rq.timeouts import JobTimeoutException

from worker import contract
from worker.engine import EngineClient
from worker.exceptions import (
    EngineProtocolError,
    EngineRejected,
    EngineServerError,
    EngineTimeout,
    EngineUnavailable,
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
}
request_log = logger.bind(request_log=True)


@cache
def engine_client() -> EngineClient:
    """Return this process's engine client, created on first use so its pool is not shared across forks."""
    settings = WorkerSettings.from_env()
    return EngineClient(
        settings.engine_url,
        settings.served_model_name,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.task_time_limit,
    )


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one generation on the engine and return its text, finish reason, usage and TTFT."""
    completion = engine_client().generate(payload)
    return {
        contract.RESULT_TEXT: completion.text,
        contract.RESULT_FINISH_REASON: completion.finish_reason,
        contract.RESULT_PROMPT_TOKENS: completion.prompt_tokens,
        contract.RESULT_COMPLETION_TOKENS: completion.completion_tokens,
        contract.RESULT_TTFT: completion.time_to_first_token,
    }


def on_success(job: Job, connection: Redis, result: dict[str, Any]) -> None:
    """Write the job's success line to the request log."""
    metrics = contract.job_metrics(job.enqueued_at, job.started_at, job.ended_at, result)
    request_log.info(
        "task_id={} status=success prompt_tokens={} completion_tokens={} tokens_per_sec={} "
        "time_to_first_token={}s queue_wait={}s processing_time={}s total_time={}s",
        job.id,
        metrics["prompt_tokens"],
        metrics["completion_tokens"],
        metrics["tokens_per_second"],
        metrics["time_to_first_token"],
        metrics["queue_wait_time"],
        metrics["processing_time"],
        metrics["total_time"],
    )


def on_failure(
    job: Job,
    connection: Redis,
    exc_type: type[BaseException],
    exc_value: BaseException,
    traceback: TracebackType | None,
) -> None:
    """Record why the job failed in its meta, log the traceback and the request-log line."""
    error_type = classify(exc_type)
    message = str(exc_value) or exc_type.__name__
    if error_type == contract.ERROR_TIMEOUT and exc_type is JobTimeoutException:
        message = f"generation exceeded the task time limit of {job.timeout} s"
    job.meta[contract.META_ERROR_TYPE] = error_type
    job.meta[contract.META_ERROR_MESSAGE] = message
    job.save_meta()
    logger.opt(exception=(exc_type, exc_value, traceback)).error("job {} failed: {}", job.id, error_type)
    metrics = contract.job_metrics(job.enqueued_at, job.started_at, job.ended_at, None)
    request_log.info(
        "task_id={} status=error error_type={} error={!r} queue_wait={}s processing_time={}s total_time={}s",
        job.id,
        error_type,
        message,
        metrics["queue_wait_time"],
        metrics["processing_time"],
        metrics["total_time"],
    )


def classify(exc_type: type[BaseException]) -> str:
    """Return the client-facing error type for an exception class."""
    for cls in exc_type.__mro__:
        if cls in ERROR_TYPES:
            return ERROR_TYPES[cls]
    return contract.ERROR_INTERNAL
