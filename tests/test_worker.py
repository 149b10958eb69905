"""The job path through a real Redis and an in-process SimpleWorker, against the stand-in engine."""

from __future__ import annotations

import re

import pytest
from loguru import logger

from tests.conftest import KEY, SERVED_MODEL, free_port, run_worker
from tests.stand_in_engine import CONTEXT_ERROR
from web import create_app
from worker import jobs

AUTH = {"X-API-Key": KEY}


def submit(client, **body) -> str:
    response = client.post("/generate", json={"max_tokens": 16, **body}, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def finish(client, redis_conn, task_id: str) -> dict:
    run_worker(redis_conn)
    response = client.get(f"/result/{task_id}", headers=AUTH)
    assert response.status_code == 200
    return response.get_json()


def request_log_lines(log_dir) -> list[str]:
    logger.complete()
    return (log_dir / "llm_requests.log").read_text().splitlines()


def test_prompt_completes_with_text_metrics_and_log_line(client, redis_conn, worker_env, stand_in):
    task_id = submit(client, prompt="Say hello", temperature=0.2, top_p=0.9, stop=["\n"], seed=7, user_id="u1")
    body = finish(client, redis_conn, task_id)

    assert body["status"] == "completed"
    assert body["result"] == "Hello, world!"
    assert body["finish_reason"] == "stop"
    sent = stand_in.requests[-1]
    assert sent["model"] == SERVED_MODEL
    assert sent["prompt"] == "Say hello"
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (16, 0.2, 0.9)
    assert (sent["stop"], sent["seed"], sent["user"], sent["stream"]) == (["\n"], 7, "u1", True)

    metrics = body["metrics"]
    assert metrics["prompt_tokens"] == 2
    assert metrics["completion_tokens"] == 4
    assert metrics["total_time"] == pytest.approx(metrics["queue_wait_time"] + metrics["processing_time"], abs=2e-4)
    assert metrics["tokens_per_second"] == pytest.approx(4 / metrics["processing_time"], rel=0.01)
    assert 0 < metrics["time_to_first_token"] <= metrics["processing_time"]

    lines = request_log_lines(worker_env)
    assert len(lines) == 1
    assert re.fullmatch(
        rf"\[[\d\- :.]+\] task_id={task_id} status=success prompt_tokens=2 completion_tokens=4 "
        r"tokens_per_sec=[\d.]+ time_to_first_token=[\d.]+s queue_wait=[\d.]+s processing_time=[\d.]+s "
        r"total_time=[\d.]+s",
        lines[0],
    ), lines[0]
    assert client.get(f"/status/{task_id}", headers=AUTH).get_json()["status"] == "completed"


def test_messages_use_chat_completions(client, redis_conn, worker_env, stand_in):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    body = finish(client, redis_conn, submit(client, messages=messages))
    assert body["status"] == "completed"
    assert body["result"] == "Hello, world!"
    assert stand_in.requests[-1]["messages"] == messages
    assert "prompt" not in stand_in.requests[-1]


def assert_failed(body: dict, error_type: str) -> None:
    assert body["status"] == "error", body
    assert body["error_type"] == error_type
    assert body["error_message"]
    assert "result" not in body


def test_engine_4xx_is_error_with_engine_message(client, redis_conn, worker_env):
    task_id = submit(client, prompt="stand-in:status=400")
    body = finish(client, redis_conn, task_id)
    assert_failed(body, "engine_rejected")
    assert body["error_message"] == CONTEXT_ERROR
    line = request_log_lines(worker_env)[-1]
    assert f"task_id={task_id} status=error error_type=engine_rejected" in line


def test_engine_5xx_is_error(client, redis_conn, worker_env):
    body = finish(client, redis_conn, submit(client, prompt="stand-in:status=503"))
    assert_failed(body, "engine_error")
    assert "503" in body["error_message"]


def test_stream_dropped_midway_is_error(client, redis_conn, worker_env):
    body = finish(client, redis_conn, submit(client, prompt="stand-in:drop"))
    assert_failed(body, "engine_unavailable")


def test_engine_unreachable_is_error(client, redis_conn, worker_env, monkeypatch):
    monkeypatch.setenv("ENGINE_URL", f"http://127.0.0.1:{free_port()}")
    jobs.engine_client.cache_clear()
    body = finish(client, redis_conn, submit(client, prompt="hello"))
    assert_failed(body, "engine_unavailable")
    assert (worker_env / "errors.log").read_text().count("Traceback") >= 1


def test_job_over_time_limit_ends_as_timeout(app_config, redis_conn, worker_env):
    client = create_app({**app_config, "TASK_TIME_LIMIT": 1}).test_client()
    body = finish(client, redis_conn, submit(client, prompt="stand-in:sleep=3"))
    assert_failed(body, "timeout")
    assert "1 s" in body["error_message"]
    assert body["message"] == "Task failed"
