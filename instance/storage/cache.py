"""Redis as an optional cache: when it is down, callers get a miss instead of an error.

A circuit breaker keeps a dead Redis from costing every call a connect timeout: after a failure
Redis is skipped for `cooldown` seconds, then tried again (the redis-py client reconnects on its
own). The outage and the recovery are each logged once, not per call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

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
        # Commands waiting for this loop turn's pipeline, and the task that sends them.
        self._batch: list[tuple[Callable[[Any], Any], asyncio.Future[Any]]] = []
        self._senders: set[asyncio.Task[None]] = set()
        self.batched_total = 0  # commands that shared a round trip with another one

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

    async def batched(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """`call(fn)` for one Redis command, sent in one pipeline with the other `batched`
        commands started in the same event-loop turn. `fn` receives the client or a pipeline
        (redis-py's command methods work on both), so it must issue exactly one command."""
        return await self.call(lambda redis: self._queue(redis, fn))

    def _queue(self, redis: Redis, fn: Callable[[Any], Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._batch.append((fn, fut))
        if len(self._batch) == 1:  # runs after the tasks already ready in this turn
            sender = asyncio.create_task(self._send(redis))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return fut

    async def _send(self, redis: Redis) -> None:
        batch, self._batch = self._batch, []
        try:
            if len(batch) == 1:
                fn, fut = batch[0]
                result = await fn(redis)
                if not fut.done():
                    fut.set_result(result)
                return
            async with redis.pipeline(transaction=False) as pipe:
                for fn, _ in batch:
                    fn(pipe)
                results = await pipe.execute(raise_on_error=False)
            self.batched_total += len(batch)
            for (_, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
        except asyncio.CancelledError:
            for _, fut in batch:
                fut.cancel()
            raise
        except BaseException as exc:  # e.g. the connection failed: every command of the batch
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
