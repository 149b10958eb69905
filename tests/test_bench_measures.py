"""The benchmark's CPU measure counts a process's threads and its children, and its levels' prompts do not overlap
(`make bench` runs the benchmark)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from bench.__main__ import mode_order, plan
from bench.stack import CLOCK_TICKS, cpu_seconds
from tests.conftest import ROOT

BURN = """
import time
def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
"""
# A process whose first child burns 0.1 s of CPU and ends, whose second burns 0.3 s in a thread that stays alive,
# then which burns 0.2 s in its main thread.
PARENT = """{burn}
import subprocess, sys
subprocess.run([sys.executable, "-c", {ended!r}], check=True)
CHILD = {child!r}
child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
burn(0.2)
print("ready", flush=True)
time.sleep(60)
"""
CHILD = """{burn}
import threading
def work():
    burn(0.3)
    print("ready", flush=True)
    time.sleep(60)
threading.Thread(target=work).start()
"""


def test_cpu_seconds_counts_the_threads_and_children_of_a_process_and_those_it_waited_for():
    script = PARENT.format(burn=BURN, ended=BURN + "burn(0.1)", child=CHILD.format(burn=BURN))
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert parent.stdout.readline().strip() == "ready"
        used = cpu_seconds(parent.pid)
        assert used >= 0.6 - 3 / CLOCK_TICKS  # /proc counts in clock ticks
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()
    assert cpu_seconds(parent.pid) == 0  # an ended process


def test_a_mirrored_level_runs_direct_queue_queue_direct_on_two_sets_of_prompts_of_its_own():
    max_tokens, counts, starts = plan("vllm-cpu", 1)
    assert counts == {1: 8, 8: 16, 32: 128, 64: 128}
    assert mode_order("vllm-cpu", 32) == [("direct", 0), ("queue", 0), ("queue", 1), ("direct", 1)]
    assert starts == {1: 0, 8: 8, 32: 24, 64: 24 + 2 * 128}  # the second pass's prompts come before c=64's
    assert mode_order("vllm-cpu", 64) == [("direct", 0), ("queue", 0)]
    assert mode_order("stand-in", 32) == [("direct", 0), ("queue", 0)]
    assert plan("vllm-cpu", 4)[2][64] == 4 * (8 + 16 + 2 * 128)
