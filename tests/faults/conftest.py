"""Fault-injection fixtures: real worker pools, redis-servers and gunicorn, killed with real signals.

Recovery times measured by the tests are printed at the end of the run (see docs/RELIABILITY.md).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis

from tests.conftest import KEY, ROOT, SERVED_MODEL, free_port, wait_until
from web import create_app

FAULT_DB = 2
AUTH = {"X-API-Key": KEY}
MEASURED: dict[str, str] = {}
"""What each fault test measured, printed in the terminal summary."""


def pytest_terminal_summary(terminalreporter) -> None:
    if MEASURED:
        terminalreporter.section("fault recovery measured")
        for fault, figure in MEASURED.items():
            terminalreporter.write_line(f"{fault}: {figure}")


@pytest.fixture
def fault_redis_url(redis_server) -> Iterator[str]:
    url = f"{redis_server}/{FAULT_DB}"
    connection = Redis.from_url(url)
    connection.flushdb()
    yield url
    connection.flushdb()


@pytest.fixture
def fault_conn(fault_redis_url) -> Redis:
    return Redis.from_url(fault_redis_url)


@pytest.fixture
def fault_logs(tmp_path) -> Path:
    return tmp_path / "logs"


@pytest.fixture
def fault_client(app_config, fault_redis_url, fault_logs):
    return create_app({**app_config, "REDIS_URL": fault_redis_url, "LOG_DIR": str(fault_logs)}).test_client()


@pytest.fixture
def start_pool(fault_redis_url, stand_in, fault_logs, tmp_path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `python -m worker` as the Procfile does, in its own process group; kill leftovers at teardown."""
    pools: list[subprocess.Popen] = []

    def start(concurrency: int = 2, **settings: str) -> subprocess.Popen:
        env = {
            **os.environ,
            "REDIS_URL": fault_redis_url,
            "ENGINE_URL": stand_in.url,
            "SERVED_MODEL_NAME": SERVED_MODEL,
            "WORKER_CONCURRENCY": str(concurrency),
            "LOG_DIR": str(fault_logs),
            **settings,
        }
        log = tmp_path / f"pool-{len(pools)}.out"
        with log.open("w") as out:
            pool = subprocess.Popen(
                [sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        pools.append(pool)
        wait_until(lambda: log.read_text().count("Listening on") >= concurrency, 20, f"{concurrency} workers to listen")
        return pool

    yield start
    for pool in pools:
        try:
            os.killpg(pool.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pool.wait(timeout=10)


def start_redis(folder: Path, port: int) -> subprocess.Popen:
    """Start redis-server with the Procfile's durability settings (AOF, fsync every second)."""
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
         "--appendonly", "yes", "--appendfsync", "everysec"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = Redis(port=port)

    def answers() -> bool:
        try:
            return client.ping() and not client.info("persistence").get("loading")
        except Exception:
            return False

    wait_until(answers, 20, "redis-server to answer and finish loading")
    return process


class OwnRedis:
    """A redis-server of the test's own (`start_redis`), which the test may kill and start again on its files."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = start_redis(folder, self.port)

    def kill(self, sig: int) -> None:
        stop(self.process, sig)

    def start(self) -> None:
        self.process = start_redis(self.folder, self.port)

    def close(self) -> None:
        if self.process.poll() is None:
            stop(self.process)


@pytest.fixture
def own_redis(tmp_path) -> Iterator[OwnRedis]:
    redis = OwnRedis(tmp_path / "redis")
    yield redis
    redis.close()


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> float:
    """Send `sig` and return how long the process took to exit."""
    sent = time.monotonic()
    process.send_signal(sig)
    process.wait(timeout=timeout)
    return time.monotonic() - sent


def submit(client, prompt: str, max_tokens: int = 8) -> str:
    response = client.post("/generate", json={"prompt": prompt, "max_tokens": max_tokens}, headers=AUTH)
    assert response.status_code == 202, response.get_json()
    return response.get_json()["task_id"]


def status(client, task_id: str) -> str:
    return client.get(f"/status/{task_id}", headers=AUTH).get_json()["status"]
