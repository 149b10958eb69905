"""Engine settings, read from the environment (units in the comments); profile defaults below."""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from worker import contract

CPU_MODEL_DIR = "SmolLM2-135M-Instruct"
"""Folder under MODELS_DIR that the CPU profile's model is prepared into."""
GPU_MODEL = "Qwen/Qwen2.5-7B-Instruct-AWQ"
DEFAULT_MAX_MODEL_LEN = {"cpu": 2048, "gpu": 8192}  # tokens
DEFAULT_KVCACHE_SPACE = 1  # GiB of KV cache for the CPU engine (~46k tokens of SmolLM2)
DEFAULT_GPU_MEMORY_UTILIZATION = 0.90  # fraction of the GPU's memory vLLM may take
DEFAULT_START_TIMEOUT = 900  # seconds to wait for the engine's /health (GPU cold starts are slow)
DEFAULT_HTTP_KEEPALIVE = 300  # seconds vLLM's HTTP server keeps an idle connection open (vLLM's default: 5)


SettingsError = contract.SettingsError
"""A setting has a value the engine cannot run with."""


@dataclass(frozen=True)
class EngineSettings:
    profile: str  # "cpu" or "gpu"
    gpu_id: str | None  # CUDA_VISIBLE_DEVICES for the gpu profile
    model: str  # path or model id; empty means the profile's default
    served_model_name: str
    host: str
    port: int
    max_model_len: int  # tokens
    http_keepalive: int  # seconds the engine keeps a worker's idle connection open
    kvcache_space: int  # GiB, cpu profile
    single_process: bool  # cpu profile: the model computes in vLLM's engine process, on every core
    enforce_eager: bool
    gpu_memory_utilization: float
    max_num_seqs: int
    quantization: str
    start_timeout: float  # seconds
    models_dir: Path
    extra_args: tuple[str, ...]
    log_dir: Path

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.port}/health"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> EngineSettings:
        """Read every engine setting from `env`, with the defaults listed in .env.sample.

        Raises:
            SettingsError: for a value the engine cannot run with, naming the variable.
        """
        profile, gpu_id = parse_device(env.get("MODEL_DEVICE", "cpu"))
        settings = cls(
            profile=profile,
            gpu_id=gpu_id,
            model=env.get("MODEL_NAME", ""),
            served_model_name=env.get("SERVED_MODEL_NAME") or "local-llm",
            host=env.get("ENGINE_HOST", "127.0.0.1"),
            port=contract.env_port(env, "ENGINE_PORT", 8001),
            max_model_len=contract.env_int(env, "MAX_MODEL_LEN", DEFAULT_MAX_MODEL_LEN[profile], minimum=1),
            http_keepalive=contract.env_int(env, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", DEFAULT_HTTP_KEEPALIVE, minimum=1),
            kvcache_space=contract.env_int(env, "VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_SPACE, minimum=1),
            single_process=contract.flag(env.get("CPU_ENGINE_SINGLE_PROCESS")),
            enforce_eager=contract.flag(env.get("ENFORCE_EAGER") or str(profile == "cpu")),
            gpu_memory_utilization=contract.env_float(
                env, "GPU_MEMORY_UTILIZATION", DEFAULT_GPU_MEMORY_UTILIZATION, positive=True
            ),
            max_num_seqs=contract.env_int(env, "MAX_NUM_SEQS", contract.DEFAULT_MAX_NUM_SEQS, minimum=1),
            quantization=env.get("QUANTIZATION", "awq_marlin"),
            start_timeout=contract.env_float(env, "ENGINE_START_TIMEOUT", DEFAULT_START_TIMEOUT, positive=True),
            models_dir=Path(env.get("MODELS_DIR", "models")),
            extra_args=tuple(shlex.split(env.get("ENGINE_EXTRA_ARGS", ""))),
            log_dir=Path(env.get("LOG_DIR") or "logs"),
        )
        if settings.gpu_memory_utilization > 1:
            raise SettingsError(
                f"GPU_MEMORY_UTILIZATION is a fraction, at most 1, not {settings.gpu_memory_utilization:g}"
            )
        return settings


def parse_device(device: str) -> tuple[str, str | None]:
    """Map MODEL_DEVICE (`cpu`, `cuda`, `cuda:N`) to the profile and the GPU to pin.

    Raises:
        SettingsError: for any other value.
    """
    device = device.strip().lower()
    if device == "cpu":
        return "cpu", None
    if device == "cuda":
        return "gpu", "0"
    if device.startswith("cuda:") and device[5:].isdigit():
        return "gpu", device[5:]
    raise SettingsError(f"MODEL_DEVICE must be cpu, cuda or cuda:N, not {device!r}")
