"""End-to-end fixtures: the real vLLM CPU engine, a real worker pool and gunicorn, once per session.

Each process is started as the Procfile starts it (`python -m inference_server`, `python -m worker`,
gunicorn serving `web:create_app()`), against the session's redis-server (database 1).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import KEY, ROOT, free_port

ENGINE_START_TIMEOUT = 600  # seconds; the CPU engine is healthy after ~25 s here
HEALTH_POLL = 0.5  # seconds
E2E_MODEL = "e2e-smollm2"
E2E_WORKERS = 4


@dataclass
class Service:
    url: str
    engine_url: str
    redis_url: str
    log_dir: Path
    headers: dict[str, str]
    pids: dict[str, int]  # the worker pool's and gunicorn's


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_healthy(process: subprocess.Popen, url: str, log: Path, timeout: float, what: str) -> None:
    """Poll `url` until 200; fail at once with the log if the process exits, else after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with status {process.returncode} before it was ready:\n{tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(HEALTH_POLL)
    pytest.fail(f"{what} too slow: not ready after {timeout} s:\n{tail(log)}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def vllm_engine(vllm_supervisor) -> str:
    """The URL of the real vLLM CPU engine."""
    return vllm_supervisor[1]


@pytest.fixture(scope="session")
def vllm_supervisor(e2e_dir) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m inference_server` running the real vLLM CPU engine serving SmolLM2-135M-Instruct, started once
    per session, and the engine's URL."""
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DEVICE": "cpu",
        "ENGINE_PORT": str(port),
        "SERVED_MODEL_NAME": E2E_MODEL,
        "LOG_DIR": str(e2e_dir / "logs"),
        "ENGINE_START_TIMEOUT": str(ENGINE_START_TIMEOUT),
    }
    log = e2e_dir / "engine.out"
    process = start([sys.executable, "-m", "inference_server"], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url + "/health", log, ENGINE_START_TIMEOUT, "vLLM engine")
    yield process, url
    stop(process)


@pytest.fixture(scope="session")
def service(vllm_engine, redis_server, e2e_dir) -> Iterator[Service]:
    """Worker pool and gunicorn in front of the real engine, as the Procfile runs them."""
    redis_url = f"{redis_server}/1"
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "ENGINE_URL": vllm_engine,
        "SERVED_MODEL_NAME": E2E_MODEL,
        "API_KEYS": KEY,
        "WORKER_CONCURRENCY": str(E2E_WORKERS),
        "LOG_DIR": str(e2e_dir / "logs"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    worker_log, web_log = e2e_dir / "worker.out", e2e_dir / "web.out"
    worker = start([sys.executable, "-m", "worker"], env, worker_log)
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    web_argv = [gunicorn, "--workers", "2", "--worker-class", "gevent", "--keep-alive", "5",
                "--bind", f"127.0.0.1:{port}", "--preload", "web:create_app()"]  # fmt: skip
    web = start(web_argv, env, web_log)
    url = f"http://127.0.0.1:{port}"
    # /health is 200 only once Redis answers, the engine is loaded and workers are registered.
    wait_healthy(web, url + "/health", web_log, 60, "gunicorn web")
    if worker.poll() is not None:
        pytest.fail(f"worker pool exited:\n{tail(worker_log)}")
    pids = {"worker": worker.pid, "web": web.pid}
    yield Service(url, vllm_engine, redis_url, e2e_dir / "logs", {"X-API-Key": KEY}, pids)
    stop(web)
    stop(worker)
