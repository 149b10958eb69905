"""The job path through a real Redis and an in-process SimpleWorker, against the stand-in engine."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
import uuid

import httpx
import pytest
from loguru import logger

from tests.conftest import KEY, SERVED_MODEL, StreamEvents, free_port, queued_count, run_worker, wait_until
from tests.stand_in_engine import CONTEXT_ERROR, StandInEngine
from web import create_app
from worker import contract, jobs
from worker.engine import EngineClient, _read_stream, build_request
from worker.exceptions import EngineUnavailable
from worker.pool import ShutdownSignals
from worker.runner import TakenLineLater, _taken, release_taken_line

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


def test_the_line_for_a_job_taken_is_written_once_after_its_request_went_to_the_engine(
    client, redis_conn, worker_env, monkeypatch
):
    messages: list[str] = []
    written_before_the_request: list[list[str]] = []
    send = EngineClient.send

    def send_watched(self, payload):
        written_before_the_request.append(list(messages))
        send(self, payload)

    monkeypatch.setattr(EngineClient, "send", send_watched)
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="INFO")
    try:
        task_id = submit(client, prompt="Say hello")
        body = finish(client, redis_conn, task_id)
    finally:
        logger.remove(sink)
    assert body["status"] == "completed"
    taken = [message for message in messages if message.endswith(f"({task_id})")]
    assert len(taken) == 1, messages
    assert "llm-normal" in taken[0] and "generate max_tokens=16 priority=normal" in taken[0]
    assert len(written_before_the_request) == 1
    assert not any(task_id in message for message in written_before_the_request[0])


def test_a_held_line_for_a_job_taken_is_written_when_the_next_one_is_held():
    """The worker failed between taking a job and running it: its line is written when RQ writes the next one."""
    log = logging.getLogger("tests.taken_line")
    log.setLevel(logging.INFO)
    log.propagate = False
    written: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: written.append(record.getMessage())
    log.addHandler(handler)
    log.addFilter(TakenLineLater())
    _taken.holding = True
    try:
        log.info("Worker %s: %s: %s", "w1", "llm-normal", "first")
        assert written == []
        log.info("Worker %s: %s: %s", "w1", "llm-normal", "second")
        assert written == ["Worker w1: llm-normal: first"]
    finally:
        _taken.holding = False
    release_taken_line()
    assert written == ["Worker w1: llm-normal: first", "Worker w1: llm-normal: second"]


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_rq_registry_sweeps_are_logged_at_debug_only(tmp_path, redis_conn, worker_env, level):
    """RQ writes a line per queue at each sweep, every MAINTENANCE_INTERVAL; at INFO they would fill app.log."""
    folder = tmp_path / level
    contract.configure_logging(folder, level)
    run_worker(redis_conn)  # a worker sweeps the registries as it starts
    logger.complete()
    sweeps = [line for line in (folder / "app.log").read_text().splitlines() if "cleaning registries" in line]
    if level == "INFO":
        assert sweeps == []
    else:
        assert len(sweeps) == len(contract.QUEUES) and all("| DEBUG " in line for line in sweeps), sweeps


def test_a_stop_signal_that_comes_while_the_last_is_handled_is_taken_as_its_repeat():
    """The group's SIGTERM and the pool's forwarded SIGINT can land while the handler is writing its log line."""

    class Stoppable:
        stops = 0

        def stop_after_job(self) -> None:
            self.stops += 1

    workers = [Stoppable(), Stoppable()]
    handler = ShutdownSignals(workers, running=[])
    lines: list[str] = []

    def sink(message) -> None:
        lines.append(message.record["message"])
        if len(lines) == 1:
            handler(signal.SIGINT, None)  # the second signal, in the middle of the first one's log line

    sink_id = logger.add(sink, filter=lambda record: "shutdown" in record["message"], catch=False)
    try:
        handler(signal.SIGTERM, None)
    finally:
        logger.remove(sink_id)
    assert [worker.stops for worker in workers] == [1, 1]
    assert len(lines) == 1 and "warm shutdown, 2 workers finish their jobs" in lines[0]
    assert handler.requested_at is not None


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


def requests_with(stand_in, text: str) -> int:
    return sum(1 for body in stand_in.requests if body.get("prompt") == text)


def test_engine_4xx_is_error_with_engine_message_and_not_retried(client, redis_conn, worker_env, stand_in):
    prompt = f"stand-in:status=400 {uuid.uuid4()}"
    task_id = submit(client, prompt=prompt)
    body = finish(client, redis_conn, task_id)
    assert_failed(body, "engine_rejected")
    assert body["error_message"] == CONTEXT_ERROR
    assert requests_with(stand_in, prompt) == 1
    lines = request_log_lines(worker_env)
    assert len(lines) == 1
    assert f"task_id={task_id} status=error error_type=engine_rejected" in lines[0]


@pytest.mark.parametrize(("fault", "error_type"), [("status=503", "engine_error"), ("drop", "engine_unavailable")])
def test_engine_failure_is_retried_then_error_with_last_cause(
    client, redis_conn, worker_env, stand_in, fault, error_type
):
    prompt = f"stand-in:{fault} {uuid.uuid4()}"
    task_id = submit(client, prompt=prompt)
    body = finish(client, redis_conn, task_id)
    assert_failed(body, error_type)
    assert (body["attempt"], body["max_attempts"]) == (4, 4)
    assert requests_with(stand_in, prompt) == 4
    lines = request_log_lines(worker_env)
    assert len(lines) == 1, lines  # one line for the job, not one per attempt
    assert f"status=error error_type={error_type}" in lines[0]
    assert (worker_env / "app.log").read_text().count(f"job {task_id} attempt") == 3


def test_engine_failure_then_recovery_completes_once(client, redis_conn, worker_env, stand_in):
    prompt = f"stand-in:fail-first=2 {uuid.uuid4()}"
    task_id = submit(client, prompt=prompt)
    body = finish(client, redis_conn, task_id)
    assert body["status"] == "completed", body
    assert body["result"] == "Hello, world!"
    assert (body["attempt"], body["max_attempts"]) == (3, 4)
    assert requests_with(stand_in, prompt) == 3
    lines = request_log_lines(worker_env)
    assert len(lines) == 1
    assert f"task_id={task_id} status=success" in lines[0]


def test_retried_job_status_says_queued_again_and_which_attempt(client, redis_conn, worker_env, stand_in):
    from rq.job import Job

    from worker import contract, jobs

    task_id = submit(client, prompt="hello")
    job = Job.fetch(task_id, connection=redis_conn)
    job.meta[contract.META_ATTEMPT] = 1
    job.save_meta()
    jobs.on_failure(job, redis_conn, jobs.EngineServerError, jobs.EngineServerError("engine answered 502"), None)
    assert job.retries_left == 3 and job.retry_intervals == [0]
    status = client.get(f"/status/{task_id}", headers=AUTH).get_json()
    assert status["status"] == "queued"
    assert (status["attempt"], status["max_attempts"]) == (2, 4)
    assert "attempt 1 failed (engine_error)" in status["message"]


def test_backoff_doubles_per_attempt(worker_env, monkeypatch):
    from tests.conftest import reset_worker_caches

    monkeypatch.setenv("ENGINE_RETRY_BACKOFF", "2")
    reset_worker_caches()
    assert [jobs.retry_delay(attempt) for attempt in range(1, 7)] == [2, 4, 8, 16, 30, 30]


def test_job_over_time_limit_ends_as_timeout_without_retry(app_config, redis_conn, worker_env, stand_in):
    client = create_app({**app_config, "TASK_TIME_LIMIT": 1}).test_client()
    prompt = f"stand-in:sleep=3 {uuid.uuid4()}"
    body = finish(client, redis_conn, submit(client, prompt=prompt))
    assert_failed(body, "timeout")
    assert "1 s" in body["error_message"]
    assert body["message"] == "Task failed"
    assert requests_with(stand_in, prompt) == 1
    assert (worker_env / "errors.log").read_text().count("Traceback") == 1


def test_job_waiting_past_queue_ttl_expires_without_calling_the_engine(
    client, redis_conn, worker_env, stand_in, monkeypatch
):
    from tests.conftest import reset_worker_caches

    monkeypatch.setenv("QUEUE_TTL", "1")
    reset_worker_caches()
    prompt = f"expires {uuid.uuid4()}"
    task_id = submit(client, prompt=prompt)
    time.sleep(1.2)
    body = finish(client, redis_conn, task_id)
    assert_failed(body, "expired")
    assert "QUEUE_TTL" in body["error_message"]
    assert requests_with(stand_in, prompt) == 0


def test_timeout_closes_the_engine_stream(app_config, redis_conn, worker_env, stand_in):
    client = create_app({**app_config, "TASK_TIME_LIMIT": 1}).test_client()
    prompt = f"stand-in:slow=0.2 {uuid.uuid4()}"
    body = finish(client, redis_conn, submit(client, prompt=prompt))
    assert_failed(body, "timeout")
    wait_until(lambda: prompt in stand_in.aborted, 3, "the engine to see the request aborted")


def test_a_job_running_past_its_first_heartbeat_is_kept_alive_by_the_beat(
    client, redis_conn, worker_env, stand_in, monkeypatch
):
    from rq.registry import StartedJobRegistry

    from tests.conftest import reset_worker_caches
    from worker import contract

    monkeypatch.setenv("JOB_MONITORING_INTERVAL", "1")
    monkeypatch.setenv("HEARTBEAT_GRACE", "1")  # each heartbeat lives 2 s
    reset_worker_caches()
    task_id = submit(client, prompt=f"stand-in:sleep=6 {uuid.uuid4()}")
    registry = StartedJobRegistry(contract.QUEUE_NORMAL, connection=redis_conn)
    still_running = []

    def sweep() -> None:
        wait_until(lambda: task_id in registry.get_job_ids(), 10, "the job to start")
        time.sleep(3)  # past the 2 s of the heartbeat the job started with
        registry.cleanup()  # RQ's sweep: a job whose heartbeat expired is taken as abandoned
        still_running.append(task_id in registry.get_job_ids())

    sweeper = threading.Thread(target=sweep)
    sweeper.start()
    run_worker(redis_conn)  # in this thread: RQ's worker sets signal handlers
    sweeper.join()
    assert still_running == [True]
    body = client.get(f"/result/{task_id}", headers=AUTH).get_json()
    assert body["status"] == "completed"
    assert "attempt" not in body  # never retried


def test_a_job_the_sweep_took_up_while_its_worker_had_lost_redis_runs_once_more_not_twice(
    client, redis_conn, worker_env, stand_in, log_dir, monkeypatch
):
    """Redis is away longer than a running job's heartbeat lives. Once it is back, another worker's sweep takes the
    job up as abandoned (its failure callback, then a retry) before the job's own worker, whose write failed, handles
    that failure: the worker then leaves the job to the sweep instead of queuing it a second time."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from rq.job import Job
    from rq.registry import StartedJobRegistry
    from rq.results import Result

    from worker.runner import EngineDeadline

    prompt = f"swept {uuid.uuid4()}"
    task_id = submit(client, prompt=prompt, max_tokens=4)
    registry = StartedJobRegistry(contract.QUEUE_NORMAL, connection=redis_conn, death_penalty_class=EngineDeadline)
    add = jobs.TokenPublisher.add

    def lose_redis(publisher, piece, tokens):
        if publisher.task_id == task_id and requests_with(stand_in, prompt) == 1:  # its first attempt
            for member in redis_conn.zrange(registry.key, 0, -1):
                redis_conn.zadd(registry.key, {member: 1}, xx=True)  # its heartbeat expired long ago
            registry.cleanup()  # another worker's sweep
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        add(publisher, piece, tokens)

    monkeypatch.setattr(jobs.TokenPublisher, "add", lose_redis)
    body = finish(client, redis_conn, task_id)
    assert body["status"] == "completed"
    assert body["attempt"] == 2
    assert requests_with(stand_in, prompt) == 2
    assert [result.type for result in Job.fetch(task_id, connection=redis_conn).results()] == [Result.Type.SUCCESSFUL]
    assert queued_count(redis_conn) == 0
    logger.complete()
    assert "taken up by the registry sweep while this worker had lost Redis" in (log_dir / "app.log").read_text()
    assert sum(f"task_id={task_id} status=success" in line for line in request_log_lines(log_dir)) == 1


def test_ignore_eos_is_forwarded_for_fixed_length_output(client, redis_conn, worker_env, stand_in):
    prompt = f"fixed length {uuid.uuid4()}"
    body = finish(client, redis_conn, submit(client, prompt=prompt, max_tokens=5, ignore_eos=True))
    assert body["status"] == "completed"
    assert body["result"] == " tok" * 5
    assert body["metrics"]["completion_tokens"] == 5
    assert stand_in.requests[-1]["ignore_eos"] is True


def test_time_to_first_token_stops_at_the_first_token_even_without_text():
    """vLLM's first event may carry a special token, whose text is empty: that is still the first token."""
    sent_at, first_event_read, pieces = time.monotonic(), [], StreamEvents()

    def events():
        yield {"choices": [{"index": 0, "text": "", "finish_reason": None}]}
        first_event_read.append(time.monotonic())
        time.sleep(0.05)
        yield {"choices": [{"index": 0, "text": "Hi", "finish_reason": "length"}]}
        yield {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}

    completion = _read_stream(events(), sent_at, pieces)
    assert (completion.text, completion.finish_reason, completion.completion_tokens) == ("Hi", "length", 2)
    assert 0 <= completion.time_to_first_token <= first_event_read[0] - sent_at
    assert pieces == [("", 1), ("Hi", 2)]  # one call per token, so that a cancelled job's count has both


def test_a_chat_streams_role_announcement_is_not_its_first_token():
    sent_at, role_read, pieces = time.monotonic(), [], StreamEvents()

    def events():
        yield {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        role_read.append(time.monotonic())
        time.sleep(0.05)
        yield {"choices": [{"index": 0, "delta": {"content": "Paris"}, "finish_reason": "stop"}]}

    completion = _read_stream(events(), sent_at, pieces)
    assert completion.text == "Paris" and pieces == [("Paris", 1)]
    assert completion.time_to_first_token >= role_read[0] + 0.05 - sent_at


def test_a_cancelled_jobs_partial_counts_tokens_without_text_and_its_ttft_from_the_request():
    sent_at = time.monotonic() - 0.2  # the request went to the engine before the publisher was made
    tokens = jobs.TokenPublisher(None, "task", interval=60, started=sent_at)  # 60 s: nothing to publish yet
    for piece, generated in (("", 1), ("Once", 2), (" upon", 9)):  # the last event had 7 more tokens
        tokens.add(piece, generated)
    partial = tokens.partial()
    assert partial[contract.RESULT_TEXT] == "Once upon"
    assert partial[contract.RESULT_COMPLETION_TOKENS] == 9
    assert partial[contract.RESULT_TTFT] >= 0.2


def test_a_stream_interval_is_asked_of_the_engine_only_when_over_one():
    payload = {"prompt": "hi", "max_tokens": 3, "temperature": 0, "top_p": 1}
    for plain in (build_request(payload, SERVED_MODEL)[1], build_request(payload, SERVED_MODEL, 1)[1]):
        assert "stream_interval" not in plain and plain["stream_options"] == {"include_usage": True}
    batched = build_request(payload, SERVED_MODEL, 8)[1]
    assert batched["stream_interval"] == 8
    assert batched["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def test_the_stand_in_sends_one_event_per_stream_interval_as_vllm_does():
    engine = StandInEngine(free_port()).start()
    try:
        for chat in (False, True):
            text = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
            request = {**text, "max_tokens": 24, "temperature": 0, "top_p": 1, "ignore_eos": True}
            client = EngineClient(engine.url, SERVED_MODEL, connect_timeout=2, read_timeout=10, stream_interval=8)
            pieces = StreamEvents()
            completion = client.generate(request, pieces)
            client.close()
            # the first alone, then 8, 8, the last 7, each event with the tokens generated so far
            assert pieces == [(" tok", 1), (" tok" * 8, 9), (" tok" * 8, 17), (" tok" * 7, 24)]
            assert (completion.text, completion.completion_tokens) == (" tok" * 24, 24)
    finally:
        engine.stop()


def test_the_stand_in_refuses_a_stream_interval_under_one_as_vllm_does():
    engine = StandInEngine(free_port()).start()
    try:
        request = {"model": SERVED_MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
        for interval in (0, -1, 1.5):
            answer = httpx.post(f"{engine.url}/v1/completions", json={**request, "stream_interval": interval})
            assert answer.status_code == 400, interval
            assert answer.json()["error"]["type"] == "BadRequestError"
        assert httpx.post(f"{engine.url}/v1/completions", json={**request, "stream_interval": 2}).status_code == 200
    finally:
        engine.stop()


def test_engine_client_keeps_one_connection_and_replaces_one_the_engine_closed():
    engine = StandInEngine(free_port(), idle_timeout=0.3).start()
    try:
        client = EngineClient(engine.url, SERVED_MODEL, connect_timeout=2, read_timeout=10)
        request = {"prompt": "hi", "max_tokens": 3, "temperature": 0, "top_p": 1, "ignore_eos": True}
        texts = [client.generate(request).text for _ in range(3)]
        assert texts == [" tok" * 3] * 3
        assert engine.connections == 1  # kept alive from one request to the next

        time.sleep(0.6)  # the engine closes the idle connection, as uvicorn does after its keep-alive timeout
        assert client.generate(request).completion_tokens == 3
        assert engine.connections == 2

        with pytest.raises(EngineUnavailable):  # cut off mid-stream: that connection is not used again
            client.generate({**request, "prompt": "stand-in:drop", "ignore_eos": False})
        assert client.generate(request).completion_tokens == 3
        assert engine.connections == 3
    finally:
        engine.stop()


def test_result_wait_answers_as_soon_as_the_task_finishes(client, redis_conn, worker_env):
    task_id = submit(client, prompt="long poll")
    answers = []

    def long_poll() -> None:
        started = time.monotonic()
        response = client.get(f"/result/{task_id}?wait=20", headers=AUTH)
        answers.append((response.status_code, response.get_json(), time.monotonic() - started))

    waiter = threading.Thread(target=long_poll)
    waiter.start()
    time.sleep(0.5)
    run_worker(redis_conn)
    waiter.join(timeout=25)
    code, body, elapsed = answers[0]
    assert (code, body["status"], body["result"]) == (200, "completed", "Hello, world!")
    assert 0.5 <= elapsed < 5


def test_result_wait_gives_up_after_the_wait(client, redis_conn):
    task_id = submit(client, prompt="nobody works")
    started = time.monotonic()
    response = client.get(f"/result/{task_id}?wait=1", headers=AUTH)
    assert response.status_code == 202
    assert 1 <= time.monotonic() - started < 3
    assert client.get(f"/result/{task_id}?wait=31", headers=AUTH).status_code == 400


def test_metrics_count_finished_and_failed_jobs(client, redis_conn, worker_env):
    finish(client, redis_conn, submit(client, prompt="ok"))
    finish(client, redis_conn, submit(client, prompt=f"stand-in:status=400 {uuid.uuid4()}"))
    text = client.get("/metrics", headers=AUTH).get_data(as_text=True)
    assert 'llm_queue_jobs{queue="llm-normal",state="finished"} 1.0' in text
    assert 'llm_queue_jobs{queue="llm-normal",state="failed"} 1.0' in text
    assert 'llm_queue_jobs{queue="llm-normal",state="queued"} 0.0' in text


def test_a_job_that_cannot_reach_the_engine_makes_every_worker_check_it_first(client, redis_conn, worker_env):
    from rq import Queue
    from rq.job import Job

    from worker import contract, jobs
    from worker.exceptions import EngineUnavailable
    from worker.runner import EngineWorker

    task_id = submit(client, prompt="Say hello")
    job = Job.fetch(task_id, connection=redis_conn)
    error = EngineUnavailable("engine connection failed")
    jobs.on_failure(job, redis_conn, EngineUnavailable, error, None)
    assert redis_conn.exists(contract.ENGINE_DOWN_KEY)

    worker = EngineWorker([Queue(name, connection=redis_conn) for name in contract.QUEUES], connection=redis_conn)
    worker._engine_seen = True  # a worker that has taken jobs before still checks the engine now
    worker.check_for_suspension(burst=False)  # the work loop's one read per job: suspended? engine down?
    assert worker._engine_down
    worker._wait_for_engine()  # the stand-in answers its health check: the mark is cleared for the pool
    assert not redis_conn.exists(contract.ENGINE_DOWN_KEY)


def test_a_worker_starting_before_the_engine_waits_without_a_warning_one_that_saw_it_warns(
    redis_conn, worker_env, monkeypatch
):
    from rq import Queue

    from tests.conftest import reset_worker_caches
    from worker.runner import EngineWorker

    port = free_port()
    monkeypatch.setenv("ENGINE_URL", f"http://127.0.0.1:{port}")
    reset_worker_caches()
    records: list[tuple[str, str]] = []
    sink = logger.add(lambda message: records.append((message.record["level"].name, message.record["message"])))
    queues = [Queue(name, connection=redis_conn) for name in contract.QUEUES]

    def wait_while_the_engine_comes_up(worker: EngineWorker) -> None:
        engines: list[StandInEngine] = []  # the stand-in listens once made: made as it comes up
        threading.Timer(1.5, lambda: engines.append(StandInEngine(port).start())).start()
        try:
            worker._wait_for_engine()
        finally:
            wait_until(lambda: bool(engines), 5, "the stand-in engine")
            engines[0].stop()

    try:
        for seen in (False, True):
            worker = EngineWorker(queues, connection=redis_conn)
            worker._engine_seen = worker._engine_down = seen  # seen: up before, then marked down by a job
            records.clear()
            wait_while_the_engine_comes_up(worker)
            assert worker._engine_seen
            waiting = [record for record in records if "is not ready; waiting before taking jobs" in record[1]]
            back = [record for record in records if record[1].startswith("engine is")]
            if seen:  # the engine went away after this worker had used it
                assert [level for level, _ in waiting] == ["WARNING"]
                assert back[0][1].startswith("engine is back after")
            else:  # starting with the engine, as `make run` does
                assert [level for level, _ in waiting] == ["INFO"]
                assert back[0][1].startswith("engine is ready after")
    finally:
        logger.remove(sink)


def test_rq_suspend_stops_the_workers_after_the_job_they_are_running(client, redis_conn, worker_env):
    from rq.suspension import resume, suspend

    running = submit(client, prompt="stand-in:sleep=1 finish me")
    waiting = submit(client, prompt="Say hello")
    suspender = threading.Timer(0.3, suspend, args=(redis_conn,))  # `rq suspend`, while the first job runs
    suspender.start()
    run_worker(redis_conn)  # burst mode: a suspended worker exits instead of taking the next job
    suspender.join()
    assert client.get(f"/result/{running}", headers=AUTH).get_json()["status"] == "completed"
    assert client.get(f"/status/{waiting}", headers=AUTH).get_json()["status"] == "queued"
    resume(redis_conn)
    assert finish(client, redis_conn, waiting)["status"] == "completed"


def test_time_limit_holds_for_a_worker_outside_the_main_thread(app_config, redis_conn, worker_env, stand_in):
    client = create_app({**app_config, "TASK_TIME_LIMIT": 1}).test_client()
    prompt = f"stand-in:slow=0.2 {uuid.uuid4()}"  # 40 tokens over 8 s: each read is quick, the whole is not
    task_id = submit(client, prompt=prompt)
    worker = threading.Thread(target=run_worker, args=(redis_conn,))  # as in a worker process of the pool
    worker.start()
    worker.join(30)
    body = client.get(f"/result/{task_id}", headers=AUTH).get_json()
    assert_failed(body, "timeout")
    assert "1 s" in body["error_message"]
    wait_until(lambda: prompt in stand_in.aborted, 3, "the engine to see the request aborted")


def test_a_taken_job_waits_in_the_intermediate_list_until_it_starts(client, redis_conn, worker_env):
    from rq import Queue

    from worker import contract
    from worker.runner import EngineWorker

    task_id = submit(client, prompt="Say hello")
    assert redis_conn.llen(contract.WAKE_KEY) == 1  # one wake entry per submitted job
    queues = [Queue(name, connection=redis_conn) for name in contract.QUEUES]
    job, queue = EngineWorker(queues, connection=redis_conn).dequeue_job_and_maintain_ttl(None)  # as a worker takes it
    assert job.id == task_id and job.args[0]["prompt"] == "Say hello"  # read in the same step
    assert job.meta[contract.META_OWNER] and not job.cancel_requested
    assert queue.count == 0 and queue.intermediate_queue.get_job_ids() == [task_id]
    assert redis_conn.llen(contract.WAKE_KEY) == 0
    queue.push_job_id(task_id)  # and back, as if the take had not happened
    queue.intermediate_queue.remove(task_id)

    body = finish(client, redis_conn, task_id)
    assert body["status"] == "completed"
    assert queue.intermediate_queue.get_job_ids() == []  # the start transaction took it out


def test_the_take_passes_over_a_deleted_job_and_reads_a_cancel_asked_before_it(client, redis_conn, worker_env):
    from rq import Queue
    from rq.job import Job

    from worker import contract
    from worker.runner import EngineWorker

    deleted = submit(client, prompt="deleted while it waited")
    cancelled = submit(client, prompt="cancelled while it waited")
    Job.fetch(deleted, connection=redis_conn).delete(remove_from_queue=False)  # its id stays in the queue
    redis_conn.set(contract.cancel_key(cancelled), 1)
    queues = [Queue(name, connection=redis_conn) for name in contract.QUEUES]
    job, queue = EngineWorker(queues, connection=redis_conn).dequeue_job_and_maintain_ttl(None)
    assert job.id == cancelled and job.cancel_requested
    assert queue.count == 0


def test_a_worker_woken_for_one_of_two_jobs_leaves_the_other_its_wake_entry(client, redis_conn, worker_env):
    """One idle worker, then a batch of two: the worker's wait took one wake entry, so its take must not pop the
    other job's, which wakes the next idle worker (without it, that job waits for a worker's wait to end)."""
    from rq import Queue

    from worker import contract
    from worker.runner import EngineQueue

    queues = [Queue(name, connection=redis_conn) for name in contract.QUEUES]
    taken = []
    waiting = threading.Thread(target=lambda: taken.append(EngineQueue.dequeue_any(queues, 5, connection=redis_conn)))
    waiting.start()
    wait_until(lambda: any(c["cmd"] == "blpop" for c in redis_conn.client_list()), 5, "the worker to wait for a job")
    batch = {"requests": [{"prompt": "first", "max_tokens": 4}, {"prompt": "second", "max_tokens": 4}]}
    response = client.post("/generate/batch", json=batch, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    waiting.join(5)
    first, second = response.get_json()["task_ids"]
    assert taken[0][0].id == first
    assert Queue(contract.QUEUE_NORMAL, connection=redis_conn).job_ids == [second]
    assert redis_conn.llen(contract.WAKE_KEY) == 1


def test_a_job_let_in_by_the_fair_share_gets_a_wake_entry_of_its_own(client, redis_conn, worker_env):
    """A key's job held back by FAIR_SHARE_SLOTS enters the queue when a slot frees: an idle worker must be woken."""
    from rq import Queue

    from worker import contract
    from worker.runner import EngineWorker

    client.application.config["FAIR_SHARE_SLOTS"] = 1
    running, held = submit(client, prompt="holds the slot"), submit(client, prompt="held back")
    normal = Queue(contract.QUEUE_NORMAL, connection=redis_conn)
    assert normal.job_ids == [running]
    redis_conn.delete(contract.WAKE_KEY)  # the submits' entries, used up by the workers of a live pool
    queues = [Queue(name, connection=redis_conn) for name in contract.QUEUES]
    EngineWorker(queues, connection=redis_conn).work(burst=True, max_jobs=1)  # its end lets the held job in
    assert normal.job_ids == [held]
    assert redis_conn.llen(contract.WAKE_KEY) == 1
    run_worker(redis_conn)
    assert [client.get(f"/status/{task_id}", headers=AUTH).get_json()["status"] for task_id in (running, held)] == [
        "completed",
        "completed",
    ]


def test_a_job_whose_worker_died_before_starting_it_is_run_by_another(client, redis_conn, worker_env, stand_in):
    prompt = f"taken then dropped {uuid.uuid4()}"
    task_id = submit(client, prompt=prompt)
    sweep_after_taker_died(redis_conn, task_id)
    status = client.get(f"/status/{task_id}", headers=AUTH).get_json()
    assert status["status"] == "queued" and "after attempt 1 failed (worker_died)" in status["message"], status

    body = finish(client, redis_conn, task_id)
    assert body["status"] == "completed", body
    assert requests_with(stand_in, prompt) == 1


def test_a_job_stuck_in_the_intermediate_list_with_no_retry_left_ends_as_worker_died(
    client, redis_conn, worker_env, stand_in
):
    from rq.job import Job

    from worker import contract

    prompt = f"taken then dropped, last attempt {uuid.uuid4()}"
    task_id = submit(client, prompt=prompt)
    redis_conn.hset(Job.key_for(task_id), "retries_left", 0)
    sweep_after_taker_died(redis_conn, task_id)

    response = client.get(f"/result/{task_id}", headers=AUTH)
    assert response.status_code == 200
    assert_failed(response.get_json(), "worker_died")
    [(_, final)] = redis_conn.xrevrange(contract.events_key(task_id), count=1)
    assert final[b"event"] == b"error"
    assert redis_conn.xlen(contract.finished_key(task_id)) == 1  # what long polls wait on
    lines = request_log_lines(worker_env)
    assert len(lines) == 1 and f"task_id={task_id} status=error error_type=worker_died" in lines[0]
    assert requests_with(stand_in, prompt) == 0


def sweep_after_taker_died(redis_conn, task_id: str) -> None:
    """A worker takes the job and dies before starting it; RQ's sweep finds it in the intermediate list, then
    again over a minute later, and fails it."""
    from rq import Queue

    from worker import contract
    from worker.runner import EngineWorker

    queues = [Queue(name, connection=redis_conn) for name in contract.QUEUES]
    job, queue = EngineWorker(queues, connection=redis_conn).dequeue_job_and_maintain_ttl(None)
    assert job.id == task_id
    sweeper = EngineWorker(queues, connection=redis_conn)
    queue.intermediate_queue.cleanup(sweeper, queue)  # RQ's sweep: first seen now
    redis_conn.set(queue.intermediate_queue.get_first_seen_key(task_id), time.time() - 120)  # a sweep 2 min later
    queue.intermediate_queue.cleanup(sweeper, queue)
    assert queue.intermediate_queue.get_job_ids() == []


class _DumpsOnly:
    dumps = staticmethod(lambda obj: b"")


class _LoadsBlocked:
    dumps = staticmethod(lambda obj: b"")
    loads = None


@pytest.mark.parametrize("candidate", ["DefaultSerializer", "JSONSerializer", "json instance", "object", "dumps only",
                                       "loads None", "module"])  # fmt: skip
def test_the_quick_serializer_check_answers_as_rqs_protocol(candidate):
    import pickle

    from rq import queue as rq_queue  # keeps RQ's own Protocol, imported before any swap
    from rq.serializers import DefaultSerializer, JSONSerializer

    value = {
        "DefaultSerializer": DefaultSerializer,
        "JSONSerializer": JSONSerializer,
        "json instance": JSONSerializer(),
        "object": object(),
        "dumps only": _DumpsOnly,
        "loads None": _LoadsBlocked(),
        "module": pickle,
    }[candidate]
    assert isinstance(value, contract.SerializerCheck) == isinstance(value, rq_queue.Serializer)


def test_a_worker_has_rq_check_serializers_quickly_and_the_same(redis_conn, worker_env, monkeypatch):
    import rq.queue
    import rq.serializers
    from rq.serializers import DefaultSerializer, JSONSerializer, resolve_serializer

    from worker.runner import EngineWorker

    monkeypatch.setattr(rq.serializers, "Serializer", rq.queue.Serializer)  # RQ's own Protocol, as at import
    EngineWorker([rq.queue.Queue(name, connection=redis_conn) for name in contract.QUEUES], connection=redis_conn)
    assert rq.serializers.Serializer is contract.SerializerCheck
    assert resolve_serializer(None) is DefaultSerializer
    assert resolve_serializer("json") is JSONSerializer
    assert resolve_serializer(DefaultSerializer) is DefaultSerializer
    with pytest.raises(NotImplementedError):
        resolve_serializer(_DumpsOnly)
