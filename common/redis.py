"""The Redis client every fleet process uses: asyncio, pooled, reconnecting on its own."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import get_lib_version

from common.errors import ConfigError

_DRIVER = DriverInfo(lib_version=get_lib_version())
"""What each new connection tells Redis about its client (CLIENT SETINFO), built once at
import. Without it redis-py builds it per connection, and its version lookup
(importlib.metadata: a scan of every sys.path folder, 0.4-3 ms) ran on the event loop each
time a pool opened a connection (found by EXAI_LOOP_AUDIT)."""


def create_redis(url: str | None, *, max_connections: int = 32, socket_timeout: float = 5.0) -> Redis:
    """A client that retries transient connection errors briefly and reconnects after Redis returns.

    It never blocks the caller for long: a dead Redis surfaces as a ConnectionError after a couple
    of quick retries, so callers can degrade (skip the cache) instead of hanging.

    The pool blocks: a burst of more than `max_connections` concurrent commands waits (at most
    `socket_timeout`) for a connection to come back. redis-py's default pool raises
    ConnectionError("Too many connections") instead, which every caller reads as "Redis is
    down": 64 clients arriving at once at a router got 503s from a healthy Redis.
    """
    if not url:
        raise ConfigError("REDIS_URL is not set (and no embedded Redis was started)")
    pool = BlockingConnectionPool.from_url(
        url,
        timeout=socket_timeout,
        decode_responses=True,
        max_connections=max_connections,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        driver_info=_DRIVER,
    )
    return Redis.from_pool(pool)


REDIS_DOWN_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
"""Exceptions that mean "Redis is unreachable right now" (degrade, do not fail)."""
