"""Several workers in one worker process (WORKER_THREADS): their jobs run at once, and a cancel, a warm
and a cold shutdown treat each of them as the one-worker process treats its job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
from rq import Worker

from tests.conftest import ROOT, cpus_of_tree, wait_until
from tests.faults.conftest import AUTH, MEASURED, status, stop, submit
from worker import contract

MAX_TOKENS = 64  # more than the stand-in's 40 slow tokens


def statuses(client, task_ids: list[str]) -> list[str]:
    return [status(client, task_id) for task_id in task_ids]


def all_running(client, conn, count: int, seconds: int) -> tuple[list[str], list[str], list[Worker]]:
    """Submit `count` jobs taking `seconds` at the stand-in; return once all of them run at the same time.

    Returns:
        The prompts, task ids and the workers running them.
    """
    prompts = [f"stand-in:sleep={seconds} {uuid.uuid4()}" for _ in range(count)]
    task_ids = [submit(client, prompt, MAX_TOKENS) for prompt in prompts]
    wait_until(lambda: statuses(client, task_ids) == ["processing"] * count, 10, f"{count} jobs to run at once")
    workers = {worker.get_current_job_id(): worker for worker in Worker.all(connection=conn)}
    return prompts, task_ids, [workers[task_id] for task_id in task_ids]


def attempts_of(stand_in, prompt: str) -> int:
    return sum(1 for sent in stand_in.requests if sent.get("prompt") == prompt)


@pytest.mark.timeout(120)
def test_one_process_runs_its_workers_jobs_at_once_and_a_sigterm_lets_all_of_them_finish(
    start_pool, fault_client, fault_conn, stand_in
):
    pool = start_pool(concurrency=3, WORKER_THREADS="3")
    prompts, task_ids, workers = all_running(fault_client, fault_conn, 3, 2)
    assert len({worker.name for worker in workers}) == 3
    assert len({worker.pid for worker in workers}) == 1

    exit_time = stop(pool, signal.SIGTERM, timeout=30)
    assert pool.returncode == 0
    assert statuses(fault_client, task_ids) == ["completed"] * 3
    assert [attempts_of(stand_in, prompt) for prompt in prompts] == [1, 1, 1]
    MEASURED["SIGTERM to a pool with 3 jobs running in one process -> all finished, pool exited"] = f"{exit_time:.1f} s"


@pytest.mark.timeout(120)
def test_second_sigterm_to_a_process_recovers_every_job_it_was_running(
    start_pool, fault_client, fault_conn, fault_logs, stand_in
):
    start_pool(concurrency=2, WORKER_THREADS="2")
    prompts, task_ids, workers = all_running(fault_client, fault_conn, 2, 4)
    os.kill(workers[0].pid, signal.SIGTERM)
    time.sleep(1.5)  # a second signal within 1 s is taken as a duplicate
    killed_at = time.monotonic()
    os.kill(workers[0].pid, signal.SIGTERM)

    wait_until(
        lambda: statuses(fault_client, task_ids) == ["completed"] * 2, 60, "both jobs to complete on a new process"
    )
    recovery = time.monotonic() - killed_at
    assert [attempts_of(stand_in, prompt) for prompt in prompts] == [2, 2]
    log = (fault_logs / contract.REQUEST_LOG).read_text()
    assert [log.count(f"task_id={task_id} status=success") for task_id in task_ids] == [1, 1]
    MEASURED["second SIGTERM to a process running 2 jobs -> both completed"] = f"{recovery:.1f} s"


@pytest.mark.timeout(120)
def test_cancel_cuts_only_its_own_job_among_the_workers_of_a_process(start_pool, fault_client, fault_conn, stand_in):
    start_pool(concurrency=2, WORKER_THREADS="2")
    cancelled, kept = (f"stand-in:slow=0.1 {uuid.uuid4()}" for _ in range(2))  # 40 tokens, one every 0.1 s
    cancelled_id, kept_id = submit(fault_client, cancelled, MAX_TOKENS), submit(fault_client, kept, MAX_TOKENS)
    wait_until(
        lambda: min(fault_conn.xlen(contract.events_key(task_id)) for task_id in (cancelled_id, kept_id)) >= 2,
        20,
        "both jobs to start",
    )  # queued, started
    time.sleep(0.5)  # a few of their tokens
    assert len({worker.pid for worker in Worker.all(connection=fault_conn)}) == 1  # one process runs both
    response = fault_client.delete(f"/jobs/{cancelled_id}", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "cancelled"

    wait_until(lambda: statuses(fault_client, [kept_id]) == ["completed"], 20, "the other job to complete")
    body = fault_client.get(f"/result/{kept_id}", headers=AUTH).get_json()
    assert body["result"].count("tick") == 40
    assert cancelled in stand_in.aborted
    assert kept not in stand_in.aborted


def test_a_pool_without_workers_is_refused_with_a_message(fault_redis_url, tmp_path):
    env = {**os.environ, "REDIS_URL": fault_redis_url, "LOG_DIR": str(tmp_path), "WORKER_THREADS": "0"}
    started = subprocess.run([sys.executable, "-m", "worker"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert started.returncode == 2
    assert "invalid settings: WORKER_THREADS must be 1 or more, not 0" in started.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one CPU: nothing to keep apart")
def test_the_pool_runs_on_the_service_cpus_as_set(start_pool):
    first = min(os.sched_getaffinity(0))
    pool = start_pool(SERVICE_CPUS=str(first))
    tree = cpus_of_tree(pool.pid)
    assert len(tree) >= 2  # the pool's parent and its process of workers
    assert [cpus for _, cpus in tree] == [{str(first)}] * len(tree)


def test_a_pool_with_service_cpus_it_cannot_use_is_refused_with_a_message(fault_redis_url, tmp_path):
    env = {**os.environ, "REDIS_URL": fault_redis_url, "LOG_DIR": str(tmp_path), "SERVICE_CPUS": "0-4095"}
    started = subprocess.run([sys.executable, "-m", "worker"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert started.returncode == 2
    assert "invalid settings: SERVICE_CPUS=0-4095 names CPUs this process may not use" in started.stderr
