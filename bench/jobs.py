"""Trivial job for measuring the workers' own throughput."""


def noop() -> None:
    """Do nothing, so only the queue and the worker are measured."""
