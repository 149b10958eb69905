"""Closed-loop async load: C clients, each sending its next request when the last one finished.

Two ways to run a request: straight to the engine's OpenAI API (`direct`), or through the service
(`through_api`: submit, then long-poll `/result?wait=N` as a client would). The server's own timestamps
are kept too (`attach_server_latency`), so the way the client learns of completion does not hide the
queue's cost.

The clients are aiohttp's: the load generator shares the 2 cores with what it measures, and httpx took
0.8-1.3 ms of CPU per request against aiohttp's 0.23 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import aiohttp
from redis import Redis
from rq.job import Job
from rq.utils import utcparse

from bench.stack import API_KEY, MODEL
from worker.engine import build_request

STEADY_SKIP = 3
"""Answers per client that the steady-state throughput leaves out: the synchronized start of a closed loop
(every client submits in the same instant) spreads over its first three rounds."""
FIRST_ROUNDS = 8
"""Where a closed loop ran more rounds of its clients than this, its ratio over the first this many rounds
alone is given too: what a run of that length would measure."""


def prompt(index: int) -> str:
    """Deterministic prompts, distinct so every run does the same work."""
    return f"Request {index}: write a long story about a lighthouse keeper and the number {index}."


@dataclass
class Sample:
    index: int
    latency: float  # seconds, as the client saw it
    ttft: float | None  # seconds
    tokens: int
    server_latency: float | None = None  # from sending the submit to the job's end (RQ's), seconds
    task_id: str | None = None
    sent_at: float | None = None  # time.time() when the submit was sent
    total_time: float | None = None  # the job's created -> ended (RQ's timestamps), seconds
    client: int = 0  # which of the closed loop's clients sent it
    finished: float = 0.0  # time.perf_counter() when the client had its answer


async def direct(
    client: aiohttp.ClientSession, engine_url: str, index: int, max_tokens: int, stream_interval: int = 1
) -> Sample:
    """One request straight to the engine: the request a worker sends for the same job (`build_request`), asking
    for the same stream events (`stream_interval`)."""
    # The job `through_api` submits, with the API's default top_p.
    job = {"prompt": prompt(index), "max_tokens": max_tokens, "temperature": 0, "top_p": 1.0, "ignore_eos": True}
    path, body = build_request(job, MODEL, stream_interval)
    started = time.perf_counter()
    ttft, tokens = None, 0
    async with client.post(f"{engine_url}{path}", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line.endswith(b"[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if ttft is None and chunk.get("choices"):  # as the workers count it: the first token, text or not
                ttft = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Sample(index, time.perf_counter() - started, ttft, tokens)


async def through_api(client: aiohttp.ClientSession, api_url: str, index: int, max_tokens: int, wait: int) -> Sample:
    headers = {"X-API-Key": API_KEY}
    body = {"prompt": prompt(index), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    sent_at, started = time.time(), time.perf_counter()
    async with client.post(f"{api_url}/generate", json=body, headers=headers) as submitted:
        submitted.raise_for_status()
        task_id = (await submitted.json())["task_id"]
    submit_rtt = time.perf_counter() - started
    while True:
        try:
            async with client.get(f"{api_url}/result/{task_id}", params={"wait": wait}, headers=headers) as response:
                response.raise_for_status()  # 202 means not finished yet: ask again
                if response.status == 200:
                    result = await response.json()
                    break
        except aiohttp.ServerDisconnectedError:
            continue  # the server closed a kept-alive connection as we reused it; reading again is safe
    if result["status"] != "completed":
        raise RuntimeError(f"task {task_id} ended {result['status']}: {result}")
    metrics = result["metrics"]
    ttft = submit_rtt + metrics["queue_wait_time"] + metrics["time_to_first_token"]
    latency = time.perf_counter() - started
    return Sample(index, latency, ttft, metrics["completion_tokens"], None, task_id, sent_at, metrics["total_time"])


def attach_server_latency(samples: list[Sample], connection: Redis) -> None:
    """Set each sample's `server_latency`: from sending its submit to its job's end by RQ's clock.

    The job's end is its `created_at` (read from RQ's job hash, in one round trip after the run) plus its
    created -> ended time; the load generator and the server share this machine's clock.
    """
    samples = [s for s in samples if s.task_id is not None]
    with connection.pipeline(transaction=False) as pipe:
        for sample in samples:
            pipe.hget(Job.key_for(sample.task_id), "created_at")
        created = pipe.execute()
    for sample, created_at in zip(samples, created, strict=True):
        if created_at is not None:
            ended = utcparse(created_at.decode()).timestamp() + sample.total_time
            sample.server_latency = ended - sample.sent_at


Request = Callable[..., Awaitable[Sample]]
"""A request of the closed loops, called with the client session and `index=` (`direct`, `through_api`, with the rest
of their arguments given)."""


async def _attempt(
    request: Request,
    client: aiohttp.ClientSession,
    index: int,
    samples: list[Sample],
    errors: list[str],
    client_number: int = 0,
) -> None:
    """Run one request (called with the client and `index=`), keeping its sample, or its failure as an error line."""
    try:
        sample = await request(client, index=index)
    except (aiohttp.ClientError, TimeoutError, RuntimeError) as exc:
        errors.append(f"request {index}: {exc!r}")
        return
    sample.client, sample.finished = client_number, time.perf_counter()
    samples.append(sample)


async def closed_loop(
    request: Request,
    count: int,
    concurrency: int,
    first: int = 0,
    keep_alive: bool = True,
) -> tuple[list[Sample], float, list[str]]:
    """Run `count` requests with `concurrency` clients; return the samples, the wall time and the errors.

    `keep_alive=False` opens a connection for each request, for a server that closes one after each streamed
    answer (llama.cpp's): a request written on such a connection would fail.
    """
    pending = iter(range(first, first + count))
    samples: list[Sample] = []
    errors: list[str] = []
    async with _session(concurrency * 2, keep_alive) as client:

        async def client_loop(number: int) -> None:
            for index in pending:
                await _attempt(request, client, index, samples, errors, number)

        started = time.perf_counter()
        await asyncio.gather(*(client_loop(number) for number in range(concurrency)))
        return samples, time.perf_counter() - started, errors


async def alternating(
    requests: Sequence[Request], count: int, first: int = 0
) -> list[tuple[list[Sample], float, list[str]]]:
    """One client, each prompt sent each way in turn, so the requests for one prompt come within seconds.

    Returns, for each way: the samples, the time spent in its requests and the errors.
    """
    results: list[tuple[list[Sample], list[float], list[str]]] = [([], [], []) for _ in requests]
    async with _session(2) as client:
        for index in range(first, first + count):
            for request, (samples, spent, errors) in zip(requests, results, strict=True):
                started = time.perf_counter()
                await _attempt(request, client, index, samples, errors)
                spent.append(time.perf_counter() - started)
    return [(samples, sum(spent), errors) for samples, spent, errors in results]


def _session(connections: int, keep_alive: bool = True) -> aiohttp.ClientSession:
    """A client session; an idle connection is dropped before the server's 5 s keep-alive (gunicorn's as the Procfile
    sets it, uvicorn's, the stand-in's) would close it under us. Without `keep_alive`, none is kept."""
    if keep_alive:
        connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=4.0)
    else:
        connector = aiohttp.TCPConnector(limit=connections, force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=900))


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[rank]


def summarize(samples: list[Sample], wall: float, errors: list[str]) -> dict[str, float]:
    latencies = [s.latency for s in samples]
    ttfts = [s.ttft for s in samples if s.ttft is not None]
    tokens = sum(s.tokens for s in samples)
    summary = {
        "requests": len(samples),
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "p50_s": round(percentile(latencies, 50), 4),
        "p90_s": round(percentile(latencies, 90), 4),
        "p99_s": round(percentile(latencies, 99), 4),
        "ttft_p50_s": round(percentile(ttfts, 50), 4) if ttfts else None,
        "requests_per_s": round(len(samples) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
    }
    servers = [s.server_latency for s in samples if s.server_latency is not None]
    if servers:
        summary["server_p50_s"] = round(statistics.median(servers), 4)
    return summary


def steady_tokens_per_s(samples: list[Sample], skip: int = STEADY_SKIP) -> float | None:
    """Tokens/s of a closed loop once each client has had `skip` answers: the sum over the clients of the
    tokens of their later requests over the time from their `skip`-th answer to their last.

    A closed loop starts every client at the same instant; this leaves out that start. None when a client
    had fewer than `skip` + 2 answers.
    """
    by_client: dict[int, list[Sample]] = {}
    for sample in samples:
        by_client.setdefault(sample.client, []).append(sample)
    total = 0.0
    for own in by_client.values():
        own.sort(key=lambda s: s.finished)
        if len(own) < skip + 2:
            return None
        later = own[skip:]
        total += sum(s.tokens for s in later) / (later[-1].finished - own[skip - 1].finished)
    return total


def first_tokens_per_s(samples: list[Sample], count: int) -> float | None:
    """Tokens/s of a closed loop's first `count` answers: their tokens over the time from the loop's first
    request to the last of these answers. None when the loop had no more answers than that.
    """
    if len(samples) <= count:
        return None
    first = sorted(samples, key=lambda s: s.finished)[:count]
    started = min(s.finished - s.latency for s in samples)
    return sum(s.tokens for s in first) / (first[-1].finished - started)


def added_latency_ms(direct_samples: list[Sample], api_samples: list[Sample]) -> dict[str, float]:
    """Queue path minus engine alone, paired by prompt, from the server's timestamps (milliseconds)."""
    engine = {s.index: s.latency for s in direct_samples}
    return _spread([
        (s.server_latency - engine[s.index]) * 1000
        for s in api_samples
        if s.index in engine and s.server_latency is not None  # None: its job hash had expired
    ])  # fmt: skip


def repeat_difference_ms(first_samples: list[Sample], again_samples: list[Sample]) -> dict[str, float]:
    """The engine alone, the same prompt twice: the second latency minus the first (milliseconds).

    How much the engine alone moves between two requests for the same prompt, beside `added_latency_ms`. The
    second request follows the job through the queue, and so also meets what the queue does after a job.
    """
    first = {s.index: s.latency for s in first_samples}
    return _spread([(s.latency - first[s.index]) * 1000 for s in again_samples if s.index in first])


def _spread(differences: list[float]) -> dict[str, float]:
    return {
        "pairs": len(differences),
        "p50_ms": round(percentile(differences, 50), 2),
        "p99_ms": round(percentile(differences, 99), 2),
        "max_ms": round(max(differences, default=float("nan")), 2),
    }
