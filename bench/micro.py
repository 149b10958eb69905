"""Measurements of the service's own parts: submit latency and rate, worker throughput, memory."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from redis import Redis
from rq import Queue
from rq.job import Job

from bench.load import percentile
from bench.stack import API_KEY, ROOT, rss_mb

TRIVIAL_QUEUE = "bench-trivial"
FORKING = "rq Worker (forks per job)"
WORKER_CLASSES = {
    FORKING: "rq.worker.Worker",
    "rq SimpleWorker": "rq.worker.SimpleWorker",
    "EngineWorker": "worker.runner.EngineWorker",
}
SHIPPED_POOL = "EngineWorker pool as shipped (8 threads per process)"
# The pool `python -m worker` runs, in burst mode: `processes` processes of WORKER_THREADS' default threads.
POOL_SCRIPT = """
import sys
from redis import Redis
from worker.pool import ThreadedWorkerPool
from worker.runner import EngineWorker
from worker.settings import DEFAULT_WORKER_THREADS
url, queue, processes = sys.argv[1:]
ThreadedWorkerPool([queue], connection=Redis.from_url(url), num_workers=int(processes),
                   threads=DEFAULT_WORKER_THREADS, worker_class=EngineWorker).start(burst=True, logging_level="WARNING")
"""


async def submit_at_rate(api_url: str, rate: float, seconds: float) -> dict[str, float]:
    """Open loop: POST /generate at a fixed rate; return the latency percentiles (ms)."""
    latencies: list[float] = []
    errors = 0
    body = {"prompt": "fixed rate", "max_tokens": 1}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(api_url, headers={"X-API-Key": API_KEY}, timeout=timeout) as client:

        async def one() -> None:
            nonlocal errors
            started = time.perf_counter()
            async with client.post("/generate", json=body) as response:
                await response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            errors += response.status != 202

        start = time.perf_counter()
        tasks = []
        for n in range(int(rate * seconds)):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return {
        "rate_per_s": rate,
        "requests": len(latencies),
        "errors": errors,
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
    }


def max_submit_rate(api_url: str, seconds: int = 10, connections: int = 32) -> dict[str, float]:
    """Closed loop with wrk: the highest rate of accepted submits (202) the API sustains."""
    if not shutil.which("wrk"):
        return {"error": "wrk is not installed (apt-get install wrk)"}
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.body = \'{"prompt": "max rate", "max_tokens": 1}\'\n'
        f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["X-API-Key"] = "{API_KEY}"\n'
    )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), f"{api_url}/generate"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1, "s": 1000}
    return {
        "connections": connections,
        "submits_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "non_202": int(non_2xx.group(1)) if non_2xx else 0,
        "p99_ms": round(float(p99.group(1)) * scale[p99.group(2)], 2) if p99 else None,
    }


def worker_class_throughput(redis_url: str, engine_url: str, jobs: int, processes: int = 2) -> dict[str, float]:
    """Trivial jobs per second for each worker class (`processes` burst workers at once), and for the shipped
    pool (`processes` processes of its threads)."""
    connection = Redis.from_url(redis_url)
    rates = {}
    rq_worker = [str(Path(sys.executable).parent / "rq"), "worker", "--burst", "--quiet", "--url", redis_url]
    runs = {label: [[*rq_worker, "-w", path, TRIVIAL_QUEUE]] * processes for label, path in WORKER_CLASSES.items()}
    runs[SHIPPED_POOL] = [[sys.executable, "-c", POOL_SCRIPT, redis_url, TRIVIAL_QUEUE, str(processes)]]
    for label, argvs in runs.items():
        queue = Queue(TRIVIAL_QUEUE, connection=connection)
        queue.empty()
        count = jobs // 4 if label == FORKING else jobs  # at 110-130 jobs/s, a quarter is still 6-7 s of it
        queue.enqueue_many([Queue.prepare_data("bench.jobs.noop", result_ttl=300) for _ in range(count)])
        ids = queue.get_job_ids()
        env = {"ENGINE_URL": engine_url, "PATH": str(Path(sys.executable).parent)}
        workers = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for argv in argvs]  # fmt: skip
        for worker in workers:
            worker.wait(timeout=600)
        done = [job for job in Job.fetch_many(ids, connection=connection) if job and job.ended_at]
        first = min(job.started_at for job in done)
        last = max(job.ended_at for job in done)
        rates[label] = round(len(done) / (last - first).total_seconds(), 1)
    return rates


def process_memory(pool_pid: int, web_pid: int) -> dict[str, list[float]]:
    """RSS (MB) of every worker process and every gunicorn worker."""
    from bench.stack import children

    return {
        "worker_processes_mb": sorted(round(rss_mb(pid), 1) for pid in children(pool_pid)),
        "worker_pool_parent_mb": [round(rss_mb(pool_pid), 1)],
        "gunicorn_workers_mb": sorted(round(rss_mb(pid), 1) for pid in children(web_pid)),
    }
