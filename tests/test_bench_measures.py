"""The benchmark's CPU measure counts a process's threads and its children (`make bench` runs the benchmark)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

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
