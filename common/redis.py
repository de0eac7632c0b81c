"""The Redis client every fleet process uses: asyncio, pooled, reconnecting on its own."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.errors import ConfigError


def create_redis(url: str | None, *, max_connections: int = 32, socket_timeout: float = 5.0) -> Redis:
    """A client that retries transient connection errors briefly and reconnects after Redis returns.

    It never blocks the caller for long: a dead Redis surfaces as a ConnectionError after a couple
    of quick retries, so callers can degrade (skip the cache) instead of hanging.
    """
    if not url:
        raise ConfigError("REDIS_URL is not set (and no embedded Redis was started)")
    return Redis.from_url(
        url,
        decode_responses=True,
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )


REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""Exceptions that mean "Redis is unreachable right now" (degrade, do not fail)."""
