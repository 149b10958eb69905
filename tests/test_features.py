"""Cancel, event streams, queue position and ETA, priorities and fair share, idempotency, batch, webhooks.

Real Redis, the service's worker class run in this process against the stand-in engine; webhooks go to
a receiver on 127.0.0.1. Cancelling a running job (a real worker pool) is in tests/faults/test_cancel.py,
and on the real engine in tests/e2e.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import CanceledJobRegistry, ScheduledJobRegistry
from rq.worker import SimpleWorker

from tests.conftest import KEY, OTHER_KEY, free_port, reset_worker_caches, run_worker, wait_until
from web import create_app, tasks
from web.errors import SubmitNotAnswered
from worker import contract
from worker.runner import EngineWorker

AUTH = {"X-API-Key": KEY}
OTHER = {"X-API-Key": OTHER_KEY}
SECRET = "test-webhook-secret"


def submit(client, prompt: str = "Say hello", headers=AUTH, **fields) -> str:
    response = client.post("/generate", json={"prompt": prompt, "max_tokens": 8, **fields}, headers=headers)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def parse_sse(text: str) -> list[dict]:
    """Split a Server-Sent Events body into [{"id", "event", "data"}], skipping comments."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            events.append({"id": fields["id"], "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def engine_prompts(stand_in, since: int) -> list[str]:
    return [body.get("prompt") for body in stand_in.requests[since:]]


# --- Cancel -------------------------------------------------------------------------------------


def test_cancel_queued_job_removes_it_and_keeps_it_as_cancelled(client, redis_conn, worker_env, stand_in):
    task_id = submit(client, "never run me")
    response = client.delete(f"/jobs/{task_id}", headers=AUTH)
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "cancelled" and body["result"] == ""
    assert body["metrics"]["processing_time"] is None and body["metrics"]["queue_wait_time"] >= 0
    assert task_id in CanceledJobRegistry(contract.QUEUE_NORMAL, connection=redis_conn).get_job_ids()
    assert Queue(contract.QUEUE_NORMAL, connection=redis_conn).count == 0
    assert 0 < redis_conn.ttl(f"rq:job:{task_id}") <= 3600  # kept as long as a result

    seen = len(stand_in.requests)
    run_worker(redis_conn)
    assert "never run me" not in engine_prompts(stand_in, seen)
    assert client.get(f"/result/{task_id}", headers=AUTH).get_json()["status"] == "cancelled"
    again = client.delete(f"/jobs/{task_id}", headers=AUTH)
    assert again.status_code == 409
    assert again.get_json()["error_message"] == f"task {task_id} is already cancelled; there is nothing to cancel"
    events = parse_sse(client.get(f"/stream/{task_id}", headers=AUTH).get_data(as_text=True))
    assert [event["event"] for event in events] == ["queued", "cancelled"]
    lines = (worker_env / contract.REQUEST_LOG).read_text()
    assert f"task_id={task_id} status=cancelled" in lines


def test_cancel_finished_job_is_409_and_other_keys_get_404(client, redis_conn, worker_env):
    task_id = submit(client)
    assert client.delete(f"/jobs/{task_id}", headers=OTHER).status_code == 404
    run_worker(redis_conn)
    response = client.delete(f"/jobs/{task_id}", headers=AUTH)
    assert response.status_code == 409
    assert response.get_json()["error_type"] == "already_finished"
    assert client.get(f"/result/{task_id}", headers=AUTH).get_json()["status"] == "completed"


def test_job_cancelled_as_a_worker_takes_it_never_reaches_the_engine(client, redis_conn, worker_env, stand_in):
    """The worker reads the cancel flag with the job, before sending anything, so DELETE racing the dequeue is safe."""
    task_id = submit(client, "cancelled in the race")
    redis_conn.set(contract.cancel_key(task_id), 1)  # as DELETE sets it, before RQ removes the job
    seen = len(stand_in.requests)
    run_worker(redis_conn)
    assert "cancelled in the race" not in engine_prompts(stand_in, seen)
    body = client.get(f"/result/{task_id}", headers=AUTH).get_json()
    assert body["status"] == "cancelled"
    assert task_id in CanceledJobRegistry(contract.QUEUE_NORMAL, connection=redis_conn).get_job_ids()


def test_job_request_reaches_the_engine_before_the_worker_records_its_start(client, redis_conn, worker_env, stand_in):
    """The worker sends a generation to the engine as soon as it has read the job, so the engine works on it
    during RQ's start transaction."""
    task_id = submit(client, "sent ahead")
    seen = len(stand_in.requests)
    at_start = []

    class Watching(EngineWorker):
        def prepare_job_execution(self, job, *args, **kwargs):
            deadline = time.monotonic() + 2
            while "sent ahead" not in engine_prompts(stand_in, seen) and time.monotonic() < deadline:
                time.sleep(0.01)
            at_start.append("sent ahead" in engine_prompts(stand_in, seen))
            return super().prepare_job_execution(job, *args, **kwargs)

    run_worker(redis_conn, Watching)
    assert at_start == [True]
    assert client.get(f"/result/{task_id}", headers=AUTH).get_json()["status"] == "completed"


def test_job_cancelled_after_its_worker_read_it_has_its_engine_request_cut(client, redis_conn, worker_env, stand_in):
    """DELETE landing between the worker's read of the job and its start transaction: the request already sent
    is dropped, so the engine sees its client leave, and the job ends cancelled."""
    prompt = "stand-in:slow=0.2 cancelled late"
    task_id = submit(client, prompt)

    class CancelledMeanwhile(EngineWorker):
        def prepare_job_execution(self, job, *args, **kwargs):
            redis_conn.set(contract.cancel_key(task_id), 1)  # as DELETE sets it
            return super().prepare_job_execution(job, *args, **kwargs)

    run_worker(redis_conn, CancelledMeanwhile)
    assert client.get(f"/result/{task_id}", headers=AUTH).get_json()["status"] == "cancelled"
    wait_until(lambda: prompt in stand_in.aborted, 5, "the engine to see the request dropped")


def test_cancel_job_waiting_for_its_retry(client, redis_conn, worker_env, monkeypatch, stand_in):
    """A job whose first attempt failed waits in RQ's scheduled registry; cancelling it ends it there."""
    monkeypatch.setenv("ENGINE_RETRY_BACKOFF", "30")
    reset_worker_caches()
    task_id = submit(client, "stand-in:fail-first=1 retry later")
    run_worker(redis_conn)  # attempt 1 fails with a 503; the retry is scheduled in 30 s
    status = client.get(f"/status/{task_id}", headers=AUTH).get_json()
    assert status["status"] == "queued" and status["attempt"] == 2
    assert status["queue_position"] is None  # waiting on the backoff, not in a queue

    response = client.delete(f"/jobs/{task_id}", headers=AUTH)
    assert response.status_code == 200 and response.get_json()["status"] == "cancelled"
    assert task_id not in ScheduledJobRegistry(contract.QUEUE_NORMAL, connection=redis_conn).get_job_ids()
    events = parse_sse(client.get(f"/stream/{task_id}", headers=AUTH).get_data(as_text=True))
    assert [event["event"] for event in events if event["event"] != "token"] == ["queued", "started", "cancelled"]


# --- Live output with resume -------------------------------------------------------------------


def test_stream_replays_a_finished_job_and_resumes_after_last_event_id(client, redis_conn, worker_env):
    task_id = submit(client)
    run_worker(redis_conn)
    response = client.get(f"/stream/{task_id}", headers=AUTH)
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = parse_sse(response.get_data(as_text=True))
    names = [event["event"] for event in events]
    assert names[:2] == ["queued", "started"] and names[-1] == "completed"
    assert set(names[2:-1]) == {"token"}
    assert events[0]["data"] == {"position": 0}
    assert events[1]["data"] == {"attempt": 1}
    final = events[-1]["data"]
    assert "".join(event["data"]["text"] for event in events if event["event"] == "token") == final["result"]
    assert final == client.get(f"/result/{task_id}", headers=AUTH).get_json()

    resumed = client.get(f"/stream/{task_id}", headers={**AUTH, "Last-Event-ID": events[1]["id"]})
    assert parse_sse(resumed.get_data(as_text=True)) == events[2:]
    bad = client.get(f"/stream/{task_id}", headers={**AUTH, "Last-Event-ID": "yesterday"})
    assert bad.status_code == 400
    assert client.get(f"/stream/{task_id}", headers=OTHER).status_code == 404


def test_stream_of_a_failed_job_ends_with_its_error(client, redis_conn, worker_env):
    task_id = submit(client, "stand-in:status=400")
    run_worker(redis_conn)
    events = parse_sse(client.get(f"/stream/{task_id}", headers=AUTH).get_data(as_text=True))
    assert events[-1]["event"] == "error"
    assert events[-1]["data"]["error_type"] == "engine_rejected"


def token_events(redis_conn, task_id: str) -> list[str]:
    entries = redis_conn.xrange(contract.events_key(task_id))
    return [json.loads(fields[b"data"])["text"] for _, fields in entries if fields[b"event"] == b"token"]


def test_a_job_nobody_streams_publishes_its_text_with_its_final_event_only(client, redis_conn, worker_env):
    """No client reads its events live, so its worker writes no token event while it runs (one every 0.25 s
    otherwise): the whole text goes in one, with the final event, and a later /stream still replays it."""
    task_id = submit(client, "stand-in:slow=0.02 nobody streams")  # 40 tokens over 0.8 s
    run_worker(redis_conn)
    result = client.get(f"/result/{task_id}", headers=AUTH).get_json()
    assert result["status"] == "completed"
    assert token_events(redis_conn, task_id) == [" tick" * 40] == [result["result"]]
    events = parse_sse(client.get(f"/stream/{task_id}", headers=AUTH).get_data(as_text=True))
    assert [event["event"] for event in events] == ["queued", "started", "token", "completed"]


def test_a_client_streaming_a_job_from_before_it_starts_gets_its_text_as_it_comes(client, redis_conn, worker_env):
    task_id = submit(client, "stand-in:slow=0.02 streamed from the start")
    response = client.get(f"/stream/{task_id}", headers=AUTH, buffered=False)  # marks the job before it starts
    run_worker(redis_conn)
    events = parse_sse(b"".join(response.response).decode())
    texts = [event["data"]["text"] for event in events if event["event"] == "token"]
    assert len(texts) >= 3  # one every 0.25 s of the 0.8 s, then the rest with the final event
    assert "".join(texts) == events[-1]["data"]["result"] == " tick" * 40


def test_a_client_that_starts_streaming_a_running_job_gets_its_text_so_far_at_once(client, redis_conn, worker_env):
    """The worker had started the job, unmarked, when the client came: the web tells it (RQ's pubsub channel), and it
    publishes what it holds with its next token."""
    task_id = submit(client, "stand-in:slow=0.05 streamed late")  # 40 tokens over 2 s
    worker = threading.Thread(target=run_worker, args=(redis_conn,))
    worker.start()
    try:
        status = lambda: client.get(f"/status/{task_id}", headers=AUTH).get_json()["status"]  # noqa: E731
        wait_until(lambda: status() == "processing", 5, "the job to start")
        time.sleep(0.5)
        assert token_events(redis_conn, task_id) == []  # nobody was reading
        response = client.get(f"/stream/{task_id}", headers=AUTH, buffered=False)
        connected, first_token_at, events = time.monotonic(), None, []
        for chunk in response.response:
            events += parse_sse(chunk.decode())
            if first_token_at is None and any(event["event"] == "token" for event in events):
                first_token_at = time.monotonic()
        ended = time.monotonic()
    finally:
        worker.join()
    texts = [event["data"]["text"] for event in events if event["event"] == "token"]
    assert first_token_at - connected < 0.5 and ended - first_token_at > 0.5
    assert len(texts[0]) >= len(" tick") * 5  # what it held: the 0.5 s before the client came
    assert "".join(texts) == events[-1]["data"]["result"] == " tick" * 40


@pytest.mark.parametrize("comes", ["before", "after"])
def test_a_client_who_comes_as_the_job_starts_gets_its_text_as_it_comes(client, redis_conn, worker_env, comes):
    """/stream lands just before the worker's start transaction (the worker reads the mark) or just after it (the web
    reads the worker's name and tells it): either way the job publishes its text while it runs."""
    task_id = submit(client, f"stand-in:slow=0.05 comes {comes} the start")  # 40 tokens over 2 s
    streams = []

    class Watched(EngineWorker):
        def prepare_job_execution(self, job, *args, **kwargs):
            if comes == "before":
                streams.append(client.get(f"/stream/{task_id}", headers=AUTH, buffered=False))
            super().prepare_job_execution(job, *args, **kwargs)
            if comes == "after":
                streams.append(client.get(f"/stream/{task_id}", headers=AUTH, buffered=False))

    run_worker(redis_conn, Watched)
    for stream in streams:
        stream.close()  # unread: its request context ends here
    texts = token_events(redis_conn, task_id)
    assert len(streams) == 1 and len(texts) >= 4  # one every 0.25 s of the 2 s (one in all without the client)
    assert "".join(texts) == " tick" * 40


def test_long_poll_returns_as_soon_as_the_final_event_is_published(client, redis_conn, worker_env):
    task_id = submit(client)
    answers = []

    def long_poll():
        response = client.get(f"/result/{task_id}?wait=20", headers=AUTH)
        answers.append((time.monotonic(), response.status_code, response.get_json()))

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.5)
    run_worker(redis_conn)
    finished = time.monotonic()
    poller.join(timeout=25)
    [(answered, code, body)] = answers
    assert (code, body["status"]) == (200, "completed")
    assert answered - finished < 2  # not the 20 s wait
    assert body == client.get(f"/result/{task_id}", headers=AUTH).get_json()  # the final event says what RQ stored


# --- Queue position and ETA --------------------------------------------------------------------


def test_queue_position_and_estimated_start_come_from_the_jobs_ahead_and_recent_throughput(
    client, redis_conn, worker_env
):
    submit(client, "warm up")
    run_worker(redis_conn)  # one completed job: its processing time is the recent history
    recent = [float(value) for value in redis_conn.lrange(contract.RECENT_PROCESSING_KEY, 0, -1)]
    assert len(recent) == 1 and recent[0] > 0

    ids = [submit(client, f"waiting {n}") for n in range(3)]
    statuses = [client.get(f"/status/{task_id}", headers=AUTH).get_json() for task_id in ids]
    assert [status["queue_position"] for status in statuses] == [0, 1, 2]
    assert {status["estimated_start_seconds"] for status in statuses} == {None}  # no worker registered

    queues = [Queue(name, connection=redis_conn) for name in contract.QUEUES]
    idle = SimpleWorker(queues, connection=redis_conn)
    idle.register_birth()  # one idle worker: the first job starts at once, each next one a mean job later
    try:
        etas = [client.get(f"/status/{task_id}", headers=AUTH).get_json()["estimated_start_seconds"] for task_id in ids]
    finally:
        idle.register_death()
    assert etas == [0.0, round(recent[0], 1), round(2 * recent[0], 1)]


# --- Priorities and fair share -----------------------------------------------------------------


def test_higher_priority_starts_first(app_config, redis_conn, worker_env, stand_in):
    client = create_app({**app_config, "FAIR_SHARE_SLOTS": 0}).test_client()
    for priority in ("low", "normal", "high"):
        submit(client, f"priority {priority}", priority=priority)
    seen = len(stand_in.requests)
    run_worker(redis_conn)
    assert engine_prompts(stand_in, seen) == ["priority high", "priority normal", "priority low"]


def test_an_aged_low_priority_job_goes_before_newer_high_ones(
    app_config, redis_conn, worker_env, stand_in, monkeypatch
):
    monkeypatch.setenv("PRIORITY_AGING", "1")
    client = create_app({**app_config, "FAIR_SHARE_SLOTS": 0}).test_client()
    submit(client, "old low", priority="low")
    time.sleep(1.2)
    submit(client, "new high", priority="high")
    seen = len(stand_in.requests)
    run_worker(redis_conn)
    assert engine_prompts(stand_in, seen) == ["old low", "new high"]


def test_one_keys_flood_does_not_starve_another_key(app_config, redis_conn, worker_env, stand_in):
    client = create_app({**app_config, "FAIR_SHARE_SLOTS": 2}).test_client()
    flood = [submit(client, f"flood {n}") for n in range(100)]
    other = submit(client, "other key", headers=OTHER)
    assert Queue(contract.QUEUE_NORMAL, connection=redis_conn).count == 3  # 2 of the flood, then the other key
    status = client.get(f"/status/{other}", headers=OTHER).get_json()
    assert status["status"] == "queued" and status["queue_position"] == 2
    held = client.get(f"/status/{flood[50]}", headers=AUTH).get_json()
    assert held["status"] == "queued" and held["queue_position"] == 3 + 48

    seen = len(stand_in.requests)
    run_worker(redis_conn)
    prompts = engine_prompts(stand_in, seen)
    assert prompts.index("other key") <= 2  # within the first round of worker slots
    assert sorted(prompts) == sorted([f"flood {n}" for n in range(100)] + ["other key"])
    assert [p for p in prompts if p.startswith("flood")] == [f"flood {n}" for n in range(100)]  # FIFO per key


def test_a_keys_high_job_is_not_held_behind_its_own_low_flood(app_config, redis_conn, worker_env, stand_in):
    client = create_app({**app_config, "FAIR_SHARE_SLOTS": 2}).test_client()
    for n in range(5):
        submit(client, f"low {n}", priority="low")
    high = submit(client, "high", priority="high")
    assert client.get(f"/status/{high}", headers=AUTH).get_json()["queue_position"] == 0
    seen = len(stand_in.requests)
    run_worker(redis_conn)
    assert engine_prompts(stand_in, seen) == ["high"] + [f"low {n}" for n in range(5)]


# --- Idempotent submit -------------------------------------------------------------------------


def test_submit_loads_the_admission_script_again_after_redis_lost_its_scripts(app_config, redis_conn):
    client = create_app({**app_config, "FAIR_SHARE_SLOTS": 2}).test_client()
    first = submit(client, "before the flush")
    assert redis_conn.script_exists(tasks.ADMISSION_SHA) == [True]
    redis_conn.script_flush()  # as after a Redis restart
    second = submit(client, "after the flush")
    third = submit(client, "held back by the fair share")
    assert redis_conn.script_exists(tasks.ADMISSION_SHA) == [True]
    queue = Queue(contract.QUEUE_NORMAL, connection=redis_conn)
    assert queue.get_job_ids() == [first, second]
    assert client.get(f"/status/{third}", headers=AUTH).get_json()["status"] == "queued"
    assert Job.fetch(third, connection=redis_conn).get_status() == "rate_limited"


def test_idempotency_key_returns_the_same_task_and_refuses_another_body(client, redis_conn):
    headers = {**AUTH, "Idempotency-Key": "order-42"}
    first = client.post("/generate", json={"prompt": "once"}, headers=headers)
    assert first.status_code == 202
    again = client.post("/generate", json={"prompt": "once"}, headers=headers)
    assert again.status_code == 200
    assert again.get_json()["task_id"] == first.get_json()["task_id"]
    assert again.get_json()["status"] == "queued"
    assert Queue(contract.QUEUE_NORMAL, connection=redis_conn).count == 1

    different = client.post("/generate", json={"prompt": "twice"}, headers=headers)
    assert different.status_code == 409
    assert different.get_json()["error_type"] == "idempotency_conflict"
    # Keys are per API key: another key's same Idempotency-Key is a different request.
    assert (
        client.post("/generate", json={"prompt": "once"}, headers={**OTHER, "Idempotency-Key": "order-42"}).status_code
        == 202
    )
    assert client.post("/generate", json={"prompt": "x"}, headers={**AUTH, "Idempotency-Key": ""}).status_code == 400


def test_idempotency_key_of_a_submit_not_known_to_be_queued_is_held_then_freed(client, redis_conn, monkeypatch):
    """A submit that timed out on Redis may still be queued: its key is held (409, retry) while its task may yet come,
    then freed if it never did."""
    headers = {**AUTH, "Idempotency-Key": "order-7"}
    body = {"prompt": "unknown outcome"}

    def timed_out(requests, owner, task_ids):  # as when Redis did not answer the submit's transaction in time
        raise SubmitNotAnswered(task_ids)

    batch_headers = {**AUTH, "Idempotency-Key": "batch-7"}
    monkeypatch.setattr(tasks, "submit", timed_out)
    for unknown in (
        client.post("/generate", json=body, headers=headers),
        client.post("/generate/batch", json={"requests": [body]}, headers=batch_headers),
    ):
        assert unknown.status_code == 503
        assert len(unknown.get_json()["task_ids"]) == 1
    monkeypatch.undo()
    for held in (
        client.post("/generate", json=body, headers=headers),
        client.post("/generate/batch", json={"requests": [body]}, headers=batch_headers),
    ):
        assert held.status_code == 409
        assert held.get_json()["error_type"] == "idempotency_in_progress"
        assert held.headers["Retry-After"] == "1"
    assert Queue(contract.QUEUE_NORMAL, connection=redis_conn).count == 0

    monkeypatch.setattr(tasks, "STALE_RESERVATION", 0.0)
    freed = client.post("/generate", json=body, headers=headers)
    assert freed.status_code == 202
    assert Queue(contract.QUEUE_NORMAL, connection=redis_conn).get_job_ids() == [freed.get_json()["task_id"]]
    assert client.post("/generate", json=body, headers=headers).get_json()["task_id"] == freed.get_json()["task_id"]


# --- Batch submit ------------------------------------------------------------------------------


def test_batch_returns_task_ids_in_order(client, redis_conn, worker_env, stand_in):
    requests = [{"prompt": f"batch {n}", "max_tokens": 4} for n in range(3)]
    requests[2]["priority"] = "high"
    response = client.post("/generate/batch", json={"requests": requests}, headers=AUTH)
    assert response.status_code == 202
    ids = response.get_json()["task_ids"]
    assert len(ids) == 3
    assert [Job.fetch(task_id, connection=redis_conn).args[0]["prompt"] for task_id in ids] == [
        "batch 0", "batch 1", "batch 2",
    ]  # fmt: skip
    assert Job.fetch(ids[2], connection=redis_conn).origin == contract.QUEUE_HIGH
    run_worker(redis_conn)
    assert {client.get(f"/result/{task_id}", headers=AUTH).get_json()["status"] for task_id in ids} == {"completed"}


def test_batch_with_one_bad_request_is_rejected_whole(app_config, redis_conn):
    client = create_app({**app_config, "MAX_BATCH": 3}).test_client()
    bad = [{"prompt": "fine"}, {"prompt": "too long", "max_tokens": 0}, {"prompt": "fine too"}]
    response = client.post("/generate/batch", json={"requests": bad}, headers=AUTH)
    assert response.status_code == 400
    assert list(response.get_json()["errors"]) == ["requests.1.max_tokens"]
    too_many = client.post("/generate/batch", json={"requests": [{"prompt": "x"}] * 4}, headers=AUTH)
    assert too_many.status_code == 400
    assert "at most 3 requests" in too_many.get_json()["error_message"]
    spec = client.get("/openapi.json").get_json()  # as the spec says, so its clients and schemathesis know
    assert spec["components"]["schemas"]["BatchRequest"]["properties"]["requests"]["maxItems"] == 3
    assert client.post("/generate/batch", json={"requests": []}, headers=AUTH).status_code == 400
    assert sum(Queue(name, connection=redis_conn).count for name in contract.QUEUES) == 0


# --- Webhooks ----------------------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that records webhook deliveries and answers the given statuses in turn."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.received: list[tuple[dict, bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(receiver.statuses.pop(0) if len(receiver.statuses) > 1 else receiver.statuses[0])
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_client(app_config, monkeypatch):
    for name, value in {
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_SECRET": SECRET,
    }.items():
        monkeypatch.setenv(name, value)
    config = {"WEBHOOK_ALLOWED_HOSTS": ["127.0.0.1", "localhost"], "WEBHOOK_ALLOW_PRIVATE": True}
    return create_app({**app_config, **config, "WEBHOOK_SECRET_SET": True}).test_client()


def deliver_webhooks(connection, with_scheduler: bool = False) -> None:
    SimpleWorker([Queue(contract.QUEUE_WEBHOOKS, connection=connection)], connection=connection).work(
        burst=True, with_scheduler=with_scheduler
    )


def test_webhook_posts_the_signed_result_and_reports_delivery(webhook_client, redis_conn, worker_env):
    receiver = Receiver([204])
    try:
        task_id = submit(webhook_client, callback_url=receiver.url)
        run_worker(redis_conn)
        assert webhook_client.get(f"/status/{task_id}", headers=AUTH).get_json()["webhook"] == {
            "status": "pending", "attempts": 0,
        }  # fmt: skip
        deliver_webhooks(redis_conn)
    finally:
        receiver.stop()
    [(headers, body)] = receiver.received
    signed = f"{headers['X-Webhook-Timestamp']}.".encode() + body
    expected = "sha256=" + hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Webhook-Signature"], expected)
    assert headers["X-Task-Id"] == task_id
    result = webhook_client.get(f"/result/{task_id}", headers=AUTH).get_json()
    assert json.loads(body) == {key: value for key, value in result.items() if key != "webhook"}
    assert result["webhook"] == {"status": "delivered", "attempts": 1, "last_status_code": 204}


def test_webhook_failure_is_retried_with_backoff(webhook_client, redis_conn, worker_env):
    receiver = Receiver([500, 200])
    try:
        task_id = submit(webhook_client, callback_url=receiver.url)
        run_worker(redis_conn)
        deliver_webhooks(redis_conn)
        state = webhook_client.get(f"/status/{task_id}", headers=AUTH).get_json()["webhook"]
        assert state == {
            "status": "retrying", "attempts": 1, "last_status_code": 500, "last_error": "the receiver answered 500",
        }  # fmt: skip
        time.sleep(1.2)  # the first retry is due after 1 s; RQ's scheduler puts it back in the queue
        deliver_webhooks(redis_conn, with_scheduler=True)
    finally:
        receiver.stop()
    assert len(receiver.received) == 2
    state = webhook_client.get(f"/status/{task_id}", headers=AUTH).get_json()["webhook"]
    assert state == {"status": "delivered", "attempts": 2, "last_status_code": 200}


def test_callback_urls_are_checked_against_the_allow_list_and_private_addresses(
    app_config, redis_conn, worker_env, monkeypatch
):
    monkeypatch.setenv("WEBHOOK_ALLOWED_HOSTS", "localhost,127.0.0.1,hooks.example.com")
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    config = {"WEBHOOK_ALLOWED_HOSTS": ["localhost", "127.0.0.1", "hooks.example.com"], "WEBHOOK_SECRET_SET": True}
    client = create_app({**app_config, **config}).test_client()

    def rejected(url: str) -> str:
        response = client.post("/generate", json={"prompt": "x", "callback_url": url}, headers=AUTH)
        assert response.status_code == 400
        return response.get_json()["errors"]["callback_url"][0]

    assert rejected("https://evil.example.org/hook") == "host evil.example.org is not in WEBHOOK_ALLOWED_HOSTS"
    assert rejected("ftp://hooks.example.com/x") == "must be an http:// or https:// URL with a host"
    assert rejected("http://127.0.0.1:9/hook").startswith("address 127.0.0.1 is not public")
    assert rejected("http://user:pw@hooks.example.com/") == "must not carry credentials"

    # A name is resolved when the webhook is sent: localhost resolves to a loopback address, refused.
    task_id = submit(client, callback_url="http://localhost:9/hook")
    run_worker(redis_conn)
    deliver_webhooks(redis_conn)
    state = client.get(f"/status/{task_id}", headers=AUTH).get_json()["webhook"]
    assert state["status"] == "refused" and state["attempts"] == 1
    assert "is not public" in state["last_error"]

    no_hooks = create_app({**app_config, "WEBHOOK_ALLOWED_HOSTS": []}).test_client()  # webhooks off
    response = no_hooks.post("/generate", json={"prompt": "x", "callback_url": "https://a.example/"}, headers=AUTH)
    assert response.status_code == 400
