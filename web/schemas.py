"""Request and response schemas of the HTTP API; the OpenAPI spec is generated from them."""

from __future__ import annotations

import re
from typing import Any

from flask import current_app
from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from worker import contract

MAX_RESULT_WAIT = 30
"""Longest long-poll on /result, in seconds."""
NOT_BLANK = r"[^\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
"""A character that is not whitespace: the characters `str.isspace` counts, spelled so that Python's regular
expressions and the spec's (ECMA-262, whose `\\s` differs from Python's) read the class alike."""
MAX_STOP = 4
"""Most stop strings a request may give: vLLM refuses more, as OpenAI's API does."""
SEED_RANGE = validate.Range(-(2**63), 2**63 - 1)
"""The seeds vLLM takes (64-bit)."""
STATUSES = [
    contract.STATUS_QUEUED,
    contract.STATUS_PROCESSING,
    contract.STATUS_COMPLETED,
    contract.STATUS_ERROR,
    contract.STATUS_CANCELLED,
]


class StrictFloat(fields.Float):
    """A float that refuses strings and booleans instead of coercing them."""

    def _validated(self, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.make_error("invalid")
        return super()._validated(value)


class StrictBoolean(fields.Boolean):
    """A JSON true/false only: marshmallow's Boolean would also take 0, 1, "yes"..."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class Text(fields.String):
    """A string of Unicode text. JSON's escapes can spell a lone surrogate (`"\\ud800"`), which is no character:
    vLLM's tokenizer refuses such a prompt with an unrelated message, and a stop string with a 500."""

    default_error_messages = {"surrogate": "must be Unicode text: it holds a lone surrogate (such as \\ud800)"}

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> Any:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise self.make_error("surrogate") from None
        return text


class MessageSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(["system", "user", "assistant"]))
    content = Text(required=True, validate=validate.Length(min=1))


class GenerateRequestSchema(Schema):
    prompt = Text(metadata={"description": "Text to complete. Give this or `messages`."})
    messages = fields.List(
        fields.Nested(MessageSchema),
        validate=validate.Length(min=1),
        metadata={"description": "Chat messages, answered with the model's chat template. Give this or `prompt`."},
    )
    max_tokens = fields.Integer(
        strict=True, metadata={"description": "Tokens to generate, 1..MAX_NEW_TOKENS (default DEFAULT_MAX_TOKENS)."}
    )
    temperature = StrictFloat(load_default=0.7, validate=validate.Range(0.0, 2.0))
    top_p = StrictFloat(load_default=1.0, validate=validate.Range(0.0, 1.0, min_inclusive=False))
    user_id = Text(load_default=None, allow_none=True, validate=validate.Length(max=256))
    stop = fields.List(
        Text(validate=validate.Length(min=1)),
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=MAX_STOP),
        metadata={"description": f"At most {MAX_STOP} strings, as vLLM and OpenAI's API take."},
    )
    seed = fields.Integer(strict=True, load_default=None, allow_none=True, validate=SEED_RANGE)
    ignore_eos = StrictBoolean(
        load_default=False,
        metadata={"description": "Keep generating past end-of-sequence up to max_tokens (vLLM); for benchmarks."},
    )
    priority = fields.String(
        load_default=contract.DEFAULT_PRIORITY,
        validate=validate.OneOf(list(contract.PRIORITY_QUEUES)),
        metadata={
            "description": "high jobs start before normal ones, normal before low; a job that waited "
            "PRIORITY_AGING seconds goes ahead of newer higher ones."
        },
    )
    callback_url = Text(
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=2048),
        metadata={
            "description": "POSTed the result JSON when the task ends, signed with HMAC-SHA256 "
            "(X-Webhook-Signature). Its host must be in WEBHOOK_ALLOWED_HOSTS."
        },
    )

    @validates_schema
    def check_input(self, data: dict[str, Any], **kwargs: Any) -> None:
        """Require exactly one of prompt and messages, within the configured size limits."""
        config = current_app.config
        prompt, messages = data.get("prompt"), data.get("messages")
        if (prompt is None) == (messages is None):
            raise ValidationError("give exactly one of `prompt` and `messages`", field_name="prompt")
        if prompt is not None and not re.search(NOT_BLANK, prompt):
            raise ValidationError("must not be empty", field_name="prompt")
        size = len(prompt) if prompt is not None else sum(len(m["content"]) for m in messages)
        if size > config["MAX_PROMPT_CHARS"]:
            field = "prompt" if prompt is not None else "messages"
            raise ValidationError(f"longer than {config['MAX_PROMPT_CHARS']} characters", field_name=field)
        max_tokens = data.get("max_tokens", config["DEFAULT_MAX_TOKENS"])
        if not 1 <= max_tokens <= config["MAX_NEW_TOKENS"]:
            raise ValidationError(f"must be between 1 and {config['MAX_NEW_TOKENS']}", field_name="max_tokens")
        if data.get("callback_url") is not None:
            problem = contract.callback_url_problem(
                data["callback_url"], config["WEBHOOK_ALLOWED_HOSTS"], config["WEBHOOK_ALLOW_PRIVATE"]
            )
            if problem is None and not config["WEBHOOK_SECRET_SET"]:
                problem = "webhooks are not enabled on this service (WEBHOOK_SECRET is empty)"
            if problem:
                raise ValidationError(problem, field_name="callback_url")

    @post_load
    def fill_defaults(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """Apply the configured default for `max_tokens`."""
        data.setdefault("max_tokens", current_app.config["DEFAULT_MAX_TOKENS"])
        return data


class BatchRequestSchema(Schema):
    requests = fields.List(
        fields.Nested(GenerateRequestSchema),
        required=True,
        validate=validate.Length(min=1),
        metadata={"description": "1..MAX_BATCH generation requests; one invalid request rejects the batch."},
    )

    @validates_schema
    def check_size(self, data: dict[str, Any], **kwargs: Any) -> None:
        limit = current_app.config["MAX_BATCH"]
        if len(data.get("requests") or []) > limit:
            raise ValidationError(f"at most {limit} requests per batch (MAX_BATCH)", field_name="requests")


class ResultQuerySchema(Schema):
    wait = fields.Integer(
        load_default=0,
        validate=validate.Range(0, MAX_RESULT_WAIT),
        metadata={"description": f"Seconds to wait for the task to finish before answering (0..{MAX_RESULT_WAIT})."},
    )


class TaskAcceptedSchema(Schema):
    status = fields.String(required=True, metadata={"example": contract.STATUS_QUEUED})
    task_id = fields.String(required=True)
    message = fields.String(required=True)


class BatchAcceptedSchema(Schema):
    status = fields.String(required=True, metadata={"example": contract.STATUS_QUEUED})
    task_ids = fields.List(fields.String(), required=True, metadata={"description": "In the order of the requests."})
    message = fields.String(required=True)


class WebhookStateSchema(Schema):
    status = fields.String(
        required=True, validate=validate.OneOf(["pending", "retrying", "delivered", "failed", "refused"])
    )
    attempts = fields.Integer(required=True)
    last_status_code = fields.Integer(metadata={"description": "HTTP status of the receiver's last answer."})
    last_error = fields.String()


class TaskStatusSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(STATUSES))
    task_id = fields.String(required=True)
    message = fields.String(required=True)
    attempt = fields.Integer(metadata={"description": "Attempt the task is on; present once it has been retried."})
    max_attempts = fields.Integer()
    queue_position = fields.Integer(
        allow_none=True,
        metadata={"description": "While queued: jobs that start before this one (0: next). null if not known."},
    )
    estimated_start_seconds = fields.Float(
        allow_none=True,
        metadata={
            "description": "While queued: seconds until it should start, from the jobs ahead and the "
            "throughput of recent jobs; null until jobs have completed."
        },
    )
    webhook = fields.Nested(WebhookStateSchema, metadata={"description": "Present when callback_url was given."})


class MetricsSchema(Schema):
    queue_wait_time = fields.Float(allow_none=True, metadata={"description": "seconds"})
    processing_time = fields.Float(allow_none=True, metadata={"description": "seconds"})
    total_time = fields.Float(allow_none=True, metadata={"description": "seconds"})
    prompt_tokens = fields.Integer(allow_none=True)
    completion_tokens = fields.Integer(allow_none=True)
    tokens_per_second = fields.Float(allow_none=True)
    time_to_first_token = fields.Float(allow_none=True, metadata={"description": "seconds"})


class TaskResultSchema(TaskStatusSchema):
    """A finished task: `completed` with result and metrics, `error` with its type and message, or
    `cancelled` with the text generated until then and the metrics so far."""

    result = fields.String()
    finish_reason = fields.String(allow_none=True)
    metrics = fields.Nested(MetricsSchema)
    error_message = fields.String()
    error_type = fields.String()


class ErrorSchema(Schema):
    status = fields.String(required=True, metadata={"example": "error"})
    error_type = fields.String(required=True)
    error_message = fields.String(required=True)
    detail = fields.String(metadata={"description": "Same as error_message, for clients of the previous API."})
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "Messages per invalid field."},
    )
    task_ids = fields.List(
        fields.String(),
        metadata={
            "description": "On a submit's 503 when Redis did not answer in time: the tasks it may still queue "
            "(GET /status/<task_id> finds one if it was)."
        },
    )


class HealthSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(["healthy", "degraded"]))
    redis_connected = fields.Boolean(required=True)
    model_loaded = fields.Boolean(required=True)
    workers = fields.Integer(allow_none=True)
    queued_jobs = fields.Integer(allow_none=True)
    version = fields.String(required=True)


class IndexSchema(Schema):
    service = fields.String(required=True)
    version = fields.String(required=True)
    docs = fields.String(required=True)
    openapi = fields.String(required=True)


def document_request_limits(spec: Any, config: dict[str, Any]) -> None:
    """Write the configured limits and the prompt-or-messages rule into the spec's GenerateRequest and BatchRequest.

    marshmallow fields cannot carry limits that come from the app's config, nor "exactly one of".
    """
    spec.components.schemas["BatchRequest"]["properties"]["requests"]["maxItems"] = config["MAX_BATCH"]
    schema = spec.components.schemas["GenerateRequest"]
    properties = schema["properties"]
    properties["prompt"].update(minLength=1, maxLength=config["MAX_PROMPT_CHARS"], pattern=NOT_BLANK)
    properties["max_tokens"].update(minimum=1, maximum=config["MAX_NEW_TOKENS"], default=config["DEFAULT_MAX_TOKENS"])
    properties["top_p"]["exclusiveMinimum"] = True
    schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]
    callback = properties["callback_url"]
    if config["WEBHOOK_ALLOWED_HOSTS"] and config["WEBHOOK_SECRET_SET"]:
        hosts = "|".join(
            r"[^/:@]+" + re.escape(host[1:]) if host.startswith("*.") else re.escape(host)
            for host in config["WEBHOOK_ALLOWED_HOSTS"]
        )
        callback.update(format="uri", pattern=rf"^https?://({hosts})(:\d+)?(/[^\s]*)?$")
    else:
        callback.update(enum=[None], description="Webhooks are not enabled on this service.")
    message = spec.components.schemas["Message"]["properties"]["content"]
    message["maxLength"] = config["MAX_PROMPT_CHARS"]
    message["description"] = "All messages' contents together may have at most MAX_PROMPT_CHARS characters."
