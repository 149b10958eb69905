"""The per-key submit rate limit, counted in Redis so every gunicorn worker shares it.

Each API key has a one-minute window that opens at its first submit. A submit adds its cost (1, or the number
of requests in a batch); one that would take the key past RATE_LIMIT_PER_MINUTE is refused with the seconds
left in the window, and is not counted. The count is sent in the same round trip as the submit's other reads
(`tasks.submit`), so the limit costs three commands in a pipeline instead of a round trip of its own.
"""

from __future__ import annotations

import math

from redis import Redis
from redis.client import Pipeline

from web.errors import RateLimited
from worker import contract

WINDOW_SECONDS = 60
COUNT_REPLIES = 3
"""Replies of the commands `ask_count` queues."""


def _counter(owner: str) -> str:
    return f"{contract.KEY_PREFIX}rate:{owner}"


def ask_count(pipe: Pipeline, owner: str, cost: int) -> None:
    """Queue on `pipe` the commands that count a submit of `cost` for `owner` (COUNT_REPLIES replies)."""
    counter = _counter(owner)
    pipe.incrby(counter, cost)
    pipe.expire(counter, WINDOW_SECONDS, nx=True)  # the window opens with the first submit in it
    pipe.pttl(counter)


def check_count(replies: list, connection: Redis, owner: str, cost: int, limit: int) -> None:
    """Refuse the submit counted by `ask_count` (its `replies`) if it took `owner` past `limit`.

    Raises:
        RateLimited: with the whole seconds until the window closes; the submit's count is taken back.
    """
    count, _, left_ms = replies
    if count <= limit:
        return
    connection.decrby(_counter(owner), cost)
    if cost > limit:
        message = f"a batch of {cost} requests is more than the {limit} submits per minute this API key may make"
        raise RateLimited(message, WINDOW_SECONDS)
    retry_after = max(1, math.ceil(left_ms / 1000)) if left_ms > 0 else WINDOW_SECONDS
    raise RateLimited(f"rate limit reached for this API key: {limit} submits per minute", retry_after)
