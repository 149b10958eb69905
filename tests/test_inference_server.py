"""The engine's exact command lines per profile, and how the supervisor reports a failing engine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from loguru import logger

from inference_server.command import SERVER_MODULE, build_command, default_model
from inference_server.settings import EngineSettings, SettingsError, parse_device
from inference_server.supervisor import EXIT_NEVER_HEALTHY, supervise
from tests.conftest import ROOT, free_port
from worker import contract

ALLOWED = os.sched_getaffinity(0)
MODEL_BIND = {"VLLM_CPU_OMP_THREADS_BIND": contract.cpu_list(ALLOWED - {max(ALLOWED)})} if len(ALLOWED) > 1 else {}
"""What SERVICE_CPUS=auto, the default, gives the CPU engine's model here: every CPU but the last."""
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="one CPU: nothing to keep apart")


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
    assert env == {"PATH": "/bin", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "300", "VLLM_CPU_KVCACHE_SPACE": "1", **MODEL_BIND}


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
    assert EngineSettings.from_env({"CPU_ENGINE_SINGLE_PROCESS": value}).engine_cpus is None


def test_the_single_process_setting_is_for_the_cpu_profile_only():
    _, env = command_for({"MODEL_DEVICE": "cuda", "CPU_ENGINE_SINGLE_PROCESS": "true"})
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env


@needs_two_cpus
def test_the_cpu_engine_keeps_the_last_cpu_for_everything_but_its_model():
    settings = EngineSettings.from_env({})
    assert settings.service_cpus == settings.engine_cpus == {max(ALLOWED)}
    assert settings.model_cpus == ALLOWED - {max(ALLOWED)}
    assert MODEL_BIND["VLLM_CPU_OMP_THREADS_BIND"] == contract.cpu_list(sorted(ALLOWED)[:-1])


@needs_two_cpus
def test_service_cpus_as_set():
    first = min(ALLOWED)
    settings = EngineSettings.from_env({"SERVICE_CPUS": str(first)})
    assert settings.service_cpus == settings.engine_cpus == {first}
    assert command_for({"SERVICE_CPUS": str(first)})[1]["VLLM_CPU_OMP_THREADS_BIND"] == contract.cpu_list(
        ALLOWED - {first}
    )


@pytest.mark.parametrize("value", ["none", "None", ""])
def test_service_cpus_none_binds_nothing(value):
    settings = EngineSettings.from_env({"SERVICE_CPUS": value})
    assert settings.service_cpus is settings.model_cpus is settings.engine_cpus is None
    assert "VLLM_CPU_OMP_THREADS_BIND" not in command_for({"SERVICE_CPUS": value})[1]


def test_service_cpus_on_the_gpu_profile_bind_the_engine_processes_only_when_set():
    assert EngineSettings.from_env({"MODEL_DEVICE": "cuda"}).engine_cpus is None
    settings = EngineSettings.from_env({"MODEL_DEVICE": "cuda", "SERVICE_CPUS": contract.cpu_list(ALLOWED)})
    assert settings.engine_cpus == ALLOWED
    assert settings.model_cpus is None
    assert "VLLM_CPU_OMP_THREADS_BIND" not in command_for({"MODEL_DEVICE": "cuda", "SERVICE_CPUS": "0"})[1]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", "SERVICE_CPUS: 'x' is not a list of CPUs"),
        ("3-1", "SERVICE_CPUS: '3-1' is not a list of CPUs"),
        ("1,,2", "SERVICE_CPUS: '1,,2' is not a list of CPUs"),
        ("4096", "SERVICE_CPUS=4096 names CPUs this process may not use"),
        (contract.cpu_list(ALLOWED), "leaves no CPU for the model"),
    ],
)
def test_service_cpus_that_cannot_be_are_refused(value, message):
    with pytest.raises(SettingsError, match=message):
        EngineSettings.from_env({"SERVICE_CPUS": value})


@pytest.mark.parametrize(("text", "cpus"), [("1", {1}), ("2-3,6", {2, 3, 6}), ("0-2,5,7-8", {0, 1, 2, 5, 7, 8})])
def test_cpu_lists_read_and_written_as_taskset_does(text, cpus):
    assert contract.parse_cpu_list(text) == cpus
    assert contract.cpu_list(cpus) == text


@needs_two_cpus
@pytest.mark.parametrize(("cpus", "printed"), [("0", ""), ("0,1", "1")])
def test_the_procfile_gets_the_service_cpus_for_redis(cpus, printed):
    """`auto` under taskset: one CPU leaves nothing to keep apart; of two, the service gets the last."""
    if not {0, 1} <= ALLOWED:
        pytest.skip("CPUs 0 and 1 are not both available")
    argv = ["taskset", "-c", cpus, sys.executable, "-m", "inference_server", "service-cpus"]
    out = subprocess.run(argv, cwd=ROOT, env={**os.environ, "SERVICE_CPUS": "auto"}, capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (0, printed + "\n"), out.stderr


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
