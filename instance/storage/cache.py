"""Redis as an optional cache: when it is down, callers get a miss instead of an error.

A circuit breaker keeps a dead Redis from costing every call a connect timeout: after a failure
Redis is skipped for `cooldown` seconds, then tried again (the redis-py client reconnects on its
own). The outage and the recovery are each logged once, not per call.

A chat call's own commands (its thread and notes reads, its exchange's position) can go out on a
direct line (common/redis_line.py, `line=True`): written to the socket the moment they are
asked for and answered from the connection's read callback, without redis-py's task hops,
pipeline building and connection-pool locking. The line is only ever a shortcut: while it is
down (connecting, lost) or Redis is known down, the same command takes redis-py's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from common.redis import REDIS_DOWN_ERRORS
from common.redis_line import DirectLine, LineTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")


class CacheDown(Exception):
    """Internal signal: Redis is not usable right now (never leaves the storage package)."""


class RedisGuard:
    """Runs Redis operations, turning outages into CacheDown and remembering them for a while."""

    def __init__(
        self, redis: Redis | None, *, cooldown: float = 2.0, line: bool = False, line_timeout: float = 5.0
    ) -> None:
        self.redis = redis
        # `command`'s direct line (see the module docstring); its timeout is redis-py's socket one.
        self.line = DirectLine(redis, timeout=line_timeout) if line and redis is not None else None
        self.line_commands_total = 0  # commands answered on the direct line
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
            raise self._failed(exc) from None
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

    def _failed(self, exc: BaseException) -> CacheDown:
        """Redis failed now: skip it for the cooldown (logged once per outage)."""
        self._down_until = time.monotonic() + self._cooldown
        if not self._down:
            self._down = True
            log.warning("Redis unreachable (%s); history and tasks continue without the cache", exc)
        return CacheDown(str(exc))

    def start(self) -> None:
        """Connect the direct line in the background (commands before then take redis-py's path)."""
        if self.line is not None:
            self.line.start()

    async def close(self) -> None:
        if self.line is not None:
            await self.line.close()

    def line_writable(self) -> bool:
        """Whether `send_now` would write now."""
        return self.line is not None and not self._down and self.line.writable()

    def send_now(self, *args: Any) -> asyncio.Future[Any] | None:
        """Write one command on the direct line now and return its reply's future (a ResponseError
        reply is its exception); None if the line is not up or Redis is known down (then use
        `command`, which takes redis-py's path). Commands sent here go out in call order."""
        line = self.line
        if line is None or self._down:
            return None
        return line.send(*args)

    async def reply(self, sent: asyncio.Future[Any], *args: Any, batched: bool = False) -> Any:
        """The reply to `args`, already written by `send_now` as `sent`. If the line was lost before
        its reply came, the command is sent again through redis-py (as redis-py's own retry on a
        lost connection does); if no reply came within the line's timeout (redis-py's socket
        timeout), Redis is taken as down, as after redis-py's own timeout, without waiting for
        it once more. Raises CacheDown as `call` does."""
        try:
            result = await sent
        except LineTimeout as exc:
            raise self._failed(exc) from None
        except RedisConnectionError:
            return await self._ordinary(args, batched)
        self.line_commands_total += 1
        return result

    async def command(self, *args: Any, batched: bool = False) -> Any:
        """One Redis command: on the direct line when it is up, else through redis-py (`batched`:
        in the pipeline of this loop turn's `batched` commands). Raises CacheDown as `call` does."""
        sent = self.send_now(*args)
        if sent is None:
            return await self._ordinary(args, batched)
        return await self.reply(sent, *args, batched=batched)

    async def _ordinary(self, args: tuple[Any, ...], batched: bool) -> Any:
        if batched:
            return await self.batched(lambda r: r.execute_command(*args))
        return await self.call(lambda r: r.execute_command(*args))

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
