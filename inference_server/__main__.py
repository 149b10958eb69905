"""`python -m inference_server`: prepare the model if needed, then run vLLM until told to stop.

`python -m inference_server prepare` only prepares the CPU model (used by `make`); `python -m inference_server
service-cpus` prints the CPUs SERVICE_CPUS keeps the service on, empty for none: the Procfile starts Redis there.
"""

from __future__ import annotations

import os
import sys

from loguru import logger

from inference_server.command import build_command, default_model
from inference_server.model import ModelNotAvailable, prepare_cpu_model
from inference_server.settings import CPU_MODEL_DIR, EngineSettings, SettingsError
from inference_server.supervisor import supervise
from worker import contract


def main(args: list[str]) -> int:
    """Run the engine for the configured profile (or only prepare its model) and return the exit status."""
    logger.remove()
    logger.add(sys.stderr, level="INFO")
    if args[:1] == ["service-cpus"]:
        try:
            print(contract.cpu_list(contract.service_cpus() or ()))
        except ValueError as exc:
            logger.error("{}", exc)
            return 2
        return 0
    try:
        settings = EngineSettings.from_env()
    except (SettingsError, ValueError) as exc:
        logger.error("invalid engine settings: {}", exc)
        return 2
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    logger.add(settings.log_dir / "inference.log", level="INFO", rotation="50 MB", retention="14 days")
    model = settings.model or default_model(settings)
    if settings.profile == "cpu" and not settings.model:
        try:
            prepare_cpu_model(settings.models_dir / CPU_MODEL_DIR)
        except ModelNotAvailable as exc:
            logger.error("cannot prepare the CPU model: {}", exc)
            return 2
    if args[:1] == ["prepare"]:
        return 0
    argv, env = build_command(settings, model, os.environ)
    return supervise(argv, env, settings.health_url, settings.start_timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
