"""The real path: HTTP -> gunicorn/Flask -> Redis -> RQ worker process -> vLLM (CPU) -> result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis import Redis
from rq.job import Job

from tests.conftest import StreamEvents, cpus_of_tree, wait_until
from tests.e2e.conftest import E2E_MODEL, E2E_WORKERS, Service
from web.schemas import MAX_STOP, SEED_RANGE
from worker import contract
from worker.engine import EngineClient

pytestmark = pytest.mark.e2e
# Questions whose greedy answers do not hang on rounding. For "What is the capital of France?" SmolLM2's first
# token is a near-tie ("The" 0.155, "L" 0.140 in float32), and vLLM's bfloat16 on a CPU with AMX picks "L"
# ("L'Étoile, la Marseillaise, ..."). Here each token up to the answer leads the next likeliest by 0.44 or more
# (chat), and the answer's own token by 0.70 (prompt), in float32 and in bfloat16 on that CPU.
QUESTION = "What is the capital of Japan?"
ANSWER = "Tokyo"
PROMPT, COMPLETION = "The capital of France is", "Paris"


def submit(service: Service, body: dict) -> str:
    response = httpx.post(f"{service.url}/generate", json=body, headers=service.headers, timeout=5)
    assert response.status_code == 202, response.text
    return response.json()["task_id"]


def wait_result(service: Service, task_id: str, timeout: float = 180) -> dict:
    """Long-poll /result as a client would, until the task is finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Long poll, as gunicorn serves it in the Procfile (gevent workers).
        response = httpx.get(
            f"{service.url}/result/{task_id}", params={"wait": 10}, headers=service.headers, timeout=15
        )
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202, response.text
    pytest.fail(f"task {task_id} not finished after {timeout} s")


def logged(service: Service, line: str) -> None:
    """Wait for `line` in the request log: the workers write their logs through a queue, so it may follow the result."""
    log = service.log_dir / contract.REQUEST_LOG
    wait_until(lambda: log.exists() and line in log.read_text(), 10, f"{line!r} in {contract.REQUEST_LOG}")


def assert_consistent(metrics: dict) -> None:
    assert metrics["total_time"] == pytest.approx(metrics["queue_wait_time"] + metrics["processing_time"], abs=2e-4)
    assert metrics["tokens_per_second"] == pytest.approx(
        metrics["completion_tokens"] / metrics["processing_time"], rel=0.01
    )
    assert 0 < metrics["time_to_first_token"] <= metrics["processing_time"]
    assert metrics["prompt_tokens"] > 0
    assert metrics["completion_tokens"] > 0


def test_chat_question_is_answered_by_the_real_model(service):
    task_id = submit(service, {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40, "temperature": 0})
    body = wait_result(service, task_id)
    assert body["status"] == "completed", body
    assert ANSWER in body["result"]
    assert_consistent(body["metrics"])
    status = httpx.get(f"{service.url}/status/{task_id}", headers=service.headers).json()
    assert status["status"] == "completed"

    logged(service, f"task_id={task_id} status=success")


def test_prompt_is_completed_by_the_real_model(service):
    task_id = submit(service, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": ["\n"]})
    body = wait_result(service, task_id)
    assert body["status"] == "completed", body
    assert COMPLETION in body["result"]
    assert "\n" not in body["result"]
    assert_consistent(body["metrics"])


def test_the_real_engine_takes_what_the_api_accepts_at_its_limits(service):
    """The most stop strings and the widest seeds the API accepts: vLLM takes them too (a 202 does not become an
    error)."""
    stops, seeds = ["\n", "###", "\u00e9", "END"][:MAX_STOP], [SEED_RANGE.max, SEED_RANGE.min, -1]
    assert len(stops) == MAX_STOP
    ids = [submit(service, {"prompt": PROMPT, "max_tokens": 4, "stop": stops, "seed": seed}) for seed in seeds]
    for task_id in ids:
        body = wait_result(service, task_id)
        assert body["status"] == "completed", body


def test_concurrent_jobs_are_in_flight_together(service):
    ids = [submit(service, {"prompt": f"Count to {n}:", "max_tokens": 32, "temperature": 0}) for n in range(8)]
    bodies = [wait_result(service, task_id) for task_id in ids]
    assert [body["status"] for body in bodies] == ["completed"] * 8
    connection = Redis.from_url(service.redis_url)
    jobs = [Job.fetch(task_id, connection=connection) for task_id in ids]
    # With one job at a time no two processing intervals would overlap.
    overlapping = max(
        sum(1 for other in jobs if other.started_at < job.ended_at and job.started_at < other.ended_at) for job in jobs
    )
    assert overlapping >= 2


def test_prompt_longer_than_context_is_engine_error_with_its_message(service):
    task_id = submit(service, {"prompt": "word " * 3000, "max_tokens": 16})
    body = wait_result(service, task_id)
    assert body["status"] == "error", body
    assert body["error_type"] == "engine_rejected"
    assert "context" in body["error_message"].lower() or "2048" in body["error_message"]
    logged(service, f"task_id={task_id} status=error error_type=engine_rejected")


def test_health_and_rq_info_show_the_running_service(service):
    health = httpx.get(f"{service.url}/health", timeout=5)
    assert health.status_code == 200
    assert health.json() | {"version": None} == {
        "status": "healthy",
        "redis_connected": True,
        "model_loaded": True,
        "workers": E2E_WORKERS,
        "queued_jobs": 0,
        "version": None,
    }
    rq = Path(sys.executable).parent / "rq"
    out = subprocess.run([str(rq), "info", "--url", service.redis_url], capture_output=True, text=True, check=True)
    assert "llm-normal" in out.stdout
    assert f"{E2E_WORKERS} workers" in out.stdout


def test_the_workers_and_the_web_keep_off_the_models_cpus(service, vllm_supervisor):
    """SERVICE_CPUS=auto, the default: vLLM's CPU engine computes on every CPU but the last; the service keeps to it."""
    allowed = os.sched_getaffinity(0)
    if len(allowed) < 2:
        pytest.skip("one CPU: nothing to keep apart")
    last = max(allowed)
    model = [cpus for name, cpus in cpus_of_tree(vllm_supervisor[0].pid) if name == "VLLM::Worker"]
    assert len(model) == 1 and len(model[0]) == 1, model
    assert last not in contract.parse_cpu_list(model[0].pop())
    ours = cpus_of_tree(service.pids["worker"]) + cpus_of_tree(service.pids["web"])
    assert len(ours) >= 5  # the pool's parent and its processes, gunicorn's master and its 2 workers
    assert {name: cpus for name, cpus in ours if cpus != {str(last)}} == {}


def read_events(response: httpx.Response):
    """Yield {"id", "event", "data"} for each Server-Sent Event of a streaming response."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
        elif fields:
            yield {"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])}
            fields = {}


def test_stream_shows_the_real_engine_tokens_live_and_resumes(service):
    task_id = submit(service, {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40, "temperature": 0})
    url = f"{service.url}/stream/{task_id}"
    with httpx.stream("GET", url, headers=service.headers, timeout=120) as response:
        assert response.status_code == 200
        events = list(read_events(response))
    names = [event["event"] for event in events]
    assert names[0] == "queued" and "started" in names and names[-1] == "completed"
    text = "".join(event["data"]["text"] for event in events if event["event"] == "token")
    assert text == events[-1]["data"]["result"] == wait_result(service, task_id)["result"]
    assert ANSWER in text
    with httpx.stream("GET", url, headers={**service.headers, "Last-Event-ID": events[2]["id"]}, timeout=30) as again:
        assert list(read_events(again)) == events[3:]


def test_cancel_closes_the_real_engine_stream_and_keeps_the_partial_text(service):
    body = {"prompt": "Once upon a time", "max_tokens": 1000, "ignore_eos": True}
    task_id = submit(service, body)
    url = f"{service.url}/stream/{task_id}"
    tokens, final = [], None
    with httpx.stream("GET", url, headers=service.headers, timeout=120) as response:
        for event in read_events(response):
            if event["event"] == "token":
                tokens.append(event["data"]["text"])
                if len(tokens) == 5:
                    sent = time.monotonic()
                    cancel = httpx.delete(f"{service.url}/jobs/{task_id}", headers=service.headers, timeout=10)
                    answered = time.monotonic() - sent
            final = event
    assert cancel.status_code == 200, cancel.text
    assert answered < 1.5
    assert final["event"] == "cancelled"
    result = cancel.json()
    assert result == final["data"]
    assert result["status"] == "cancelled" and result["result"] == "".join(tokens)
    assert 0 < result["metrics"]["completion_tokens"] < 1000
    assert httpx.delete(f"{service.url}/jobs/{task_id}", headers=service.headers, timeout=10).status_code == 409
    connection = Redis.from_url(service.redis_url)
    assert Job.fetch(task_id, connection=connection).get_status() == "canceled"  # rq-dashboard lists it so


def test_the_real_engine_sends_one_event_per_stream_interval_and_the_same_text(vllm_engine):
    request = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "top_p": 1, "ignore_eos": True}
    answers = {}
    for interval in (1, 8):
        client = EngineClient(vllm_engine, E2E_MODEL, connect_timeout=5, read_timeout=60, stream_interval=interval)
        pieces = StreamEvents()
        answers[interval] = (client.generate(request, pieces), pieces)
        client.close()
    (every_token, one_each), (batched, eights) = answers[1], answers[8]
    assert batched.text == every_token.text and "".join(piece for piece, _ in eights) == batched.text
    assert batched.completion_tokens == every_token.completion_tokens == 24
    assert [tokens for _, tokens in one_each] == list(range(1, 25))
    # the first token alone, then 8, 8 and the last 7, each event with vLLM's count of the tokens so far
    assert [tokens for _, tokens in eights] == [1, 9, 17, 24]
    assert 0 < batched.time_to_first_token
