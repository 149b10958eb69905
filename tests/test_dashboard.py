"""rq-dashboard: served only behind credentials, unless bound to loopback."""

from __future__ import annotations

import base64

import pytest

from tests.conftest import KEY
from web.dashboard import create_dashboard, refusal
from worker import contract


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.mark.parametrize(
    ("env", "refused"),
    [
        ({"RQ_DASHBOARD_HOST": "0.0.0.0"}, True),
        ({"RQ_DASHBOARD_HOST": "0.0.0.0", "RQ_DASHBOARD_USERNAME": "admin"}, True),
        ({"RQ_DASHBOARD_HOST": "0.0.0.0", "RQ_DASHBOARD_USERNAME": "a", "RQ_DASHBOARD_PASSWORD": "p"}, False),
        ({"RQ_DASHBOARD_HOST": "127.0.0.1"}, False),
        ({}, False),
        ({"RQ_DASHBOARD_HOST": ""}, False),  # empty: the default, loopback
    ],
)
def test_refuses_public_bind_without_credentials(env, refused):
    assert (refusal(env) is not None) is refused


def test_dashboard_page_needs_credentials(redis_url, redis_conn):
    env = {"REDIS_URL": redis_url, "RQ_DASHBOARD_USERNAME": "admin", "RQ_DASHBOARD_PASSWORD": "s3cret"}
    app = create_dashboard(env)
    client = app.test_client()
    assert client.get("/").status_code == 401
    assert client.get("/", headers=basic("admin", "wrong")).status_code == 401
    page = client.get("/", headers=basic("admin", "s3cret"))
    assert page.status_code == 200
    assert b"RQ" in page.data
    queues = client.get("/0/data/queues.json", headers=basic("admin", "s3cret"))
    assert queues.status_code == 200


def test_dashboard_lists_cancelled_jobs_as_canceled(redis_url, redis_conn, client):
    """A job cancelled through the API is in RQ's canceled registry, which rq-dashboard shows."""
    task_id = client.post("/generate", json={"prompt": "cancel me"}, headers={"X-API-Key": KEY}).get_json()["task_id"]
    assert client.delete(f"/jobs/{task_id}", headers={"X-API-Key": KEY}).status_code == 200
    dashboard = create_dashboard({"REDIS_URL": redis_url}).test_client()
    queues = dashboard.get("/0/data/queues.json").get_json()["queues"]
    [normal] = [queue for queue in queues if queue["name"] == contract.QUEUE_NORMAL]
    assert normal["canceled_job_registry_count"] == 1
    listed = dashboard.get(f"/0/data/jobs/{contract.QUEUE_NORMAL}/canceled/8/asc/1.json").get_json()
    assert [job["id"] for job in listed["jobs"]] == [task_id]


def test_every_queue_and_worker_is_shown_from_the_workers_start(redis_url, redis_conn, worker_env):
    """Before any job: rq-dashboard and `rq info` show the queues once the workers have started, and `rq info` (which
    shows the workers of the queues it lists) every worker, the webhook workers too."""
    from click.testing import CliRunner
    from rq import Queue
    from rq.cli import main as rq_cli

    from worker.runner import EngineWorker
    from worker.webhooks import WebhookWorker

    names = [*contract.QUEUES, contract.QUEUE_WEBHOOKS]
    workers = [
        EngineWorker([Queue(name, connection=redis_conn) for name in contract.QUEUES], connection=redis_conn),
        WebhookWorker([Queue(contract.QUEUE_WEBHOOKS, connection=redis_conn)], connection=redis_conn),
    ]
    assert Queue.all(connection=redis_conn) == []  # RQ lists a queue at its first job
    for worker in workers:
        worker.bootstrap()
    try:
        assert sorted(queue.name for queue in Queue.all(connection=redis_conn)) == sorted(names)
        dashboard = create_dashboard({"REDIS_URL": redis_url}).test_client()
        shown = dashboard.get("/0/data/queues.json").get_json()["queues"]
        assert sorted(queue["name"] for queue in shown) == sorted(names)
        info = CliRunner().invoke(rq_cli, ["info", "--url", redis_url])
        assert info.exit_code == 0, info.output
        assert f"{len(names)} queues" in info.output
        assert "2 workers" in info.output
        assert all(worker.name in info.output for worker in workers)
    finally:
        for worker in workers:
            worker.register_death()
