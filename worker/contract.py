"""The job contract shared by web and worker: queues, task path, payload and meta keys, statuses; and what all
the service's processes share: reading their settings, logging and the CPUs they run on (SERVICE_CPUS), the
retries with which a worker waits out a Redis outage, which Redis errors any process sends a command again after, and
how RQ checks a serializer in every process.

A leaf module: it imports nothing from the project, so the web app (and the engine's supervisor) can import it
without pulling in the worker's engine client. Web enqueues `TASK_PATH` by its dotted name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import math
import os
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from loguru import logger
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

# --- Defaults shared by every process (units in the docstrings) -------------------------

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_ENGINE_URL = "http://127.0.0.1:8001"
DEFAULT_SERVED_MODEL_NAME = "local-llm"
"""The name the engine serves the model under; the worker sends it as `model`."""
DEFAULT_TASK_TIME_LIMIT = 120
"""Seconds a job may run before it ends as `error` with type `timeout`."""
DEFAULT_RESULT_TTL = 3600
"""Seconds a finished job (result or error) is kept for clients to fetch."""
DEFAULT_LOG_DIR = "logs"
DEFAULT_QUEUE_TTL = 600
"""Seconds a job may wait in its queue before a worker ends it as error/expired."""
DEFAULT_JOB_RETRIES = 3
"""Further attempts after a retryable failure (engine down or 5xx, worker died)."""
DEFAULT_MAX_NUM_SEQS = 64
"""Sequences the GPU engine batches at once (vLLM's `--max-num-seqs`)."""
CPU_ENGINE_WORKERS = 8
"""Engine workers, hence requests in flight, on the CPU engine unless WORKER_CONCURRENCY says."""

# --- Queues and task --------------------------------------------------------------------

QUEUE_HIGH = "llm-high"
QUEUE_NORMAL = "llm-normal"
QUEUE_LOW = "llm-low"
QUEUES = (QUEUE_HIGH, QUEUE_NORMAL, QUEUE_LOW)
"""Queue names in the order workers take from them (a class that waited too long goes first)."""
PRIORITY_QUEUES = {"high": QUEUE_HIGH, "normal": QUEUE_NORMAL, "low": QUEUE_LOW}
"""Queue of each `priority` a request may ask for."""
DEFAULT_PRIORITY = "normal"
QUEUE_WEBHOOKS = "llm-webhooks"
"""Webhook deliveries, worked by `python -m worker.webhooks`, never by the engine workers."""

TASK_PATH = "worker.jobs.generate"
ON_SUCCESS_PATH = "worker.jobs.on_success"
ON_FAILURE_PATH = "worker.jobs.on_failure"
DELIVER_WEBHOOK_PATH = "worker.webhooks.deliver"
# Jobs use RQ's default serializer: every RQ tool (WorkerPool, registries' cleanup, rq CLI,
# rq-dashboard) reads them without being told otherwise.


def list_queues(connection: Any, queues: Sequence[Any]) -> None:
    """Add RQ `queues` to RQ's set of queues, as RQ does at a queue's first job, so that `rq info` and rq-dashboard
    show each queue from the start (and `rq info`, which shows the workers of the queues it lists, every worker)."""
    if queues:
        connection.sadd(queues[0].redis_queues_keys, *(queue.key for queue in queues))


# --- Payload (the single argument of the task) -------------------------------------------

PAYLOAD_KEYS = ("prompt", "messages", "max_tokens", "temperature", "top_p", "user_id", "stop", "seed", "ignore_eos")
"""Keys of the payload dict sent to the engine; `prompt` xor `messages` is set, the rest are sampling options.
Service options (`priority`, `callback_url`) travel in the job's meta, not in the payload."""

# --- Result (the task's return value) ----------------------------------------------------

RESULT_TEXT = "text"
RESULT_FINISH_REASON = "finish_reason"
RESULT_PROMPT_TOKENS = "prompt_tokens"
RESULT_COMPLETION_TOKENS = "completion_tokens"
RESULT_TTFT = "time_to_first_token"
"""Seconds from sending the request to the engine until the first generated text arrived."""

# --- Meta (what RQ does not record itself) -----------------------------------------------

META_OWNER = "owner"
"""Fingerprint of the API key that submitted the job (never the key itself)."""
META_ERROR_TYPE = "error_type"
META_ERROR_MESSAGE = "error_message"
"""Why the job failed, set once it will not be tried again."""
META_ATTEMPT = "attempt"
"""How many times a worker has started the job (1 on the first run)."""
META_MAX_ATTEMPTS = "max_attempts"
META_RETRY_REASON = "retry_reason"
"""Error type of the failed attempt the job is queued again after."""
META_PRIORITY = "priority"
META_CALLBACK_URL = "callback_url"
META_WEBHOOK = "webhook"
"""Delivery state of the job's webhook: {"status": pending|delivered|failed, "attempts", "last_error"}."""
META_PARTIAL = "partial"
"""What a cancelled job had generated: {"text", "completion_tokens", "time_to_first_token"}."""

# --- Redis keys the service adds beside RQ's own ----------------------------------------

KEY_PREFIX = "llm:"


def events_key(task_id: str) -> str:
    """Redis stream of the job's events (queued, started, token, completed/error/cancelled)."""
    return f"{KEY_PREFIX}events:{task_id}"


def cancel_key(task_id: str) -> str:
    """Set when the job's owner asked to cancel it; the worker checks it before and while running."""
    return f"{KEY_PREFIX}cancel:{task_id}"


def listen_key(task_id: str) -> str:
    """Set when a client reads the job's events live (`/stream`): its worker then publishes the text as it comes.
    Without it the text goes out with the final event only (worker/jobs.py, `TokenPublisher`)."""
    return f"{KEY_PREFIX}listen:{task_id}"


LISTEN_COMMAND = "publish-text"
"""RQ worker command (on RQ's pubsub channel of the job's worker, as its stop-job) that the web sends when a client
starts reading a running job's events: the worker publishes the text from then on, beginning with what it holds."""


def finished_key(task_id: str) -> str:
    """A one-entry stream written with the job's final event: it is published (and its webhook sent) once,
    and long polls block on this stream, which wakes them once, not on every token event."""
    return f"{KEY_PREFIX}finished:{task_id}"


WAKE_KEY = f"{KEY_PREFIX}wake"
"""A list with one entry per job put in a queue, at most WAKE_MAX: idle workers block on it, then take a job.

Each job taken uses up one entry: the one that woke its worker, or, for a worker that took it on its way back
from a job, one the take pops (worker/runner.py)."""
WAKE_MAX = 10_000


def wake_workers(pipe: Any, count: int) -> None:
    """Queue on `pipe` (a Redis pipeline) the wake entries for `count` jobs just put in a queue."""
    pipe.lpush(WAKE_KEY, *[1] * count)
    pipe.ltrim(WAKE_KEY, 0, WAKE_MAX - 1)


ENGINE_DOWN_KEY = f"{KEY_PREFIX}engine-down"
"""Set when a job could not reach the engine; workers then wait for its health check before taking jobs."""
RECENT_PROCESSING_KEY = f"{KEY_PREFIX}recent-processing"
"""Processing times (seconds) of the last RECENT_JOBS completed jobs, newest first; feeds the ETA."""
RECENT_JOBS = 100

# --- Events of a job's stream (GET /stream/<task_id>) -----------------------------------

EVENT_QUEUED = "queued"
EVENT_STARTED = "started"
EVENT_TOKEN = "token"
EVENT_COMPLETED = "completed"
EVENT_ERROR = "error"
EVENT_CANCELLED = "cancelled"
FINAL_EVENTS = (EVENT_COMPLETED, EVENT_ERROR, EVENT_CANCELLED)

# --- Error types reported to clients ----------------------------------------------------

ERROR_ENGINE_UNAVAILABLE = "engine_unavailable"
ERROR_ENGINE_ERROR = "engine_error"
ERROR_ENGINE_REJECTED = "engine_rejected"
ERROR_TIMEOUT = "timeout"
ERROR_INTERNAL = "internal_error"
ERROR_STOPPED = "stopped"
ERROR_EXPIRED = "expired"
ERROR_WORKER_DIED = "worker_died"
ERROR_CANCELLED = "cancelled"
"""Not an error clients see: a job that ends this way has status `cancelled`."""
RETRYABLE_ERRORS = frozenset({ERROR_ENGINE_UNAVAILABLE, ERROR_ENGINE_ERROR, ERROR_WORKER_DIED})
"""Failures worth another attempt; the engine refusing the request or a timeout are final."""

# --- Statuses as clients see them -------------------------------------------------------

STATUS_QUEUED = "queued"
STATUS_PROCESSING = "processing"
STATUS_COMPLETED = "completed"
STATUS_ERROR = "error"
STATUS_CANCELLED = "cancelled"
UNFINISHED_STATUSES = (STATUS_QUEUED, STATUS_PROCESSING)

_RQ_TO_PUBLIC = {
    "created": STATUS_QUEUED,
    "queued": STATUS_QUEUED,
    "deferred": STATUS_QUEUED,
    "scheduled": STATUS_QUEUED,
    "rate_limited": STATUS_QUEUED,
    "ready_to_enqueue": STATUS_QUEUED,
    "started": STATUS_PROCESSING,
    "finished": STATUS_COMPLETED,
    "failed": STATUS_ERROR,
    "stopped": STATUS_ERROR,
    "canceled": STATUS_CANCELLED,
}


def public_status(rq_status: str) -> str:
    """Map an RQ job status to the status the API reports."""
    # JobStatus is a str Enum: look it up by value, since str() of it is "JobStatus.X".
    return _RQ_TO_PUBLIC.get(getattr(rq_status, "value", rq_status), STATUS_QUEUED)


# --- Settings (environment variables), and the CPUs the service runs on -----------------


class SettingsError(ValueError):
    """An environment variable has a value the service cannot run with; the message names it."""


def env_int(
    env: Mapping[str, str], name: str, default: int, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Read a whole-number setting; unset or empty gives `default`.

    Raises:
        SettingsError: for anything else, or for a value under `minimum` or over `maximum`, naming the variable.
    """
    value = _env_number(env, name, default, int, "a whole number")
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name} must be {minimum} or more, not {value}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name} must be {maximum} or less, not {value}")
    return value


def env_port(env: Mapping[str, str], name: str, default: int) -> int:
    """Read a TCP port setting (1..65535); unset or empty gives `default`."""
    return env_int(env, name, default, minimum=1, maximum=65535)


def env_float(env: Mapping[str, str], name: str, default: float, *, positive: bool = False) -> float:
    """Read a numeric setting (`0.25`, `10`); unset or empty gives `default`.

    Raises:
        SettingsError: for anything else, a negative value, or 0 if `positive`, naming the variable.
    """
    value = _env_number(env, name, default, float, "a number")
    if value < 0 or (positive and value == 0):
        raise SettingsError(f"{name} must be {'more than 0' if positive else '0 or more'}, not {value:g}")
    return value


def _env_number(env: Mapping[str, str], name: str, default: Any, kind: type, what: str) -> Any:
    value = (env.get(name) or "").strip()
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        number = math.nan
    if isinstance(number, float) and not math.isfinite(number):  # nan and inf parse, but are no setting
        raise SettingsError(f"{name} must be {what}, not {value!r}")
    return number


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def log_level(env: Mapping[str, str] = os.environ) -> str:
    """Read LOG_LEVEL (any case; unset or empty: INFO).

    Raises:
        SettingsError: for a level that is not one of LOG_LEVELS.
    """
    level = (env.get("LOG_LEVEL") or "INFO").strip().upper()
    if level not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {env['LOG_LEVEL']!r}")
    return level


@contextlib.contextmanager
def settings_checked() -> Iterator[None]:
    """Around a process's start: a SettingsError raised inside ends the process with status 2 and one line on
    stderr that says which setting to mend, not a traceback."""
    try:
        yield
    except SettingsError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def flag(value: str | None) -> bool:
    """Read a boolean setting: 1, true, yes or on (any case) is true."""
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def host_list(value: str) -> list[str]:
    """Read a comma-separated list of host names (lower-cased, blanks dropped)."""
    return [host.strip().lower().rstrip(".") for host in value.split(",") if host.strip()]


def redis_url(env: Mapping[str, str] = os.environ) -> str:
    """Return `REDIS_URL`, or one built from `REDIS_HOST`/`REDIS_PORT`/`REDIS_DB` if that is unset.

    Raises:
        SettingsError: for a port or database number that is not one.
    """
    if env.get("REDIS_URL"):
        return env["REDIS_URL"]
    if env.get("REDIS_HOST") or env.get("REDIS_PORT"):
        host = env.get("REDIS_HOST") or "127.0.0.1"
        port = env_port(env, "REDIS_PORT", 6379)
        return f"redis://{host}:{port}/{env_int(env, 'REDIS_DB', 0, minimum=0)}"
    return DEFAULT_REDIS_URL


def cpu_engine(env: Mapping[str, str] = os.environ) -> bool:
    """Tell whether MODEL_DEVICE names the CPU engine (the default) rather than a GPU."""
    return env.get("MODEL_DEVICE", "cpu").strip().lower() == "cpu"


def worker_concurrency(env: Mapping[str, str] = os.environ) -> int:
    """WORKER_CONCURRENCY: the engine workers on this host, hence the requests it has in flight.

    Unset or empty: CPU_ENGINE_WORKERS on the CPU engine; on a GPU, MAX_NUM_SEQS (DEFAULT_MAX_NUM_SEQS), the
    sequences vLLM batches at once, so that the engine always has a full batch.

    Raises:
        SettingsError: for a value under 1 (either setting), naming the variable.
    """
    default = CPU_ENGINE_WORKERS if cpu_engine(env) else env_int(env, "MAX_NUM_SEQS", DEFAULT_MAX_NUM_SEQS, minimum=1)
    return env_int(env, "WORKER_CONCURRENCY", default, minimum=1)


def fair_share_slots(env: Mapping[str, str] = os.environ) -> int:
    """FAIR_SHARE_SLOTS: jobs one API key may have queued or running at once, per priority; 0 turns it off.

    Unset or empty: `worker_concurrency(env)`, so that one key alone still fills this host's workers (with
    workers on several hosts, set it to their total).

    Raises:
        SettingsError: for a negative value, or as `worker_concurrency`, naming the variable.
    """
    if (env.get("FAIR_SHARE_SLOTS") or "").strip():
        return env_int(env, "FAIR_SHARE_SLOTS", 0, minimum=0)
    return worker_concurrency(env)


def service_cpus(env: Mapping[str, str] = os.environ) -> set[int] | None:
    """The CPUs that SERVICE_CPUS keeps the service's processes on (Redis, the web, the workers, the webhooks and
    the dashboard; not the engine); None: no binding.

    `auto` (the default): with the CPU engine running its model in a process of its own (MODEL_DEVICE=cpu,
    CPU_ENGINE_SINGLE_PROCESS off) on two CPUs or more, the last CPU this process may use, which vLLM's CPU
    engine leaves out of its model; otherwise no binding. `none` or empty: no binding. Anything else is a list
    of CPUs as taskset takes it: `1`, `2-3,6`.

    Raises:
        SettingsError: for a list that is not one, or that names a CPU this process may not use.
    """
    value = env.get("SERVICE_CPUS", "auto").strip().lower()
    allowed = os.sched_getaffinity(0)
    if value in ("", "none"):
        return None
    if value == "auto":
        own_process = not flag(env.get("CPU_ENGINE_SINGLE_PROCESS"))
        return {max(allowed)} if cpu_engine(env) and own_process and len(allowed) > 1 else None
    try:
        cpus = parse_cpu_list(value)
    except ValueError as exc:
        raise SettingsError(f"SERVICE_CPUS: {exc}") from None
    if not cpus <= allowed:
        usable = cpu_list(allowed)
        raise SettingsError(f"SERVICE_CPUS={value} names CPUs this process may not use (it may use {usable})")
    return cpus


def parse_cpu_list(value: str) -> set[int]:
    """Read a list of CPUs as taskset takes it (`1`, `2-3,6`).

    Raises:
        ValueError: for anything else.
    """
    cpus: set[int] = set()
    for part in value.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or not (last or first).isdigit() or int(first) > int(last or first):
            raise ValueError(f"{value!r} is not a list of CPUs such as 1 or 2-3,6")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def cpu_list(cpus: Collection[int]) -> str:
    """Write a set of CPUs as taskset reads them: `0-2,5`."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def bind_to_service_cpus(env: Mapping[str, str] = os.environ) -> set[int] | None:
    """Keep this process, every thread of it and every process it starts on `service_cpus(env)`; return them.

    vLLM's CPU engine computes on one thread per CPU but the last and waits for each step by spinning on the
    last: the service's processes, woken hundreds of times a second at full load, would otherwise also
    preempt the model.

    Raises:
        SettingsError: as `service_cpus`.
    """
    cpus = service_cpus(env)
    if cpus is not None:
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
                os.sched_setaffinity(int(task), cpus)
    return cpus


def callback_url_problem(url: str, allowed_hosts: list[str], allow_private: bool) -> str | None:
    """Say why `url` may not be called back, or None if it may (the resolved addresses are checked at delivery).

    `allowed_hosts` holds host names, or `*.domain` for any subdomain; an IP address is allowed only by
    name and, unless `allow_private`, only if it is a public one.
    """
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "must be an http:// or https:// URL with a host"
    if parsed.username or parsed.password:
        return "must not carry credentials"
    host = parsed.hostname.lower().rstrip(".")
    if not allowed_hosts:
        return "webhooks are not enabled on this service (WEBHOOK_ALLOWED_HOSTS is empty)"
    if not any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:])) for entry in allowed_hosts):
        return f"host {host} is not in WEBHOOK_ALLOWED_HOSTS"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return address_problem(address, allow_private)


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address, allow_private: bool) -> str | None:
    """Refuse private, loopback, link-local and other non-public addresses unless `allow_private`."""
    if allow_private or (address.is_global and not address.is_multicast):
        return None
    return f"address {address} is not public (set WEBHOOK_ALLOW_PRIVATE=true to allow it)"


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max((end - start).total_seconds(), 0.0)


def job_metrics(
    created_at: datetime | None,
    started_at: datetime | None,
    ended_at: datetime | None,
    result: Mapping[str, Any] | None,
) -> dict[str, float | int | None]:
    """Compute a job's metrics from RQ's own timestamps and the task's result.

    The wait counts from the submit (RQ's `created_at`): RQ resets `enqueued_at` when a job is
    retried or let through by the per-key fair share, and the client waited all along.

    Returns:
        queue_wait_time, processing_time, total_time (seconds), prompt_tokens, completion_tokens,
        tokens_per_second and time_to_first_token (seconds); None where not known.
    """
    result = result or {}
    # Rates are computed from the rounded times, so the published figures agree with each other.
    processing = _round(_seconds(started_at, ended_at))
    completion_tokens = result.get(RESULT_COMPLETION_TOKENS)
    tokens_per_second = None
    if completion_tokens is not None and processing:
        tokens_per_second = round(completion_tokens / processing, 2)
    return {
        "queue_wait_time": _round(_seconds(created_at, started_at or ended_at)),
        "processing_time": processing,
        "total_time": _round(_seconds(created_at, ended_at)),
        "prompt_tokens": result.get(RESULT_PROMPT_TOKENS),
        "completion_tokens": completion_tokens,
        "tokens_per_second": tokens_per_second,
        "time_to_first_token": _round(result.get(RESULT_TTFT)),
    }


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


# --- Redis outages ----------------------------------------------------------------------

REDIS_OUTAGE_WAIT = 7.5
"""Seconds of Redis outage (a restart, say) a worker waits out, retrying, before its command fails."""


RESENT_ON = (RedisConnectionError,)
"""The Redis errors after which redis-py sends a command again: a lost connection. Not a timeout: Redis has the
command then and may still run it once it answers, so sending it again could run a transaction twice (queue a
job twice, end it twice)."""


def redis_retry(seconds: float) -> Retry:
    """redis-py's retries for a connection that waits out a Redis outage of about `seconds`.

    The waits start at 0.1 s and double up to 1 s; as many as fit in `seconds` (none for 0). A command that
    fails on a lost connection is sent again once Redis answers, so a job running through a Redis restart keeps
    its text instead of being run again. One that timed out is not (RESENT_ON).
    """
    backoff, retries, waited = ExponentialBackoff(cap=1.0, base=0.05), 0, 0.0
    while waited + backoff.compute(retries + 1) <= seconds:
        retries += 1
        waited += backoff.compute(retries)
    return Retry(backoff, retries, supported_errors=RESENT_ON)


class _HasDumpsAndLoads(type):
    def __instancecheck__(cls, instance: Any) -> bool:
        return all(getattr(instance, name, None) is not None for name in ("dumps", "loads"))


class SerializerCheck(metaclass=_HasDumpsAndLoads):
    """What RQ's serializer check asks, `dumps` and `loads` that are not None, asked directly."""


def quicken_rq_serializer_check() -> None:
    """Have RQ check a serializer without typing's runtime-protocol machinery.

    RQ checks its serializer with `isinstance(serializer, Serializer)`, a runtime-checkable Protocol, each time it
    builds a job, queue, registry or result: 6 times per job in a worker, 9-13 us each on Python 3.11 (typing walks
    the protocol's classes each time) against about 1 us for this class, which asks the same.
    """
    import rq.serializers

    rq.serializers.Serializer = SerializerCheck


# --- Logging: the same files for every process ------------------------------------------

REQUEST_LOG = "llm_requests.log"
"""One line per finished job, `[ts] task_id=... status=...`; written by the worker."""
LOG_ROTATION = "50 MB"
LOG_RETENTION = "14 days"


class _InterceptHandler(logging.Handler):
    """Route stdlib logging (rq, gunicorn, werkzeug) into loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # The record's caller: the first frame outside the logging module, however many frames of it lie between
        # (a record passed to `Logger.handle`, as `worker.runner.release_taken_line` does, has fewer).
        frame, depth = sys._getframe(1), 1
        while frame.f_back is not None and frame.f_code.co_filename == logging.__file__:
            frame, depth = frame.f_back, depth + 1
        logger.opt(exception=record.exc_info, depth=depth).log(level, record.getMessage())


def configure_logging(log_dir: str | Path, level: str = "INFO") -> None:
    """Send logs to stderr, `app.log` (level and up), `errors.log` (with tracebacks) and the request log.

    Call once per process tree before forking: `enqueue=True` makes forked children's writes
    go through the parent, so several processes share the files and their rotation safely.
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    logger.remove()
    logger.configure(extra={"request_log": False})
    # loguru's queue thread deadlocks once gevent has patched threading (a gevent gunicorn worker without
    # --preload): such a process writes to the files itself.
    enqueue = not _gevent_patched()
    # diagnose=False: tracebacks never show variable values, which may hold prompts or keys.
    common = {"rotation": LOG_ROTATION, "retention": LOG_RETENTION, "enqueue": enqueue, "diagnose": False}

    def not_request(record: Any) -> bool:
        return not record["extra"]["request_log"]

    logger.add(sys.stderr, level=level, filter=not_request, enqueue=enqueue, diagnose=False)
    logger.add(log_dir / "app.log", level=level, filter=not_request, **common)
    logger.add(log_dir / "errors.log", level="ERROR", backtrace=True, **common)
    logger.add(
        log_dir / REQUEST_LOG,
        format="[{time:YYYY-MM-DD HH:mm:ss.SSS}] {message}",
        filter=lambda record: record["extra"]["request_log"],
        **common,
    )
    # The root logger filters at the same level, so libraries' debug records (httpcore's dozen per
    # webhook request, RQ's per job) are dropped where they are made instead of built and then discarded.
    logging.basicConfig(handlers=[_InterceptHandler()], level=level.upper(), force=True)
    # httpx's request line per webhook delivery repeats the delivery's own log line, and RQ's two "job OK"
    # lines repeat what the request log says, at a cost per job; RQ's line for each job taken stays in app.log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("rq.worker").addFilter(_quieter_rq_worker)


RQ_SWEEP_LINES = ("Worker %s: cleaning registries for queue: %s", "Worker %s: cleaning group registries")
"""RQ's lines for each registry sweep (every MAINTENANCE_INTERVAL, a line per queue): written at DEBUG, not INFO."""


def _quieter_rq_worker(record: logging.LogRecord) -> bool:
    message = str(record.msg)
    if message in RQ_SWEEP_LINES:
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True
    if message.startswith("Successfully completed"):
        return False
    return not (message == "Worker %s: %s: %s (%s)" and "Job OK" in str(record.args[2]))


def _gevent_patched() -> bool:
    gevent_monkey = sys.modules.get("gevent.monkey")
    return bool(gevent_monkey and gevent_monkey.is_module_patched("threading"))
