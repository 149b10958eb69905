"""The RQ task that forwards a generation request to the engine, and its end-of-job callbacks."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from loguru import logger
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job
from rq.timeouts import JobTimeoutException

from worker import contract, outcome
from worker.engine import EngineClient
from worker.exceptions import (
    EngineInterrupted,
    EngineProtocolError,
    EngineRejected,
    EngineServerError,
    EngineTimeout,
    EngineUnavailable,
    JobCancelled,
    JobExpired,
    TimeLimitExceeded,
    WorkerShutDown,
)
from worker.settings import WorkerSettings

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

    from redis import Redis
    from redis.client import Pipeline

REDIS_UNREACHABLE = (RedisConnectionError, RedisTimeoutError)
"""What a worker's Redis command raises once its connection has waited out an outage (contract.redis_retry), or at
once when Redis did not answer in time (a timed-out command is not sent again: contract.RESENT_ON)."""
ERROR_TYPES: dict[type[BaseException], str] = {
    EngineUnavailable: contract.ERROR_ENGINE_UNAVAILABLE,
    EngineServerError: contract.ERROR_ENGINE_ERROR,
    EngineProtocolError: contract.ERROR_ENGINE_ERROR,
    EngineRejected: contract.ERROR_ENGINE_REJECTED,
    EngineTimeout: contract.ERROR_TIMEOUT,
    JobTimeoutException: contract.ERROR_TIMEOUT,
    TimeLimitExceeded: contract.ERROR_TIMEOUT,
    JobExpired: contract.ERROR_EXPIRED,
    AbandonedJobError: contract.ERROR_WORKER_DIED,
    SystemExit: contract.ERROR_WORKER_DIED,  # RQ's cold shutdown raises it inside the running job
    WorkerShutDown: contract.ERROR_WORKER_DIED,  # the same, for a worker in a thread (worker/pool.py)
    JobCancelled: contract.ERROR_CANCELLED,
    # Redis still away after the worker's connection waited it out: tried again at once.
    **dict.fromkeys(REDIS_UNREACHABLE, contract.ERROR_WORKER_DIED),
}
MAX_RETRY_DELAY = 30  # seconds
PENDING_TEXT = "_pending_text"
"""Attribute `generate` leaves on its job: the text not yet in a `token` event, which `on_success` publishes."""
SENT_AT = "_sent_at"
"""Attribute `send_ahead` leaves on its job: when the engine got its request, which is when the job started."""
ATTEMPT_BEGUN = "_attempt_begun"
"""Attribute set on a job once its attempt has begun (`note_attempt`), in `EngineWorker`'s start transaction or else
in `start_attempt`: the cancel check's reply."""
LISTENED = "_listened"
"""Attribute set True on a running job once a client reads its events live: the start transaction found the web's
mark (contract.listen_key), or the web told the worker since (contract.LISTEN_COMMAND). Never set back to False."""


@cache
def worker_settings() -> WorkerSettings:
    return WorkerSettings.from_env()


_thread = threading.local()


def engine_client() -> EngineClient:
    """Return this thread's engine client, created on first use: a worker process runs one job per thread."""
    client = getattr(_thread, "engine_client", None)
    if client is None:
        settings = worker_settings()
        client = _thread.engine_client = EngineClient(
            settings.engine_url,
            settings.served_model_name,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.task_time_limit,
            stream_interval=settings.engine_stream_interval,
        )
    return client


def forget_engine_client() -> None:
    """Make the next `engine_client` in this thread build a new client (from settings read again)."""
    _thread.engine_client = None


def generate(payload: dict[str, Any]) -> dict[str, Any]:
    """Run one generation on the engine, publishing its text as it arrives; return text, finish reason, usage, TTFT.

    Raises:
        JobCancelled: the owner cancelled the job (before it started, or while the engine streamed).
    """
    job = get_current_job()
    if job is None:  # called directly, outside a worker
        completion = engine_client().generate(payload)
    else:
        try:
            start_attempt(job, worker_settings().queue_ttl)
        except BaseException:
            engine_client().discard()  # the request `send_ahead` sent, if any
            raise
        job.started_at = getattr(job, SENT_AT, job.started_at)  # RQ's is after its start transaction
        client = engine_client()
        interval = worker_settings().stream_flush_interval
        tokens = TokenPublisher(job.connection, job.id, interval, client.sent_at, lambda: getattr(job, LISTENED, False))
        try:
            completion = client.generate(payload, on_text=tokens.add)
        except EngineInterrupted:
            tokens.flush()
            raise JobCancelled("cancelled while running", tokens.partial()) from None
        setattr(job, PENDING_TEXT, tokens.take_unsent())  # published with the final event (`on_success`)
    return {
        contract.RESULT_TEXT: completion.text,
        contract.RESULT_FINISH_REASON: completion.finish_reason,
        contract.RESULT_PROMPT_TOKENS: completion.prompt_tokens,
        contract.RESULT_COMPLETION_TOKENS: completion.completion_tokens,
        contract.RESULT_TTFT: completion.time_to_first_token,
    }


class TokenPublisher:
    """Collect the text the engine streams and append it to the job's event stream in batches.

    One `token` event per `interval` seconds at most, so a fast engine costs Redis a few writes
    per second per job, not one per token; and none while `listened()` is false, when no client reads the
    job's events live: the text then goes out with the final event, in one `token` event before it.
    """

    def __init__(
        self,
        connection: Redis,
        task_id: str,
        interval: float,
        started: float | None = None,
        listened: Callable[[], bool] = lambda: True,
    ):
        self.connection = connection
        self.task_id = task_id
        self.interval = interval
        self.listened = listened
        self.parts: list[str] = []
        self.tokens = 0  # generated so far, as `engine._read_stream` counts them
        self.unsent: list[str] = []
        # time.monotonic() when the request went to the engine (now if not given): where its TTFT counts from
        self.started = time.monotonic() if started is None else started
        self.first_at: float | None = None
        self.sent_at = self.started

    def add(self, piece: str, tokens: int) -> None:
        """Take the text of one stream event that carries tokens (empty for a token without text) and the
        tokens generated so far."""
        now = time.monotonic()
        if self.first_at is None:
            self.first_at = now
        self.tokens = tokens
        if piece:
            self.parts.append(piece)
            self.unsent.append(piece)
        if now - self.sent_at >= self.interval and self.listened():
            self.flush()

    def flush(self) -> None:
        if self.unsent:
            outcome.publish(self.connection, self.task_id, contract.EVENT_TOKEN, {"text": self.take_unsent()})
        self.sent_at = time.monotonic()

    def take_unsent(self) -> str:
        """Return the text not yet published, and forget it: the caller publishes it."""
        text = "".join(self.unsent)
        self.unsent.clear()
        return text

    def partial(self) -> dict[str, Any]:
        """What was generated so far: text, tokens and the time to the first token, counted as for a finished job
        (`engine._read_stream`)."""
        return {
            contract.RESULT_TEXT: "".join(self.parts),
            contract.RESULT_COMPLETION_TOKENS: self.tokens,
            contract.RESULT_TTFT: None if self.first_at is None else round(self.first_at - self.started, 4),
        }


def begin_attempt(job: Job, pipe: Pipeline) -> None:
    """Queue on `pipe` the start of this attempt: the cancel check (the first reply), whether a client reads the
    job's events live (the second), the attempt count in the job's meta and the `started` event. The worker sends
    them with RQ's start transaction (one round trip), which also names the job's worker: the web marks a listener
    and reads that name in one transaction, so it either comes before and is seen here, or sees the worker to tell
    (`web.tasks.listen`)."""
    attempt = job.meta.get(contract.META_ATTEMPT, 0) + 1
    job.meta[contract.META_ATTEMPT] = attempt
    pipe.exists(contract.cancel_key(job.id))
    pipe.exists(contract.listen_key(job.id))
    pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
    outcome.publish(pipe, job.id, contract.EVENT_STARTED, {"attempt": attempt})


def note_attempt(job: Job, replies: list[Any]) -> None:
    """Keep on the job what the replies of `begin_attempt`'s commands, first in their transaction, say: whether its
    owner had cancelled it (ATTEMPT_BEGUN) and whether a client reads its events live (LISTENED, never set back:
    the web's word may have reached the worker's pubsub thread already)."""
    cancelled, listened = replies[:2]
    setattr(job, ATTEMPT_BEGUN, bool(cancelled))
    if listened:
        setattr(job, LISTENED, True)


def start_attempt(job: Job, queue_ttl: int) -> None:
    """Refuse a cancelled or expired job; begin the attempt here if the worker did not (`begin_attempt`)."""
    if getattr(job, ATTEMPT_BEGUN, None) is None:
        with job.connection.pipeline() as pipe:
            begin_attempt(job, pipe)
            note_attempt(job, pipe.execute())
    if getattr(job, ATTEMPT_BEGUN):
        raise JobCancelled("cancelled before it started")
    waited = _waited(job)
    if waited > queue_ttl:
        raise JobExpired(f"waited {waited:.0f} s in the queue, longer than QUEUE_TTL ({queue_ttl} s)")


def send_ahead(job: Job) -> None:
    """Send a generation job's request to the engine as soon as the worker has the job (`generate` reads it).

    The engine starts on it while the worker records the job's start in Redis, one round trip later.
    Only an `EngineJob`, which knows whether its owner had cancelled it when the worker read it: a
    cancelled job, or one that waited longer than QUEUE_TTL, is not sent (`start_attempt` refuses it). If
    the owner cancels in between, `generate` drops the request and the engine aborts it.
    """
    if not isinstance(job, EngineJob) or job.cancel_requested or _waited(job) > worker_settings().queue_ttl:
        return
    setattr(job, SENT_AT, datetime.now(UTC))
    engine_client().send(job.args[0])


def _waited(job: Job) -> float:
    """Seconds since the job was enqueued (0 if it never was)."""
    return 0.0 if job.enqueued_at is None else (datetime.now(UTC) - job.enqueued_at).total_seconds()


class EngineJob(Job):
    """RQ's Job, which knows whether its owner had cancelled it when a worker took it (`EngineQueue` reads both)."""

    cancel_requested = False


def on_success(job: Job, connection: Redis, result: dict[str, Any]) -> None:
    """Publish the job's final event (and webhook) and write its success line to the request log."""
    body = outcome.describe(job, status=contract.STATUS_COMPLETED, result=result)
    outcome.finish(connection, job, body, pending_text=getattr(job, PENDING_TEXT, ""))
    outcome.log_finished(job, body, _texts(job, result.get(contract.RESULT_TEXT)))


def on_failure(
    job: Job,
    connection: Redis,
    exc_type: type[BaseException],
    exc_value: BaseException,
    traceback: TracebackType | None,
) -> None:
    """Decide whether a failed attempt is retried; if not, record why the job ended and publish it.

    Runs before RQ requeues the job, on the same Job object, so setting `retries_left` and
    `retry_intervals` here chooses RQ's next step: final failure, retry after a backoff, or at once.
    A cancelled job keeps what it generated; the worker then files it as cancelled (runner.py).
    """
    error_type = classify(exc_type)
    if error_type == contract.ERROR_CANCELLED:
        job.retries_left = 0
        job.meta[contract.META_PARTIAL] = getattr(exc_value, "partial", None) or {}
        job.save_meta()
        body = outcome.describe(job, status=contract.STATUS_CANCELLED)
        outcome.finish(connection, job, body)
        outcome.log_finished(job, body, _texts(job, body["result"]))
        logger.info("job {} cancelled by its owner ({})", job.id, exc_value)
        return
    message = str(exc_value) or exc_type.__name__
    if exc_type in (JobTimeoutException, TimeLimitExceeded):
        message = f"generation exceeded the task time limit of {job.timeout} s"
    elif exc_type is AbandonedJobError:
        message = "the worker running the job died"
    elif exc_type in (SystemExit, WorkerShutDown):
        message = "the worker running the job was shut down"
    elif issubclass(exc_type, REDIS_UNREACHABLE):
        message = f"the worker running the job lost Redis ({message})"
    if error_type == contract.ERROR_ENGINE_UNAVAILABLE:
        connection.set(contract.ENGINE_DOWN_KEY, job.id)  # every worker waits for the engine before its next job
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
    body = outcome.describe(job, status=contract.STATUS_ERROR)
    outcome.finish(connection, job, body)
    outcome.log_finished(job, body, _texts(job, None))


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
