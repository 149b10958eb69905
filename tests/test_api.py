"""The HTTP API against a real Redis: validation, auth, ownership, status and failure answers."""

from __future__ import annotations

import time

import pytest

from tests.conftest import KEY, OTHER_KEY, free_port, queued_count
from web import create_app

AUTH = {"X-API-Key": KEY}
VALID = {"prompt": "Say hello", "max_tokens": 8}


def assert_error_shape(response, status: int, error_type: str, field: str | None = None) -> None:
    body = response.get_json()
    assert response.status_code == status, body
    assert body["status"] == "error"
    assert body["error_type"] == error_type
    assert body["error_message"]
    if field is not None:
        assert field in body["errors"], body


def test_generate_returns_202_with_task_id_and_enqueues(client, redis_conn):
    response = client.post("/generate", json=VALID, headers=AUTH)
    body = response.get_json()
    assert response.status_code == 202
    assert body["status"] == "queued"
    assert len(body["task_id"]) == 36
    assert body["message"]
    assert queued_count(redis_conn) == 1


def test_status_and_result_of_queued_task(client):
    task_id = client.post("/generate", json=VALID, headers=AUTH).get_json()["task_id"]
    status = client.get(f"/status/{task_id}", headers=AUTH)
    assert status.status_code == 200
    # Nothing has completed yet, so there is no throughput to estimate the start from.
    assert status.get_json() == {
        "status": "queued",
        "task_id": task_id,
        "message": "Task is queued",
        "queue_position": 0,
        "estimated_start_seconds": None,
    }
    result = client.get(f"/result/{task_id}", headers=AUTH)
    assert result.status_code == 202
    assert result.get_json()["status"] == "queued"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages.0.content"),
        ({"prompt": 42}, "prompt"),
        ({"prompt": "hi", "max_tokens": "8"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 8.5}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 1025}, "max_tokens"),
        ({"prompt": "hi", "temperature": -0.1}, "temperature"),
        ({"prompt": "hi", "temperature": 2.01}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "stop": "###"}, "stop"),
        ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),  # vLLM takes 4
        ({"prompt": "hi", "seed": 2**63}, "seed"),  # vLLM takes 64 bits
        ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "hi", "seed": "x"}, "seed"),
        ({"prompt": "hi", "ignore_eos": 0}, "ignore_eos"),
        ({"prompt": "hi", "ignore_eos": "yes"}, "ignore_eos"),
        ({"prompt": "hi", "unknown": 1}, "unknown"),
        ({"prompt": "x" * 32_001}, "prompt"),
        (["not", "an", "object"], "body"),
        # JSON escapes of lone surrogates (the test client sends non-ASCII escaped): no character, so no text
        ({"prompt": "hi \ud800"}, "prompt"),
        ({"messages": [{"role": "user", "content": "\udfff"}]}, "messages.0.content"),
        ({"prompt": "hi", "stop": ["\ud800"]}, "stop.0"),
        ({"prompt": "hi", "user_id": "\ud83d"}, "user_id"),
    ],
)
def test_bad_input_is_400_naming_the_field_and_enqueues_nothing(client, redis_conn, body, field):
    response = client.post("/generate", json=body, headers=AUTH)
    assert_error_shape(response, 400, "validation_error", field)
    assert queued_count(redis_conn) == 0


@pytest.mark.parametrize("prompt", ["\x1d", "\x85 ", "\u3000\t", "\ufeff", "\u200b", " a ", "\x1ca"])
def test_the_spec_and_the_api_agree_on_what_a_blank_prompt_is(client, prompt):
    """The spec's pattern for `prompt`, read as schemathesis and other clients read it (ECMA-262 regular
    expressions), accepts exactly the prompts the API takes."""
    import jsonschema_rs

    spec = client.get("/openapi.json").get_json()
    prompt_schema = spec["components"]["schemas"]["GenerateRequest"]["properties"]["prompt"]
    documented = jsonschema_rs.validator_for({"type": "string", "pattern": prompt_schema["pattern"]})
    response = client.post("/generate", json={"prompt": prompt}, headers=AUTH)
    assert response.status_code in (202, 400)
    assert (response.status_code == 202) == documented.is_valid(prompt) == bool(prompt.strip())


def test_text_escaped_as_surrogate_pairs_is_accepted(client, redis_conn):
    body = b'{"prompt": "smile \\ud83d\\ude00", "stop": ["\\u00e9"]}'  # as JSON encoders write non-ASCII text
    response = client.post("/generate", data=body, headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 202
    assert queued_count(redis_conn) == 1


def test_non_json_body_is_400(client, redis_conn):
    response = client.post("/generate", data="prompt=hi{", headers={**AUTH, "Content-Type": "application/json"})
    assert_error_shape(response, 400, "validation_error", "body")
    assert queued_count(redis_conn) == 0


def test_json_without_json_content_type_is_accepted(client):
    response = client.post("/generate", data='{"prompt": "hi"}', headers={**AUTH, "Content-Type": "text/plain"})
    assert response.status_code == 202


def test_oversized_body_is_413(client, redis_conn):
    response = client.post("/generate", json={"prompt": "x" * 1_100_000}, headers=AUTH)
    assert_error_shape(response, 413, "payload_too_large")
    assert queued_count(redis_conn) == 0


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"}])
def test_missing_or_wrong_key_is_401(client, redis_conn, headers):
    for response in (
        client.post("/generate", json=VALID, headers=headers),
        client.get("/status/00000000-0000-0000-0000-000000000000", headers=headers),
        client.get("/result/00000000-0000-0000-0000-000000000000", headers=headers),
    ):
        assert_error_shape(response, 401, "unauthorized")
    assert queued_count(redis_conn) == 0


def test_no_configured_keys_refuses_requests(app_config, redis_conn):
    client = create_app({**app_config, "API_KEYS": []}).test_client()
    response = client.post("/generate", json=VALID, headers=AUTH)
    assert_error_shape(response, 503, "misconfigured")


@pytest.mark.parametrize("task_id", ["00000000-0000-0000-0000-000000000000", "not-a-uuid", "rq:job:x"])
def test_unknown_task_is_404(client, task_id):
    for path in (f"/status/{task_id}", f"/result/{task_id}"):
        assert_error_shape(client.get(path, headers=AUTH), 404, "not_found")


def test_other_keys_task_is_404_like_unknown(client):
    task_id = client.post("/generate", json=VALID, headers=AUTH).get_json()["task_id"]
    other = {"X-API-Key": OTHER_KEY}
    for path in (f"/status/{task_id}", f"/result/{task_id}"):
        response = client.get(path, headers=other)
        assert_error_shape(response, 404, "not_found")
        assert response.get_json()["error_message"] == f"no task {task_id}"


def test_redis_unreachable_at_submit_is_503_quickly(app_config):
    client = create_app({**app_config, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}).test_client()
    started = time.monotonic()
    response = client.post("/generate", json=VALID, headers=AUTH)
    elapsed = time.monotonic() - started
    assert_error_shape(response, 503, "queue_unavailable")
    assert response.headers["Retry-After"]
    assert elapsed < 1.0


def test_health_reports_each_part(client, app_config, redis_conn):
    body = client.get("/health").get_json()
    assert body["redis_connected"] is True
    assert body["model_loaded"] is True  # the stand-in answers /health
    assert body["workers"] == 0
    assert body["status"] == "degraded"  # no worker is listening
    assert client.get("/health").status_code == 503

    down = create_app({**app_config, "ENGINE_URL": f"http://127.0.0.1:{free_port()}"}).test_client()
    assert down.get("/health").get_json()["model_loaded"] is False


def test_health_with_redis_down_is_503(app_config):
    client = create_app({**app_config, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}).test_client()
    response = client.get("/health")
    assert response.status_code == 503
    assert response.get_json()["redis_connected"] is False


def test_index_openapi_and_docs_need_no_key(client):
    assert client.get("/").get_json()["docs"] == "/docs"
    spec = client.get("/openapi.json").get_json()
    assert set(spec["paths"]) >= {"/generate", "/status/{task_id}", "/result/{task_id}", "/health"}
    assert spec["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"
    assert "GenerateRequest" in spec["components"]["schemas"]
    docs = client.get("/docs", follow_redirects=True)
    assert docs.status_code == 200
    assert b'"url": "/openapi.json"' in docs.data
    assert client.get("/docs/swagger-ui-bundle.js").status_code == 200


def test_unknown_path_and_method_use_the_error_shape(client):
    assert_error_shape(client.get("/nowhere", headers=AUTH), 404, "not_found")
    assert_error_shape(client.get("/generate", headers=AUTH), 405, "method_not_allowed")


def test_metrics_needs_a_key_and_counts_jobs_by_state(client, redis_conn):
    assert_error_shape(client.get("/metrics"), 401, "unauthorized")
    ids = [client.post("/generate", json=VALID, headers=AUTH).get_json()["task_id"] for _ in range(11)]
    client.delete(f"/jobs/{ids[0]}", headers=AUTH)  # its fair-share slot goes to the next job
    response = client.get("/metrics", headers=AUTH)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    # FAIR_SHARE_SLOTS (8) of the key's jobs are in the queue, the other 2 wait for a slot.
    assert 'llm_queue_jobs{queue="llm-normal",state="queued"} 8.0' in text
    assert "llm_queue_fair_share_waiting 2.0" in text
    assert 'llm_queue_jobs{queue="llm-normal",state="canceled"} 1.0' in text
    assert 'llm_queue_jobs{queue="llm-normal",state="failed"} 0.0' in text
    assert "llm_queue_workers 0.0" in text
