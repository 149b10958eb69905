"""Every accepted job ends completed, error or cancelled: never lost, never run to two results.

Each test starts real processes, kills them with real signals, and measures how long recovery took.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis.exceptions
from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.results import Result

from tests.conftest import KEY, ROOT, free_port, wait_until
from tests.faults.conftest import AUTH, MEASURED, OwnRedis, status, stop, submit
from tests.stand_in_engine import StandInEngine
from web import create_app, tasks
from worker import contract

RECOVERY_LIMIT = 60  # seconds from the kill to the completed job


def wait_finished(client, task_id: str, timeout: float) -> dict:
    wait_until(lambda: status(client, task_id) not in ("queued", "processing"), timeout, f"task {task_id} to finish")
    return client.get(f"/result/{task_id}", headers=AUTH).get_json()


def success_lines(log_dir: Path, task_id: str) -> int:
    log = log_dir / contract.REQUEST_LOG
    return log.read_text().count(f"task_id={task_id} status=success") if log.exists() else 0


def assert_completed_once(client, conn: Redis, log_dir: Path, task_id: str, stand_in, prompt: str, attempts: int):
    body = client.get(f"/result/{task_id}", headers=AUTH).get_json()
    assert body["status"] == "completed", body
    assert body["result"] == "Hello, world!"
    job = Job.fetch(task_id, connection=conn)
    assert [result.type for result in job.results()] == [Result.Type.SUCCESSFUL]
    assert sum(1 for sent in stand_in.requests if sent.get("prompt") == prompt) == attempts
    wait_until(lambda: success_lines(log_dir, task_id) >= 1, 5, "the request-log line")
    time.sleep(0.5)
    assert success_lines(log_dir, task_id) == 1


def worker_running(conn: Redis, task_id: str) -> Worker:
    wait_until(
        lambda: any(w.get_current_job_id() == task_id for w in Worker.all(connection=conn)), 10, "a worker to run it"
    )
    return next(w for w in Worker.all(connection=conn) if w.get_current_job_id() == task_id)


def job_in_progress(start_pool, client, conn: Redis, seconds: int):
    """Start a pool of 2 workers and a job that takes `seconds` at the stand-in; return once it runs.

    Returns:
        The pool process, the job's prompt, its task id and the worker running it.
    """
    pool = start_pool(concurrency=2)
    prompt = f"stand-in:sleep={seconds} {uuid.uuid4()}"
    task_id = submit(client, prompt)
    worker = worker_running(conn, task_id)
    # A worker lists the job a moment before RQ marks it started; a kill in between is RQ's
    # intermediate-queue case (docs/RELIABILITY.md), not the mid-job case tested here.
    wait_until(lambda: status(client, task_id) == "processing", 10, "the job to start")
    return pool, prompt, task_id, worker


@pytest.mark.timeout(120)
def test_worker_process_killed_mid_job_is_retried_and_completes_once(
    start_pool, fault_client, fault_conn, fault_logs, stand_in
):
    _, prompt, task_id, worker = job_in_progress(start_pool, fault_client, fault_conn, 3)
    killed_at = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)

    body = wait_finished(fault_client, task_id, RECOVERY_LIMIT)
    recovery = time.monotonic() - killed_at
    assert body["status"] == "completed", body
    assert body["attempt"] == 2
    assert_completed_once(fault_client, fault_conn, fault_logs, task_id, stand_in, prompt, attempts=2)
    MEASURED["worker process SIGKILL mid-job -> completed"] = f"{recovery:.1f} s (job itself takes 3 s)"


@pytest.mark.timeout(120)
def test_whole_pool_killed_job_completes_on_a_new_pool(start_pool, fault_client, fault_conn, fault_logs, stand_in):
    pool, prompt, task_id, _ = job_in_progress(start_pool, fault_client, fault_conn, 3)
    killed_at = time.monotonic()
    os.killpg(pool.pid, signal.SIGKILL)
    pool.wait(timeout=10)
    start_pool(concurrency=2)

    body = wait_finished(fault_client, task_id, RECOVERY_LIMIT)
    recovery = time.monotonic() - killed_at
    assert body["status"] == "completed", body
    assert_completed_once(fault_client, fault_conn, fault_logs, task_id, stand_in, prompt, attempts=2)
    MEASURED["whole worker pool SIGKILL mid-job, new pool started -> completed"] = f"{recovery:.1f} s"


@pytest.mark.timeout(120)
def test_sigterm_lets_the_running_job_finish_then_the_pool_exits(
    start_pool, fault_client, fault_conn, fault_logs, stand_in
):
    pool, prompt, task_id, _ = job_in_progress(start_pool, fault_client, fault_conn, 3)
    exit_time = stop(pool, signal.SIGTERM, timeout=30)
    assert pool.returncode == 0
    assert status(fault_client, task_id) == "completed"
    assert_completed_once(fault_client, fault_conn, fault_logs, task_id, stand_in, prompt, attempts=1)
    MEASURED["SIGTERM to the pool mid-job -> job finished, pool exited"] = f"{exit_time:.1f} s"


@pytest.mark.timeout(120)
def test_second_sigterm_is_a_cold_shutdown_and_the_job_is_recovered(
    start_pool, fault_client, fault_conn, fault_logs, stand_in
):
    _, prompt, task_id, worker = job_in_progress(start_pool, fault_client, fault_conn, 4)
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a second signal within 1 s as a duplicate
    killed_at = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)

    body = wait_finished(fault_client, task_id, RECOVERY_LIMIT)
    recovery = time.monotonic() - killed_at
    assert body["status"] == "completed", body
    assert_completed_once(fault_client, fault_conn, fault_logs, task_id, stand_in, prompt, attempts=2)
    MEASURED["second SIGTERM (cold shutdown) mid-job -> completed"] = f"{recovery:.1f} s"


@pytest.mark.timeout(120)
def test_workers_wait_while_the_engine_is_down(start_pool, fault_client, fault_conn, fault_logs, app_config, tmp_path):
    port = free_port()
    engine_url = f"http://127.0.0.1:{port}"
    pool = start_pool(concurrency=2, ENGINE_URL=engine_url)
    ids = [submit(fault_client, f"while down {n}") for n in range(4)]
    time.sleep(3)
    assert [status(fault_client, task_id) for task_id in ids] == ["queued"] * 4
    health_client = create_app({**app_config, "ENGINE_URL": engine_url}).test_client()
    health = health_client.get("/health")
    assert health.status_code == 503
    assert health.get_json()["model_loaded"] is False
    assert "is not ready; waiting before taking jobs" in (fault_logs / "app.log").read_text()

    engine = StandInEngine(port).start()
    try:
        up_at = time.monotonic()
        for task_id in ids:
            assert wait_finished(fault_client, task_id, 30)["status"] == "completed"
        resumed = time.monotonic() - up_at
    finally:
        engine.stop()
    assert pool.poll() is None
    MEASURED["engine down with 4 jobs queued -> all completed after it came back"] = f"{resumed:.1f} s"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_redis_restart_keeps_every_queued_job(sig, tmp_path, app_config, own_redis, start_pool, stand_in):
    client = create_app({**app_config, "REDIS_URL": own_redis.url}).test_client()
    ids = [submit(client, f"durable {n}") for n in range(1000)]

    own_redis.kill(sig)
    restarted_at = time.monotonic()
    own_redis.start()
    reload_time = time.monotonic() - restarted_at
    conn = Redis.from_url(own_redis.url)
    # FAIR_SHARE_SLOTS of the key's jobs are in the queue, the others wait their turn: all still queued.
    assert Queue(contract.QUEUE_NORMAL, connection=conn).count == app_config.get("FAIR_SHARE_SLOTS", 8)
    assert {status(client, task_id) for task_id in ids} == {"queued"}

    started = time.monotonic()
    start_pool(concurrency=4, REDIS_URL=own_redis.url, LOG_DIR=str(tmp_path / "pool-logs"))
    finished = Queue(contract.QUEUE_NORMAL, connection=conn).finished_job_registry
    wait_until(lambda: finished.count == 1000, 240, "1,000 jobs to finish", interval=0.5)
    drained = time.monotonic() - started
    statuses = {status(client, task_id) for task_id in ids}
    assert statuses == {"completed"}
    lines = (tmp_path / "pool-logs" / contract.REQUEST_LOG).read_text().splitlines()
    done = [line.split("task_id=")[1].split()[0] for line in lines if "status=success" in line]
    assert sorted(done) == sorted(ids)  # each job exactly once
    name = signal.Signals(sig).name
    MEASURED[f"Redis {name} with 1,000 jobs queued -> all kept"] = (
        f"1000/1000 after restart (reload {reload_time:.1f} s); drained by 4 workers in {drained:.1f} s"
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("sig", "down", "attempts"),
    [(signal.SIGTERM, 4, 1), (signal.SIGKILL, 4, 1), (signal.SIGKILL, 12, 2)],
    ids=["SIGTERM-4s", "SIGKILL-4s", "SIGKILL-12s"],
)
def test_redis_restart_while_jobs_run_ends_every_job_once(
    sig, down, attempts, tmp_path, app_config, own_redis, start_pool, stand_in
):
    """Redis goes away while 4 jobs run and is back `down` s later, after their engine requests have ended.

    The workers wait out an outage of up to REDIS_OUTAGE_WAIT (7.5 s) and file each job's text from its first
    attempt; after a longer one each job is run again.
    """
    logs = tmp_path / "pool-logs"
    client = create_app({**app_config, "REDIS_URL": own_redis.url}).test_client()
    start_pool(concurrency=4, REDIS_URL=own_redis.url, LOG_DIR=str(logs))
    prompts = [f"stand-in:sleep=4 {uuid.uuid4()}" for _ in range(4)]
    ids = [submit(client, prompt) for prompt in prompts]
    wait_until(lambda: {status(client, task_id) for task_id in ids} == {"processing"}, 20, "the 4 jobs to start")
    time.sleep(1.5)  # the start transactions are in the append-only file (fsync every second)
    own_redis.kill(sig)
    time.sleep(down)
    own_redis.start()
    back = time.monotonic()
    conn = Redis.from_url(own_redis.url)
    finished = [(task_id, wait_finished(client, task_id, 120)) for task_id in ids]
    recovered = time.monotonic() - back
    assert {task_id: body["status"] for task_id, body in finished} == dict.fromkeys(ids, "completed")
    for task_id, prompt in zip(ids, prompts, strict=True):
        job = Job.fetch(task_id, connection=conn)
        assert [result.type for result in job.results()] == [Result.Type.SUCCESSFUL]
        assert sum(1 for sent in stand_in.requests if sent.get("prompt") == prompt) == attempts
        wait_until(lambda: success_lines(logs, task_id) >= 1, 5, "the request-log line")  # noqa: B023
    time.sleep(0.5)
    assert [success_lines(logs, task_id) for task_id in ids] == [1, 1, 1, 1]
    retried = [f"job {task_id} attempt 1 failed (worker_died" in (logs / "app.log").read_text() for task_id in ids]
    assert retried == [attempts == 2] * 4
    name = signal.Signals(sig).name
    MEASURED[f"Redis {name} while 4 jobs run, back {down} s later -> all completed once, attempt {attempts}"] = (
        f"{recovered:.1f} s"
    )


@pytest.mark.timeout(120)
def test_sigterm_stops_a_pool_whose_redis_is_gone(tmp_path, own_redis, start_pool):
    """Redis went away first (it crashed, or was stopped before the workers): a SIGTERM still stops the pool."""
    pool = start_pool(concurrency=4, REDIS_URL=own_redis.url, LOG_DIR=str(tmp_path / "pool-logs"))
    own_redis.kill(signal.SIGKILL)
    time.sleep(1)
    sent = time.monotonic()
    os.killpg(pool.pid, signal.SIGTERM)
    pool.wait(timeout=60)
    took = time.monotonic() - sent
    assert pool.returncode == 0
    assert "leaving without deregistering, Redis is unreachable" in (tmp_path / "pool-logs" / "app.log").read_text()
    MEASURED["SIGTERM to a pool of 4 whose Redis is gone -> pool exited"] = f"{took:.1f} s"


def stall(redis: OwnRedis, seconds: float) -> None:
    """Stop `redis` (SIGSTOP) now and let it go on (SIGCONT) `seconds` later: it keeps its connections and whatever
    they send, and answers nothing meanwhile."""
    redis.process.send_signal(signal.SIGSTOP)
    threading.Timer(seconds, redis.process.send_signal, [signal.SIGCONT]).start()


@pytest.mark.timeout(60)
def test_a_worker_connection_does_not_send_again_what_redis_may_still_run(own_redis):
    """A command that timed out is in Redis, which runs it when it answers again: sending it again would run it twice.
    A lost connection is another matter (test_redis_restart_while_jobs_run_ends_every_job_once)."""
    conn = Redis.from_url(own_redis.url, socket_timeout=0.5, retry=contract.redis_retry(contract.REDIS_OUTAGE_WAIT))
    conn.ping()
    stall(own_redis, 1.0)
    with pytest.raises(redis.exceptions.TimeoutError), conn.pipeline() as pipe:
        pipe.rpush("ended", "job").incr("attempts")
        pipe.execute()
    wait_until(lambda: Redis.from_url(own_redis.url).ping(), 10, "Redis to answer again")
    assert conn.lrange("ended", 0, -1) == [b"job"]
    assert conn.get("attempts") == b"1"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("idempotency_key", [None, "order-42"])
def test_a_submit_whose_redis_stalls_is_queued_once(idempotency_key, app_config, own_redis, monkeypatch):
    """Redis stops answering for 1.5 s just as a submit's transaction goes out; the web waits 1 s for a reply.

    The client is told 503, but Redis runs the transaction when it answers again: the job is queued once (sending
    the transaction again queued it twice). A client that retries with its Idempotency-Key gets that job.
    """
    client = create_app({**app_config, "REDIS_URL": own_redis.url}).test_client()
    first = submit(client, "first")  # Redis has RQ's admission script from here on: the submit below loads nothing
    read_before_submit = tasks._read_before_submit

    def then_stall(*args, **kwargs):
        replies = read_before_submit(*args, **kwargs)
        stall(own_redis, 1.5)
        return replies

    monkeypatch.setattr(tasks, "_read_before_submit", then_stall)
    headers = {**AUTH, "Idempotency-Key": idempotency_key} if idempotency_key else AUTH
    body = {"prompt": "stalled", "max_tokens": 8}
    response = client.post("/generate", json=body, headers=headers)
    monkeypatch.undo()
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error_type"] == "queue_unavailable"
    (told,) = response.get_json()["task_ids"]  # the task it may still queue
    conn = Redis.from_url(own_redis.url)
    wait_until(lambda: conn.ping(), 10, "Redis to answer again")
    first_id, stalled_id = (
        task_id.decode() for task_id in conn.lrange(Queue(contract.QUEUE_NORMAL, connection=conn).key, 0, -1)
    )
    assert (first_id, stalled_id) == (first, told)
    assert conn.llen(contract.WAKE_KEY) == 2  # a wake entry for each job
    assert status(client, stalled_id) == "queued"
    if idempotency_key:
        again = client.post("/generate", json=body, headers=headers)
        assert (again.status_code, again.get_json()["task_id"]) == (200, stalled_id)


@pytest.mark.timeout(60)
def test_a_submit_whose_redis_stalls_before_its_transaction_queues_nothing_and_frees_its_key(
    app_config, own_redis, monkeypatch
):
    """Redis stops answering before the submit's read (rate limit, queue lengths): nothing can be queued, so the 503
    names no task and the Idempotency-Key is free again for the retry."""
    client = create_app({**app_config, "REDIS_URL": own_redis.url}).test_client()
    submit(client, "first")
    read_before_submit = tasks._read_before_submit

    def stall_then_read(*args, **kwargs):
        stall(own_redis, 1.5)
        return read_before_submit(*args, **kwargs)

    monkeypatch.setattr(tasks, "_read_before_submit", stall_then_read)
    headers = {**AUTH, "Idempotency-Key": "order-43"}
    body = {"prompt": "stalled", "max_tokens": 8}
    response = client.post("/generate", json=body, headers=headers)
    monkeypatch.undo()
    assert response.status_code == 503, response.get_json()
    assert response.get_json()["error_type"] == "queue_unavailable"
    assert "task_ids" not in response.get_json()
    conn = Redis.from_url(own_redis.url)
    wait_until(lambda: conn.ping(), 10, "Redis to answer again")
    assert conn.llen(Queue(contract.QUEUE_NORMAL, connection=conn).key) == 1  # the first job alone
    again = client.post("/generate", json=body, headers=headers)
    assert again.status_code == 202, again.get_json()
    assert conn.llen(Queue(contract.QUEUE_NORMAL, connection=conn).key) == 2


@pytest.mark.timeout(120)
def test_gunicorn_reload_loses_no_submitted_job(fault_redis_url, fault_conn, stand_in, tmp_path):
    port = free_port()
    env = {**os.environ, "REDIS_URL": fault_redis_url, "API_KEYS": KEY, "ENGINE_URL": stand_in.url,
           "LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    with (tmp_path / "gunicorn.out").open("w") as out:
        server = subprocess.Popen(
            [gunicorn, "--workers", "2", "--worker-class", "gevent", "--bind", f"127.0.0.1:{port}",
             "--graceful-timeout", "10", "--preload", "web:create_app()"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(url), 20, "gunicorn to answer")
        answers: list[tuple[int, str | None]] = []

        def load() -> None:
            with httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
                for n in range(300):
                    response = http.post("/generate", json={"prompt": f"reload {n}", "max_tokens": 4})
                    answers.append((response.status_code, response.json().get("task_id")))

        thread = threading.Thread(target=load)
        thread.start()
        for _ in range(2):
            time.sleep(0.4)
            server.send_signal(signal.SIGHUP)  # graceful reload: new workers, old ones finish their requests
        thread.join(timeout=60)
    finally:
        stop(server)
    assert len(answers) == 300
    assert {code for code, _ in answers} == {202}
    jobs = [Job.fetch(task_id, connection=fault_conn) for _, task_id in answers]
    # FAIR_SHARE_SLOTS of them in the queue, the rest waiting for the key's turn: all queued.
    assert {job.get_status() for job in jobs} == {"queued", "rate_limited"}
    assert Queue(contract.QUEUE_NORMAL, connection=fault_conn).count == 8
    MEASURED["gunicorn reloaded twice during 300 submits"] = "300/300 answered 202, 300 jobs queued"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.timeout(120)
def test_engine_failures_are_retried_after_a_backoff_by_rqs_scheduler(
    start_pool, fault_client, fault_conn, fault_logs, stand_in
):
    start_pool(concurrency=2, ENGINE_RETRY_BACKOFF="1")
    prompt = f"stand-in:fail-first=2 {uuid.uuid4()}"
    started = time.monotonic()
    task_id = submit(fault_client, prompt)
    wait_until(lambda: "attempt" in fault_client.get(f"/status/{task_id}", headers=AUTH).get_json(), 10, "a retry")
    waiting = fault_client.get(f"/status/{task_id}", headers=AUTH).get_json()
    assert waiting["status"] in ("queued", "processing")
    body = wait_finished(fault_client, task_id, 60)
    elapsed = time.monotonic() - started
    assert body["status"] == "completed", body
    assert body["attempt"] == 3
    app_log = (fault_logs / "app.log").read_text()
    assert f"job {task_id} attempt 1 failed (engine_error" in app_log and "retrying in 1 s" in app_log
    assert f"job {task_id} attempt 2 failed (engine_error" in app_log and "retrying in 2 s" in app_log
    # RQ's scheduler keeps due times in whole seconds, so each wait may end up to 1 s early.
    assert elapsed >= 1
    assert_completed_once(fault_client, fault_conn, fault_logs, task_id, stand_in, prompt, attempts=3)
    MEASURED["engine 503 twice, backoff 1 s then 2 s -> completed on attempt 3"] = f"{elapsed:.1f} s after submit"
