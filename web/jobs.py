"""Job endpoints: submit a generation, ask its status, fetch its result."""

from __future__ import annotations

from flask import g

from web import tasks
from web.api import Blueprint
from web.auth import require_api_key
from web.limits import limiter, rate_limit_off, submit_rate
from web.schemas import (
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


@bp.post("/generate")
@bp.arguments(GenerateRequestSchema(), error_status_code=400)
@bp.response(202, TaskAcceptedSchema)
@bp.alt_response(401, schema=ErrorSchema, description="Missing or invalid API key")
@bp.alt_response(413, schema=ErrorSchema, description="Request body too large")
@bp.alt_response(429, schema=ErrorSchema, description="Rate limit for this key reached; see Retry-After")
@bp.alt_response(503, schema=ErrorSchema, description="Queue full or unavailable; retry after Retry-After seconds")
@limiter.limit(submit_rate, exempt_when=rate_limit_off)
def generate(payload):
    """Queue a generation and return its task id at once."""
    task_id = tasks.submit(payload, g.owner)
    return {"status": "queued", "task_id": task_id, "message": "Task queued for processing"}


@bp.get("/status/<task_id>")
@bp.response(200, TaskStatusSchema)
@bp.alt_response(401, schema=ErrorSchema, description="Missing or invalid API key")
@bp.alt_response(404, schema=ErrorSchema, description="No such task for this key")
def status(task_id):
    """Tell whether the task is queued, processing, completed, error or cancelled."""
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
    job = tasks.find(task_id, g.owner)
    if query["wait"]:
        job = tasks.wait_until_finished(job, query["wait"])
    described = tasks.result_of(job)
    if described["status"] in contract.UNFINISHED_STATUSES:
        return described, 202
    return described
