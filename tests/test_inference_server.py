"""The engine's exact command lines per profile, and how the supervisor reports a failing engine."""

from __future__ import annotations

import sys

import pytest
from loguru import logger

from inference_server.command import SERVER_MODULE, build_command, default_model
from inference_server.settings import EngineSettings, SettingsError, parse_device
from inference_server.supervisor import EXIT_NEVER_HEALTHY, supervise
from tests.conftest import free_port


@pytest.fixture
def logged():
    """Collect what the supervisor logs."""
    messages: list[str] = []
    sink = logger.add(messages.append, format="{message}")
    yield messages
    logger.remove(sink)


def command_for(env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    settings = EngineSettings.from_env(env)
    return build_command(settings, settings.model or default_model(settings), {"PATH": "/bin"})


def test_cpu_profile_command():
    argv, env = command_for({})
    assert argv == [
        sys.executable, "-m", SERVER_MODULE,
        "--model", "models/SmolLM2-135M-Instruct",
        "--served-model-name", "local-llm",
        "--host", "127.0.0.1",
        "--port", "8001",
        "--max-model-len", "2048",
        "--dtype", "bfloat16",
        "--enforce-eager",
    ]  # fmt: skip
    assert env == {"PATH": "/bin", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "300", "VLLM_CPU_KVCACHE_SPACE": "1"}


def test_gpu_profile_command_pins_the_gpu():
    argv, env = command_for({"MODEL_DEVICE": "cuda:1", "SERVED_MODEL_NAME": "qwen", "ENGINE_PORT": "9000"})
    assert argv == [
        sys.executable, "-m", SERVER_MODULE,
        "--model", "Qwen/Qwen2.5-7B-Instruct-AWQ",
        "--served-model-name", "qwen",
        "--host", "127.0.0.1",
        "--port", "9000",
        "--max-model-len", "8192",
        "--quantization", "awq_marlin",
        "--gpu-memory-utilization", "0.9",
        "--max-num-seqs", "64",
    ]  # fmt: skip
    assert env == {"PATH": "/bin", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "300", "CUDA_VISIBLE_DEVICES": "1"}


def test_gpu_profile_settings_and_extra_args():
    argv, env = command_for(
        {
            "MODEL_DEVICE": "cuda",
            "MODEL_NAME": "/srv/models/my-awq",
            "MAX_MODEL_LEN": "4096",
            "GPU_MEMORY_UTILIZATION": "0.8",
            "MAX_NUM_SEQS": "128",
            "QUANTIZATION": "awq",
            "ENFORCE_EAGER": "true",
            "ENGINE_EXTRA_ARGS": "--seed 1 --swap-space 4",
        }
    )
    assert argv[3:] == [
        "--model", "/srv/models/my-awq",
        "--served-model-name", "local-llm",
        "--host", "127.0.0.1",
        "--port", "8001",
        "--max-model-len", "4096",
        "--quantization", "awq",
        "--gpu-memory-utilization", "0.8",
        "--max-num-seqs", "128",
        "--enforce-eager",
        "--seed", "1", "--swap-space", "4",
    ]  # fmt: skip
    assert env["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_engine_keeps_idle_connections_as_set(device):
    assert (
        command_for({"MODEL_DEVICE": device, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "60"})[1]["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"]
        == "60"
    )


def test_cpu_profile_settings():
    argv, env = command_for({"VLLM_CPU_KVCACHE_SPACE": "4", "ENFORCE_EAGER": "false", "MAX_MODEL_LEN": "1024"})
    assert "--enforce-eager" not in argv
    assert argv[argv.index("--max-model-len") + 1] == "1024"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"


@pytest.mark.parametrize("value", ["true", "1", "On"])
def test_cpu_profile_in_a_single_process(value):
    argv, env = command_for({"CPU_ENGINE_SINGLE_PROCESS": value})
    assert argv == command_for({})[0]
    assert env == {
        "PATH": "/bin",
        "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "300",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in command_for({"CPU_ENGINE_SINGLE_PROCESS": "false"})[1]


def test_the_single_process_setting_is_for_the_cpu_profile_only():
    _, env = command_for({"MODEL_DEVICE": "cuda", "CPU_ENGINE_SINGLE_PROCESS": "true"})
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env


@pytest.mark.parametrize(
    ("device", "expected"), [("cpu", ("cpu", None)), ("CUDA", ("gpu", "0")), ("cuda:3", ("gpu", "3"))]
)
def test_parse_device(device, expected):
    assert parse_device(device) == expected


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu", ""])
def test_parse_device_rejects_others(device):
    with pytest.raises(SettingsError):
        parse_device(device)


def test_engine_that_dies_exits_non_zero_with_its_last_lines(logged):
    script = "import sys\nfor i in range(60): print('engine line', i)\nsys.exit(7)"
    health = f"http://127.0.0.1:{free_port()}/health"
    code = supervise([sys.executable, "-c", script], {}, health, start_timeout=30)
    assert code == 7
    err = "".join(logged)
    assert "exited with status 7 before it became healthy" in err
    assert "engine line 59" in err
    assert "engine line 10\n" not in err  # only the tail is repeated


def test_engine_never_healthy_is_stopped_and_reported(logged):
    health = f"http://127.0.0.1:{free_port()}/health"
    code = supervise([sys.executable, "-c", "import time; print('loading'); time.sleep(60)"], {}, health, 1.5)
    assert code == EXIT_NEVER_HEALTHY
    err = "".join(logged)
    assert "not healthy after 2 s" in err
    assert "loading" in err


def test_healthy_engine_that_later_dies_is_reported(logged, stand_in):
    script = "import time; time.sleep(1.5); print('crash'); raise SystemExit(9)"
    code = supervise([sys.executable, "-c", script], {}, stand_in.url + "/health", start_timeout=30)
    assert code == 9
    err = "".join(logged)
    assert "engine healthy" in err
    assert "exited unexpectedly with status 9" in err
