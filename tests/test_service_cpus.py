"""SERVICE_CPUS: which CPUs the service's processes keep to, read as every process reads it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from worker import contract

ALLOWED = os.sched_getaffinity(0)
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="one CPU: nothing to keep apart")


@needs_two_cpus
@pytest.mark.parametrize("env", [{}, {"SERVICE_CPUS": "auto"}, {"MODEL_DEVICE": "CPU", "SERVICE_CPUS": " Auto "}])
def test_auto_on_the_cpu_engine_is_the_last_cpu(env):
    assert contract.service_cpus(env) == {max(ALLOWED)}


@pytest.mark.parametrize(
    "env",
    [
        {"MODEL_DEVICE": "cuda"},
        {"MODEL_DEVICE": "cuda:1", "SERVICE_CPUS": "auto"},
        {"CPU_ENGINE_SINGLE_PROCESS": "true"},
        {"SERVICE_CPUS": "none"},
        {"SERVICE_CPUS": ""},
    ],
)
def test_no_binding_where_the_engine_leaves_no_cpu_or_none_is_set(env):
    assert contract.service_cpus(env) is None


def test_a_list_is_used_as_set():
    assert contract.service_cpus({"SERVICE_CPUS": contract.cpu_list(ALLOWED)}) == ALLOWED
    assert contract.service_cpus({"MODEL_DEVICE": "cuda", "SERVICE_CPUS": str(min(ALLOWED))}) == {min(ALLOWED)}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("x", "SERVICE_CPUS: 'x' is not a list of CPUs"),
        ("3-1", "SERVICE_CPUS: '3-1' is not a list of CPUs"),
        ("1,,2", "SERVICE_CPUS: '1,,2' is not a list of CPUs"),
        ("-1", "SERVICE_CPUS: '-1' is not a list of CPUs"),
        ("4096", "SERVICE_CPUS=4096 names CPUs this process may not use"),
    ],
)
def test_a_list_that_cannot_be_used_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        contract.service_cpus({"SERVICE_CPUS": value})


@pytest.mark.parametrize(("text", "cpus"), [("1", {1}), ("2-3,6", {2, 3, 6}), ("0-2,5,7-8", {0, 1, 2, 5, 7, 8})])
def test_cpu_lists_are_read_and_written_as_taskset_does(text, cpus):
    assert contract.parse_cpu_list(text) == cpus
    assert contract.cpu_list(cpus) == text


def service_cpus_printed(taskset: str, value: str) -> subprocess.CompletedProcess:
    argv = ["taskset", "-c", taskset, sys.executable, "-m", "inference_server", "service-cpus"]
    return subprocess.run(argv, cwd=ROOT, env={**os.environ, "SERVICE_CPUS": value}, capture_output=True, text=True)


@pytest.mark.skipif(not {0, 1} <= ALLOWED, reason="needs CPUs 0 and 1")
@pytest.mark.parametrize(("taskset", "printed"), [("0", ""), ("0,1", "1")])
def test_the_procfile_starts_redis_on_the_service_cpus(taskset, printed):
    """`auto` as the Procfile's Redis line reads it: of one CPU nothing to keep apart, of two the last."""
    out = service_cpus_printed(taskset, "auto")
    assert (out.returncode, out.stdout) == (0, printed + "\n"), out.stderr


def test_the_procfile_helper_refuses_a_bad_list():
    out = service_cpus_printed(contract.cpu_list(ALLOWED), "0-4095")
    assert out.returncode == 2
    assert "SERVICE_CPUS=0-4095 names CPUs this process may not use" in out.stderr
