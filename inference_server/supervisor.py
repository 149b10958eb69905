"""Run the engine as a child process: wait for its health, forward signals, report how it ended."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence

import httpx
from loguru import logger

HEALTH_POLL_INTERVAL = 0.5  # seconds between /health probes while the engine starts
TAIL_LINES = 40  # engine output lines shown when it fails
EXIT_NEVER_HEALTHY = 3
"""Exit status when the engine is still running but not healthy after the start timeout."""


class Engine:
    """The engine process, its output echoed to our stdout and kept as a short tail."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str]):
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.process = subprocess.Popen(
            list(argv), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self._pump = threading.Thread(target=self._echo, daemon=True)
        self._pump.start()

    def _echo(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.tail.append(line.rstrip("\n"))
            sys.stdout.write(line)
            sys.stdout.flush()

    def report_tail(self, why: str) -> None:
        self._pump.join(timeout=2)
        logger.error("{}; last {} lines of engine output:\n{}", why, len(self.tail), "\n".join(self.tail))

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)


def wait_healthy(engine: Engine, health_url: str, timeout: float) -> bool:
    """Poll `health_url` until it answers 200 (True), the engine exits or `timeout` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            return False
        try:
            if httpx.get(health_url, timeout=HEALTH_POLL_INTERVAL * 4).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(HEALTH_POLL_INTERVAL)
    return False


def supervise(argv: Sequence[str], env: Mapping[str, str], health_url: str, start_timeout: float) -> int:
    """Start the engine, wait until healthy, then until it exits; return the exit status to use."""
    logger.info("starting engine: {}", " ".join(argv))
    started = time.monotonic()
    engine = Engine(argv, env)
    stopping = threading.Event()

    def forward(signum: int, frame: object) -> None:
        stopping.set()
        logger.info("received {}, stopping the engine", signal.Signals(signum).name)
        engine.signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    if not wait_healthy(engine, health_url, start_timeout):
        if stopping.is_set():
            return engine.process.wait()
        code = engine.process.poll()
        if code is None:
            engine.report_tail(f"engine not healthy after {start_timeout:.0f} s at {health_url}")
            engine.signal(signal.SIGTERM)
            _wait_or_kill(engine)
            return EXIT_NEVER_HEALTHY
        engine.report_tail(f"engine exited with status {code} before it became healthy")
        return code or 1
    logger.info("engine healthy at {} after {:.1f} s", health_url, time.monotonic() - started)

    code = engine.process.wait()
    if stopping.is_set():
        logger.info("engine stopped with status {}", code)
        return 0 if code in (0, -signal.SIGTERM, -signal.SIGINT) else code
    engine.report_tail(f"engine exited unexpectedly with status {code}")
    return code or 1


def _wait_or_kill(engine: Engine, grace: float = 30) -> None:
    try:
        engine.process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        engine.process.kill()
        engine.process.wait()
