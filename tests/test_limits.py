"""Admission limits and what the logs may contain."""

from __future__ import annotations

import uuid

from loguru import logger

from tests.conftest import KEY, OTHER_KEY, queued_count, run_worker
from web import create_app
from worker import contract

AUTH = {"X-API-Key": KEY}
VALID = {"prompt": "Say hello", "max_tokens": 8}


def test_rate_limit_per_key_is_429_with_retry_after(app_config, redis_conn):
    app = create_app({**app_config, "RATE_LIMIT_PER_MINUTE": 3})
    first, second = app.test_client(), app.test_client()  # like two gunicorn workers: the count is in Redis
    codes = [client.post("/generate", json=VALID, headers=AUTH).status_code for client in (first, second) * 2]
    assert codes == [202, 202, 202, 429]
    limited = first.post("/generate", json=VALID, headers=AUTH)
    assert limited.status_code == 429
    body = limited.get_json()
    assert (body["status"], body["error_type"]) == ("error", "rate_limited")
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    assert first.post("/generate", json=VALID, headers={"X-API-Key": OTHER_KEY}).status_code == 202
    assert queued_count(redis_conn) == 4
    assert first.get("/health").status_code in (200, 503)  # reads are not limited


def test_rate_limit_counts_each_request_of_a_batch_but_not_a_refused_submit(app_config, redis_conn):
    client = create_app({**app_config, "RATE_LIMIT_PER_MINUTE": 5}).test_client()

    def batch(size: int):
        return client.post("/generate/batch", json={"requests": [VALID] * size}, headers=AUTH)

    assert batch(3).status_code == 202
    refused = batch(3)  # 6 > 5: refused whole, and its 3 are not counted
    assert refused.status_code == 429
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert batch(2).status_code == 202  # exactly 5
    never = batch(6)  # more than the limit itself: no wait would let it in, and the answer says so
    assert never.status_code == 429 and "a batch of 6 requests is more than the 5" in never.get_json()["error_message"]
    assert client.post("/generate", json=VALID, headers=AUTH).status_code == 429
    assert queued_count(redis_conn) == 5
    (counter,) = redis_conn.keys(f"{contract.KEY_PREFIX}rate:*")
    assert int(redis_conn.get(counter)) == 5
    assert 0 < redis_conn.ttl(counter) <= 60  # the window closes; the counter does not outlive it


def test_rate_limit_off_when_zero(app_config, redis_conn):
    client = create_app({**app_config, "RATE_LIMIT_PER_MINUTE": 0}).test_client()
    assert all(client.post("/generate", json=VALID, headers=AUTH).status_code == 202 for _ in range(20))


def test_queue_depth_cap_is_503_with_retry_after(app_config, redis_conn):
    client = create_app({**app_config, "MAX_QUEUED_JOBS": 3}).test_client()
    codes = [client.post("/generate", json=VALID, headers=AUTH).status_code for _ in range(5)]
    assert codes == [202, 202, 202, 503, 503]
    full = client.post("/generate", json=VALID, headers=AUTH)
    assert full.get_json()["error_type"] == "queue_full"
    assert full.headers["Retry-After"] == "5"
    assert queued_count(redis_conn) == 3


def all_logs(log_dir) -> str:
    logger.complete()
    return "".join(path.read_text() for path in log_dir.glob("*.log"))


def test_keys_prompts_and_outputs_stay_out_of_the_logs(app_config, redis_conn, worker_env):
    client = create_app({**app_config, "LOG_DIR": str(worker_env)}).test_client()
    secret_prompt = f"my secret prompt {uuid.uuid4()}"
    task_id = client.post("/generate", json={"prompt": secret_prompt}, headers=AUTH).get_json()["task_id"]
    client.post("/generate", json={"prompt": "stand-in:status=400 secret"}, headers=AUTH)
    client.post("/generate", json=VALID, headers={"X-API-Key": "a-wrong-key-value"})
    run_worker(redis_conn)
    logs = all_logs(worker_env)
    assert f"task_id={task_id} status=success" in logs
    for secret in (KEY, "a-wrong-key-value", secret_prompt, "Hello, world!"):
        assert secret not in logs


def test_log_prompts_setting_writes_them_to_the_request_log(app_config, redis_conn, worker_env, monkeypatch):
    from tests.conftest import reset_worker_caches

    monkeypatch.setenv("LOG_PROMPTS", "true")
    reset_worker_caches()
    client = create_app(app_config).test_client()
    client.post("/generate", json={"prompt": "tell me"}, headers=AUTH)
    run_worker(redis_conn)
    logger.complete()
    line = (worker_env / contract.REQUEST_LOG).read_text()
    assert "prompt='tell me' output='Hello, world!'" in line
