"""Failures of a generation job, one class per cause."""


class EngineUnavailable(Exception):
    """The engine could not be reached, or dropped the connection mid-stream."""


class EngineServerError(Exception):
    """The engine answered with a 5xx status."""


class EngineRejected(Exception):
    """The engine refused the request with a 4xx status (e.g. prompt longer than the context)."""


class EngineTimeout(Exception):
    """The engine sent nothing for longer than the read timeout."""


class WorkerShutDown(Exception):
    """The worker process was shut down cold while the job ran; the job is retried at once."""


class TimeLimitExceeded(Exception):
    """The job ran longer than its time limit (TASK_TIME_LIMIT) while the engine streamed."""


class EngineProtocolError(Exception):
    """The engine's answer could not be parsed as an OpenAI-compatible stream."""


class JobExpired(Exception):
    """The job waited in the queue longer than QUEUE_TTL."""


class EngineInterrupted(Exception):
    """The request to the engine was cut off on purpose (the job was cancelled)."""


class JobCancelled(Exception):
    """The job's owner cancelled it; `partial` holds what was generated until then."""

    def __init__(self, message: str, partial: dict | None = None):
        super().__init__(message)
        self.partial = partial or {}
