"""`python -m bench [--full]`: run every measurement, then write the report under docs/."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from redis import Redis

from bench import load, micro, report
from bench.stack import ROOT, PeerUnavailable, Stack, cpu_seconds, own_cpu_seconds
from worker import contract
from worker.settings import DEFAULT_ENGINE_STREAM_INTERVAL

LEVELS = (1, 8, 32, 64)
STAND_IN_TOKEN_DELAY = 0.02  # seconds per token
PLAN = {
    # engine: (max_tokens, {concurrency: requests}) for the short run; --full multiplies requests by 4.
    # Rounds of the clients: with two, one slow round moved a ratio by 0.1. A closed loop's clients all send
    # their first request in the same instant, a start that weighs on the first three rounds: 3/8 of a run
    # of eight. The levels that targets judge run longer: 32 rounds at c=64 on the stand-in, at c=32 on vLLM 4 in each
    # of 4 loops (MIRRORED).
    "stand-in": (64, {1: 10, 8: 32, 32: 256, 64: 2048}),
    "vllm-cpu": (64, {1: 8, 8: 16, 32: 128, 64: 128}),
}
WAIT = 30  # seconds a client long-polls /result?wait= before asking again
ONE_AT_A_TIME_LEVEL = 8
# The one-at-a-time design runs half as many requests as that level: one after another they take 8 times as
# long, and each is the same work, so its tokens/s needs no more.
ONE_AT_A_TIME_SHARE = 2
SHORT_C1 = {"vllm-cpu": (8, 24)}
"""c=1 again with short requests (tokens, prompts; --full multiplies the prompts by 4), for an engine whose own
spread over PLAN's length is larger than the added-latency target: the CPU engine's two requests for the same
64-token answer differ by up to hundreds of milliseconds, for 8 tokens by up to about twenty."""
MIRRORED = {"vllm-cpu": (32,)}
"""Levels measured twice: direct then through the queue, then through the queue then direct on the next prompts
(each loop of PLAN's requests). A real engine's own pace drifts over the minutes of a level, by more than the queue
costs on some machines; in this order a steady drift weighs on both modes alike."""
PEER_LEVELS = {1: 8, 8: 16, 32: 64}
"""The levels at which llama.cpp's server runs vLLM's prompts and tokens (PLAN), direct, and its requests at each
(--full multiplies them by 4): the CPU engine a user might pick instead of vLLM, on the same GGUF. At c=32 two rounds
of the clients, not vLLM's four: it has no target, and at about 100 tokens/s four took 70 s of the short run."""
MANY_JOBS = 10_000
WARM_UP_TOKENS = 4
WARM_UP_FIRST = 10**7  # prompt indexes of the warm-up jobs, apart from the measured ones
MANY_JOBS_TOKENS = 4


def run(coroutine):
    return asyncio.run(coroutine)


def stream_interval() -> int:
    """The tokens per stream event the benchmark's workers ask the engine for: the direct mode asks the same."""
    return contract.env_int(os.environ, "ENGINE_STREAM_INTERVAL", DEFAULT_ENGINE_STREAM_INTERVAL, minimum=1)


def plan(engine: str, scale: int) -> tuple[int, dict[int, int], dict[int, int]]:
    """An engine's PLAN at `scale`: tokens per request, requests at each level, and the number of each level's first
    prompt (the levels run in LEVELS' order, each on prompts of its own; what follows them starts at the sum)."""
    max_tokens, counts = PLAN[engine]
    counts = {level: counts[level] * scale for level in LEVELS}
    prompts = [counts[level] * passes(engine, level) for level in LEVELS]
    starts = dict(zip(LEVELS, itertools.accumulate(prompts, initial=0), strict=False))
    return max_tokens, counts, starts


def passes(engine: str, level: int) -> int:
    """How many times over a level runs its requests in each mode, each time on prompts of its own (MIRRORED)."""
    return 2 if level in MIRRORED.get(engine, ()) else 1


def mode_order(engine: str, level: int) -> list[tuple[str, int]]:
    """The closed loops of a level in the order they run: (mode, pass), a pass's loops on the same prompts."""
    if passes(engine, level) == 2:
        return [("direct", 0), ("queue", 0), ("queue", 1), ("direct", 1)]
    return [("direct", 0), ("queue", 0)]


def engine_suite(stack: Stack, redis_url: str, engine_url: str, engine: str, scale: int) -> dict:
    """Direct vs through the queue at each level, then the one-at-a-time design at c=8."""
    max_tokens, counts, starts = plan(engine, scale)
    interval = stream_interval()
    direct = functools.partial(load.direct, engine_url=engine_url, max_tokens=max_tokens, stream_interval=interval)
    warm_direct = functools.partial(direct, max_tokens=WARM_UP_TOKENS)
    out: dict = {"max_tokens": max_tokens, "service_cpus": stack.bound_cpus(), "levels": {}}
    pool = stack.workers(redis_url, engine_url, max(LEVELS))
    api_url, web = stack.web(redis_url, engine_url)
    processes = {"engine": stack.started[engine], "Redis": stack.started["redis"], "web": web, "workers": pool}
    via_api = functools.partial(load.through_api, api_url=api_url, max_tokens=max_tokens, wait=WAIT)
    # Warm the engine on the c=1 prompts (their prefill cached, as for every request after the first), briefly.
    run(load.closed_loop(warm_direct, counts[1], 1))
    # Warm the queue path too: every worker runs a few short jobs first (a fresh worker's first job costs
    # about 2 ms more, and at c=1 Redis hands each job to the worker that has waited longest).
    warm = functools.partial(load.through_api, api_url=api_url, max_tokens=WARM_UP_TOKENS, wait=WAIT)
    run(load.closed_loop(warm, 2 * max(LEVELS), max(LEVELS), WARM_UP_FIRST))
    requests = {"direct": direct, "queue": via_api}
    for level in LEVELS:
        first, order = starts[level], mode_order(engine, level)
        ways = ", ".join("direct" if mode == "direct" else "through the queue" for mode, _ in order)
        if level == 1:  # each prompt direct, through the queue, then direct again (_direct_queue_direct)
            ways += ", direct"
        print(f"[{engine}] c={level}: {counts[level]} requests each: {ways}", flush=True)
        if level == 1:  # each prompt direct, through the queue, then direct again: within seconds, not minutes
            (direct_samples, direct_wall, direct_errors), (api_samples, api_wall, api_errors), (again, _, _) = run(
                _direct_queue_direct(direct, via_api, counts[1], first)
            )
        else:
            cores = _Cores(processes)  # the closed loops' CPU use (c=1 alternates the ways instead)
            loops: dict[str, list] = {"direct": [], "queue": []}
            each_loop: list[dict] = []
            for mode, number in order:
                start = first + number * counts[level]
                with cores.measuring(mode):
                    loops[mode].append(run(load.closed_loop(requests[mode], counts[level], level, start)))
                each_loop.append({"mode": mode, "tokens_per_s": load.summarize(*loops[mode][-1])["tokens_per_s"]})
            direct_samples, direct_wall, direct_errors = _joined(loops["direct"])
            api_samples, api_wall, api_errors = _joined(loops["queue"])
        load.attach_server_latency(api_samples, Redis.from_url(redis_url))
        entry = {
            "direct": load.summarize(direct_samples, direct_wall, direct_errors),
            "queue": load.summarize(api_samples, api_wall, api_errors),
        }
        if level > 1:
            entry["cores"] = cores.used()
            entry["loops"] = each_loop
        entry["queue_vs_direct_throughput"] = round(entry["queue"]["tokens_per_s"] / entry["direct"]["tokens_per_s"], 3)
        if level > 1 and len(order) == 2:  # one closed loop in each mode (c=1 alternates the ways instead)
            steady = [load.steady_tokens_per_s(samples) for samples in (direct_samples, api_samples)]
            if None not in steady:
                entry["steady_queue_vs_direct"] = round(steady[1] / steady[0], 3)
            rounds = [load.first_tokens_per_s(s, load.FIRST_ROUNDS * level) for s in (direct_samples, api_samples)]
            if None not in rounds:
                entry["first_rounds_queue_vs_direct"] = round(rounds[1] / rounds[0], 3)
        entry["added_latency"] = load.added_latency_ms(direct_samples, api_samples)
        if level == 1:
            entry["engine_repeat"] = load.repeat_difference_ms(direct_samples, again)
        out["levels"][level] = entry
    first = sum(counts[level] * passes(engine, level) for level in LEVELS)
    if engine in SHORT_C1:
        tokens, count = SHORT_C1[engine][0], SHORT_C1[engine][1] * scale
        print(f"[{engine}] c=1 with {tokens}-token requests: {count} prompts", flush=True)
        short_direct = functools.partial(
            load.direct, engine_url=engine_url, max_tokens=tokens, stream_interval=interval
        )
        short_api = functools.partial(load.through_api, api_url=api_url, max_tokens=tokens, wait=WAIT)
        warm_short = functools.partial(short_direct, max_tokens=min(tokens, WARM_UP_TOKENS))
        run(load.closed_loop(warm_short, count, 1, first))  # warm, as the c=1 prompts
        (direct_samples, _, direct_errors), (api_samples, _, api_errors), (again, _, again_errors) = run(
            _direct_queue_direct(short_direct, short_api, count, first)
        )
        load.attach_server_latency(api_samples, Redis.from_url(redis_url))
        out["short_c1"] = {
            "max_tokens": tokens,
            "errors": len(direct_errors + api_errors + again_errors),
            "added_latency": load.added_latency_ms(direct_samples, api_samples),
            "engine_repeat": load.repeat_difference_ms(direct_samples, again),
        }
        first += count
    out["memory"] = micro.process_memory(pool.pid, web.pid)
    stack.stop(pool)

    print(f"[{engine}] one-at-a-time design (1 worker) at c={ONE_AT_A_TIME_LEVEL}", flush=True)
    pool = stack.workers(redis_url, engine_url, 1)
    count = counts[ONE_AT_A_TIME_LEVEL] // ONE_AT_A_TIME_SHARE
    samples, wall, errors = run(load.closed_loop(via_api, count, ONE_AT_A_TIME_LEVEL, first))
    out["one_at_a_time"] = load.summarize(samples, wall, errors)
    out["many_vs_one_at_a_time"] = round(
        out["levels"][ONE_AT_A_TIME_LEVEL]["queue"]["tokens_per_s"] / out["one_at_a_time"]["tokens_per_s"], 2
    )
    stack.stop(pool)
    stack.stop(web)
    return out


def peer_suite(stack: Stack, scale: int) -> dict:
    """llama.cpp's server, direct, with the prompts and tokens of the vLLM levels in PEER_LEVELS; skipped, saying
    why, where it cannot be started."""
    max_tokens, _, starts = plan("vllm-cpu", scale)
    try:
        url = stack.llama_cpp(max(PEER_LEVELS))
    except PeerUnavailable as exc:
        print(f"[llama.cpp] skipped: {exc}", flush=True)
        return {"skipped": str(exc)}
    direct = functools.partial(load.direct, engine_url=url, max_tokens=max_tokens)
    warm_direct = functools.partial(direct, max_tokens=WARM_UP_TOKENS)
    out: dict = {"max_tokens": max_tokens, "slots": max(PEER_LEVELS), "levels": {}}
    # llama.cpp's server closes the connection after each streamed answer: a new one for each request.
    loop = functools.partial(load.closed_loop, keep_alive=False)
    run(loop(warm_direct, PEER_LEVELS[1] * scale, 1))  # warm, as the vLLM levels
    for level, requests in PEER_LEVELS.items():
        count = requests * scale
        print(f"[llama.cpp] c={level}: {count} requests direct", flush=True)
        samples, wall, errors = run(loop(direct, count, level, starts[level]))
        out["levels"][level] = load.summarize(samples, wall, errors)
    stack.stop(stack.started["llama.cpp"])
    return out


class _Cores:
    """The cores each process (with its children) and the load generator use while a mode's closed loops run: CPU
    seconds per second over all of that mode's loops."""

    def __init__(self, processes: dict[str, subprocess.Popen]):
        self.processes = processes
        self.seconds: dict[str, Counter] = {}
        self.wall: Counter = Counter()

    def _now(self) -> dict[str, float]:
        seconds = {name: cpu_seconds(process.pid) for name, process in self.processes.items()}
        seconds["load generator"] = own_cpu_seconds()
        return seconds

    @contextlib.contextmanager
    def measuring(self, mode: str):
        before, started = self._now(), time.perf_counter()
        yield
        self.wall[mode] += time.perf_counter() - started
        after = self._now()
        self.seconds.setdefault(mode, Counter()).update({name: after[name] - before[name] for name in before})

    def used(self) -> dict[str, dict[str, float]]:
        return {
            mode: {name: round(total / self.wall[mode], 3) for name, total in seconds.items()}
            for mode, seconds in self.seconds.items()
        }


def _joined(loops: list[tuple[list, float, list]]) -> tuple[list, float, list]:
    """One mode's closed loops as one: their samples, their summed wall time, their errors."""
    samples = [sample for each, _, _ in loops for sample in each]
    errors = [error for _, _, each in loops for error in each]
    return samples, sum(wall for _, wall, _ in loops), errors


def _direct_queue_direct(direct, via_api, count: int, first: int):
    """One client: each prompt direct, through the queue, then direct again (see `load.alternating`)."""
    return load.alternating([direct, via_api, direct], count, first)


def many_jobs(stack: Stack, redis_url: str, engine_url: str) -> dict:
    """MANY_JOBS requests at c=64 through the API: every one must complete exactly once."""
    pool = stack.workers(redis_url, engine_url, 64)
    api_url, web = stack.web(redis_url, engine_url)
    via_api = functools.partial(load.through_api, api_url=api_url, max_tokens=MANY_JOBS_TOKENS, wait=WAIT)
    print(f"[stand-in] {MANY_JOBS} jobs at c=64", flush=True)
    samples, wall, errors = run(load.closed_loop(via_api, MANY_JOBS, 64, 10**6))
    stack.stop(pool)
    stack.stop(web)
    time.sleep(1)
    ids = {sample.task_id for sample in samples}
    lines = (stack.workdir / "logs" / "llm_requests.log").read_text().splitlines()
    logged = (line.split("task_id=")[1].split()[0] for line in lines if "status=success" in line)
    successes = Counter(task_id for task_id in logged if task_id in ids)
    return {
        "submitted": MANY_JOBS,
        "completed": len(samples),
        "client_errors": errors[:10],
        "distinct_task_ids": len(ids),
        "wall_s": round(wall, 1),
        "jobs_per_s": round(len(samples) / wall, 1),
        "success_log_lines": sum(successes.values()),
        "run_more_than_once": sum(1 for n in successes.values() if n > 1),
    }


def service_parts(stack: Stack, redis_url: str, engine_url: str, scale: int) -> dict:
    """Submit latency at a fixed rate, the highest submit rate, trivial-job throughput per worker class."""
    api_url, web = stack.web(redis_url, engine_url)
    print("[api] submit latency at 300/s, then the highest submit rate", flush=True)
    run(micro.submit_at_rate(api_url, 300, 1))  # warm-up: first connections, lazy imports
    out = {
        "submit_at_300": run(micro.submit_at_rate(api_url, 300, 5 * scale)),
        "max_submit": micro.max_submit_rate(api_url, seconds=10 * scale),
    }
    stack.stop(web)
    Redis.from_url(redis_url).flushdb()
    print("[workers] trivial-job throughput per worker class", flush=True)
    out["trivial_jobs_per_s"] = micro.worker_class_throughput(redis_url, engine_url, jobs=3000 * scale)
    Redis.from_url(redis_url).flushdb()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="four times the requests of the short run")
    parser.add_argument("--skip-vllm", action="store_true", help="stand-in engine only")
    args = parser.parse_args()
    scale = 4 if args.full else 1
    started = time.monotonic()
    results: dict = {
        "run": "full" if args.full else "short",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
        "result_wait_s": WAIT,
        "stand_in_token_delay_s": STAND_IN_TOKEN_DELAY,
        "engine_stream_interval": stream_interval(),
        "warm_up_tokens": WARM_UP_TOKENS,
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        stack = Stack(Path(workdir))
        try:
            redis_url = stack.redis()
            # Each part starts from an empty Redis: what the one before left (10,000 jobs' results, kept for
            # RESULT_TTL) would otherwise make Redis rewrite its append-only file in the middle of the next.
            empty = Redis.from_url(redis_url).flushdb
            stand_in = stack.stand_in(STAND_IN_TOKEN_DELAY)
            results["service"] = service_parts(stack, redis_url, stand_in, scale)
            empty()
            results["stand-in"] = engine_suite(stack, redis_url, stand_in, "stand-in", scale)
            empty()
            results["many_jobs"] = many_jobs(stack, redis_url, stand_in)
            if not args.skip_vllm:
                # As `make run` places them: the service's processes on the CPU vLLM leaves out of its model
                # (SERVICE_CPUS=auto), Redis too, so a new one.
                stack.stop(stack.started["redis"])
                stack.service_cpus = "auto"
                redis_url = stack.redis()
                results["vllm-cpu"] = engine_suite(stack, redis_url, stack.vllm(), "vllm-cpu", scale)
                stack.stop(stack.started["vllm-cpu"])  # the cores are llama.cpp's now
                results["llama.cpp"] = peer_suite(stack, scale)
        finally:
            stack.close()
    results["duration_s"] = round(time.monotonic() - started)
    docs = ROOT / "docs"
    (docs / "bench").mkdir(parents=True, exist_ok=True)
    (docs / "bench" / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    report.write(results, docs)
    print(f"done in {results['duration_s']} s: docs/BENCHMARKS.md", flush=True)


if __name__ == "__main__":
    main()
