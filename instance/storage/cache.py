"""Redis as an optional cache: when it is down, callers get a miss instead of an error.

A circuit breaker keeps a dead Redis from costing every call a connect timeout: after a failure
Redis is skipped for `cooldown` seconds, then tried again (the redis-py client reconnects on its
own). The outage and the recovery are each logged once, not per call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis

from common.redis import REDIS_DOWN_ERRORS

log = logging.getLogger(__name__)

T = TypeVar("T")


class CacheDown(Exception):
    """Internal signal: Redis is not usable right now (never leaves the storage package)."""


class RedisGuard:
    """Runs Redis operations, turning outages into CacheDown and remembering them for a while."""

    def __init__(self, redis: Redis | None, *, cooldown: float = 2.0) -> None:
        self.redis = redis
        self._cooldown = cooldown
        self._down_until = 0.0
        self._down = redis is None
        self.on_recover: Callable[[], Awaitable[None]] | None = None

    @property
    def available(self) -> bool:
        return self.redis is not None and (not self._down or time.monotonic() >= self._down_until)

    async def call(self, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """Run `fn(redis)`; raise CacheDown if Redis is missing, known down, or fails now."""
        redis = self.redis
        if redis is None:
            raise CacheDown("no Redis configured")
        if self._down and time.monotonic() < self._down_until:
            raise CacheDown("Redis is down")
        was_down = self._down
        try:
            result = await fn(redis)
        except REDIS_DOWN_ERRORS as exc:
            self._down_until = time.monotonic() + self._cooldown
            if not self._down:
                self._down = True
                log.warning("Redis unreachable (%s); history and tasks continue without the cache", exc)
            raise CacheDown(str(exc)) from None
        if was_down:
            self._down = False
            log.warning("Redis reachable again; the history cache is back in use")
            if self.on_recover is not None:
                try:
                    await self.on_recover()
                except REDIS_DOWN_ERRORS:
                    self._down = True
                    self._down_until = time.monotonic() + self._cooldown
        return result
