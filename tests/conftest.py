"""Fixtures: a real redis-server per session (flushed per test), the stand-in engine, the app and its client.

The end-to-end fixtures (real vLLM CPU engine, worker pool and gunicorn, once per session) live in
tests/e2e/conftest.py.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from loguru import logger
from redis import Redis
from rq import Queue

from bench.stack import process_tree
from tests.stand_in_engine import StandInEngine
from web import create_app
from worker import contract
from worker.runner import EngineWorker

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key-alice"
OTHER_KEY = "test-key-bob"
SERVED_MODEL = "stand-in-model"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StreamEvents(list):
    """Records what `EngineClient.generate` passes to its `on_text`: (text, tokens so far) per stream event."""

    def __call__(self, piece: str, tokens: int) -> None:
        self.append((piece, tokens))


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `predicate` until it is true; fail the test naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def cpus_of_tree(pid: int) -> list[tuple[str, set[str]]]:
    """For a process and every process under it: its command name and the CPU lists its threads may run on."""
    found = []
    for current in process_tree(pid):
        lists = set()
        for task in Path(f"/proc/{current}/task").iterdir():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that has just ended
                lists.add((task / "status").read_text().split("Cpus_allowed_list:")[1].split()[0])
        found.append((Path(f"/proc/{current}/comm").read_text().strip(), lists))
    return found


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[str]:
    """Start a real redis-server on a free port; yield its base URL (no database number)."""
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is not installed (make test installs it)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    client = Redis(port=port)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except Exception:
            return False

    wait_until(answers, 10, "redis-server to answer PING")
    yield f"redis://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server) -> str:
    """Database 0 of the session's Redis; the end-to-end service uses another database."""
    return f"{redis_server}/0"


@pytest.fixture
def redis_conn(redis_url) -> Iterator[Redis]:
    connection = Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.flushdb()


@pytest.fixture(scope="session")
def stand_in() -> Iterator[StandInEngine]:
    engine = StandInEngine(free_port()).start()
    yield engine
    engine.stop()


@pytest.fixture
def app_config(redis_url, stand_in, tmp_path) -> dict:
    return {
        "TESTING": True,
        "REDIS_URL": redis_url,
        "API_KEYS": [KEY, OTHER_KEY],
        "ENGINE_URL": stand_in.url,
        "LOG_DIR": str(tmp_path / "logs"),
        "RATE_LIMIT_PER_MINUTE": 0,  # tests/test_limits.py turns it on
    }


@pytest.fixture
def app(app_config, redis_conn):
    return create_app(app_config)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def log_dir(tmp_path) -> Iterator[Path]:
    """Configure the service's log files under a temporary folder; flush them at teardown."""
    folder = tmp_path / "logs"
    contract.configure_logging(folder, "INFO")
    yield folder
    logger.complete()
    logger.remove()


@pytest.fixture
def worker_env(monkeypatch, redis_url, stand_in, log_dir) -> Path:
    """Point the in-process worker at the stand-in engine; yields the log folder."""
    monkeypatch.setenv("ENGINE_URL", stand_in.url)
    monkeypatch.setenv("SERVED_MODEL_NAME", SERVED_MODEL)
    monkeypatch.setenv("ENGINE_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("ENGINE_RETRY_BACKOFF", "0")  # retried jobs go straight back to the queue
    reset_worker_caches()
    yield log_dir
    reset_worker_caches()


def reset_worker_caches() -> None:
    """Make the in-process worker read its settings from the environment again."""
    from worker import jobs

    jobs.worker_settings.cache_clear()
    jobs.forget_engine_client()


def run_worker(connection: Redis, worker_class: type[EngineWorker] = EngineWorker) -> None:
    """Work every queued job (retries included) in this process with the service's worker class (or a test's
    subclass of it), then return."""
    queues = [Queue(name, connection=connection) for name in contract.QUEUES]
    worker_class(queues, connection=connection).work(burst=True)


def queued_count(connection: Redis) -> int:
    return sum(Queue(name, connection=connection).count for name in contract.QUEUES)
