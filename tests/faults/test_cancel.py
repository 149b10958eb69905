"""Cancelling a running job on a real worker pool (`python -m worker`): RQ's stop-job command over pubsub."""

from __future__ import annotations

import time

import pytest
from rq.registry import CanceledJobRegistry

from tests.conftest import wait_until
from tests.faults.conftest import AUTH, MEASURED
from worker import contract


@pytest.mark.timeout(120)
def test_cancel_running_job_closes_the_engine_stream_and_keeps_the_partial_text(
    fault_client, fault_conn, fault_logs, start_pool, stand_in
):
    start_pool(concurrency=1)
    prompt = "stand-in:slow=0.1 cancel me"  # 40 tokens, one every 0.1 s
    response = fault_client.post("/generate", json={"prompt": prompt, "max_tokens": 64}, headers=AUTH)
    task_id = response.get_json()["task_id"]
    wait_until(lambda: fault_conn.xlen(contract.events_key(task_id)) >= 2, 20, "the job to start")  # queued, started
    time.sleep(0.5)  # a few of its tokens (nobody streams it: its text is in no event yet)

    sent = time.monotonic()
    response = fault_client.delete(f"/jobs/{task_id}", headers=AUTH)
    answered = time.monotonic() - sent
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "cancelled"
    assert body["result"].startswith(" tick") and body["result"].count("tick") < 40
    metrics = body["metrics"]
    assert metrics["completion_tokens"] == body["result"].count("tick")
    assert metrics["processing_time"] > 0 and metrics["total_time"] >= metrics["processing_time"]
    assert answered < 1.5
    wait_until(lambda: prompt in stand_in.aborted, 2, "the engine to see the client hang up")
    hung_up = time.monotonic() - sent

    assert task_id in CanceledJobRegistry(contract.QUEUE_NORMAL, connection=fault_conn).get_job_ids()
    assert fault_client.get(f"/result/{task_id}", headers=AUTH).get_json() == body
    assert fault_client.delete(f"/jobs/{task_id}", headers=AUTH).status_code == 409
    events = fault_conn.xrange(contract.events_key(task_id))
    assert events[-1][1][b"event"] == b"cancelled"
    wait_until(
        lambda: f"task_id={task_id} status=cancelled" in (fault_logs / contract.REQUEST_LOG).read_text(),
        5,
        "the request log line",
    )
    MEASURED["DELETE on a running job -> cancelled"] = (
        f"answered in {answered:.2f} s with {metrics['completion_tokens']} tokens kept; "
        f"engine saw the hang-up {hung_up:.2f} s after the DELETE"
    )
