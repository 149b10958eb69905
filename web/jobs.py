"""Job endpoints: submit (one or a batch), ask status, fetch the result, stream events, cancel."""

from __future__ import annotations

from flask import Response, g, request, stream_with_context

from web import tasks
from web.api import Blueprint
from web.auth import require_api_key
from web.errors import InvalidHeader, SubmitNotAnswered
from web.schemas import (
    BatchAcceptedSchema,
    BatchRequestSchema,
    ErrorSchema,
    GenerateRequestSchema,
    ResultQuerySchema,
    TaskAcceptedSchema,
    TaskResultSchema,
    TaskStatusSchema,
)
from worker import contract

bp = Blueprint("jobs", __name__, description="Submit generations and fetch their results (X-API-Key required).")
bp.before_request(require_api_key)

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 256
IDEMPOTENCY_DOC = {
    "parameters": [
        {
            "in": "header",
            "name": IDEMPOTENCY_HEADER,
            "required": False,
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
            "description": "Retrying with the same key returns the same task (200) instead of queuing another; "
            "the same key with a different body is a 409, as is a retry before the first request has queued its "
            "task (with Retry-After). Kept as long as the result.",
        }
    ]
}


def _submit(requests: list[dict], body_for_fingerprint: object) -> tuple[list[str], bool]:
    """Queue the requests, or on a retry with a known Idempotency-Key return the tasks queued before.

    Returns:
        (task ids, True if they were queued now).
    """
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return tasks.submit(requests, g.owner), True
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidHeader(f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    task_ids, new = tasks.reserve_idempotency_key(g.owner, key, tasks.fingerprint(body_for_fingerprint), len(requests))
    if not new:
        return task_ids, False
    try:
        return tasks.submit(requests, g.owner, task_ids), True
    except SubmitNotAnswered:
        # Redis may still run the submit: the claim stays, so a retry with the key finds these tasks, or frees
        # the claim if they never came (tasks.STALE_RESERVATION).
        raise
    except Exception:
        tasks.release_idempotency_key(g.owner, key)
        raise


def submit_errors(view):
    """Document the answers both submit endpoints share, and their Idempotency-Key header."""
    for status, description in [
        (401, "Missing or invalid API key"),
        (409, "Idempotency-Key already used with a different body, or its first request not queued yet (Retry-After)"),
        (413, "Request body too large"),
        (429, "Rate limit for this key reached (a batch counts once per request); see Retry-After"),
        (503, "Queue full or unavailable; retry after Retry-After seconds"),
    ]:
        view = bp.alt_response(status, schema=ErrorSchema, description=description)(view)
    return bp.doc(**IDEMPOTENCY_DOC)(view)


@bp.post("/generate")
@bp.arguments(GenerateRequestSchema(), error_status_code=400)
@bp.response(202, TaskAcceptedSchema)
@bp.alt_response(200, schema=TaskStatusSchema, description="Retried with a known Idempotency-Key: the same task")
@submit_errors
def generate(payload):
    """Queue a generation and return its task id at once."""
    task_ids, new = _submit([payload], payload)
    if not new:
        described = tasks.status_of(tasks.find(task_ids[0], g.owner))
        described["message"] = "Task already submitted with this Idempotency-Key"
        return described, 200
    return {"status": "queued", "task_id": task_ids[0], "message": "Task queued for processing"}


@bp.post("/generate/batch")
@bp.arguments(BatchRequestSchema(), error_status_code=400)
@bp.response(202, BatchAcceptedSchema)
@bp.alt_response(200, schema=BatchAcceptedSchema, description="Retried with a known Idempotency-Key: the same tasks")
@submit_errors
def generate_batch(batch):
    """Queue up to MAX_BATCH generations validated as a whole; return their task ids in order.

    One invalid request rejects the whole batch (400); its errors are named `requests.<index>.<field>`.
    """
    task_ids, new = _submit(batch["requests"], batch)
    if not new:
        return {"status": "queued", "task_ids": task_ids, "message": "Tasks already submitted with this key"}, 200
    return {"status": "queued", "task_ids": task_ids, "message": f"{len(task_ids)} tasks queued for processing"}


@bp.get("/status/<task_id>")
@bp.response(200, TaskStatusSchema)
@bp.alt_response(401, schema=ErrorSchema, description="Missing or invalid API key")
@bp.alt_response(404, schema=ErrorSchema, description="No such task for this key")
def status(task_id):
    """Tell whether the task is queued (with its place and ETA), processing, completed, error or cancelled."""
    return tasks.status_of(tasks.find(task_id, g.owner))


@bp.get("/result/<task_id>")
@bp.arguments(ResultQuerySchema(), location="query", error_status_code=400)
@bp.response(200, TaskResultSchema, description="Finished: completed (result, metrics), error or cancelled")
@bp.alt_response(202, schema=TaskStatusSchema, description="Still queued or processing")
@bp.alt_response(401, schema=ErrorSchema, description="Missing or invalid API key")
@bp.alt_response(404, schema=ErrorSchema, description="No such task for this key")
def result(query, task_id):
    """Return the task's result and metrics once finished, or 202 while it is not.

    With `wait=N` the answer comes as soon as the task finishes, or after N seconds at most.
    """
    job, final = tasks.find(task_id, g.owner), None
    if query["wait"]:
        job, final = tasks.wait_until_finished(job, query["wait"])
    described = tasks.result_of(job, final)
    if described["status"] in contract.UNFINISHED_STATUSES:
        return described, 202
    return described


@bp.delete("/jobs/<task_id>")
@bp.response(200, TaskResultSchema, description="Cancelled: `result` holds the text generated until then")
@bp.alt_response(202, schema=TaskStatusSchema, description="Running; its worker has not confirmed the cancel yet")
@bp.alt_response(401, schema=ErrorSchema, description="Missing or invalid API key")
@bp.alt_response(404, schema=ErrorSchema, description="No such task for this key")
@bp.alt_response(409, schema=ErrorSchema, description="The task has already finished")
def cancel(task_id):
    """Cancel a queued or running task.

    A queued task leaves the queue; a running one has its engine stream closed within a second and
    keeps the text generated so far. Either way it ends with status `cancelled`.
    """
    return tasks.cancel(tasks.find(task_id, g.owner))


@bp.get("/stream/<task_id>")
@bp.doc(
    parameters=[
        {
            "in": "header",
            "name": "Last-Event-ID",
            "required": False,
            "schema": {"type": "string", "pattern": r"^\d+-\d+$"},
            "description": "Resume after this event id (browsers' EventSource sends it on reconnect).",
        }
    ],
    responses={
        "200": {
            "description": "Server-Sent Events: `queued` {position}, `started` {attempt}, `token` {text}, then "
            "`completed`, `error` or `cancelled` carrying the same body as /result. Every event has an id. "
            "A `started` event with attempt > 1 means the text of the earlier attempt is void.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
    },
)
@bp.alt_response(400, schema=ErrorSchema, description="Last-Event-ID is not an event id")
@bp.alt_response(401, schema=ErrorSchema, description="Missing or invalid API key")
@bp.alt_response(404, schema=ErrorSchema, description="No such task for this key")
def stream(task_id):
    """Stream the task's events live; a finished task replays them from the start."""
    job = tasks.find(task_id, g.owner)
    after = tasks.last_event_id(request.headers.get("Last-Event-ID"))
    if after is None:
        raise InvalidHeader("Last-Event-ID must be an event id such as 1732780000000-0")
    tasks.listen(job)
    return Response(
        stream_with_context(tasks.events(job.id, after)),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
