"""The instance's entry in the Redis registry, kept alive by a heartbeat.

The router finds instances through this hash; its TTL (EXAI_HEARTBEAT_TTL) makes a dead
instance vanish on its own. Redis being briefly down must not stop the instance, so every
Redis error is logged once and the next beat tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from redis.asyncio import Redis

from common.keys import Keys
from common.protocol import REGISTRY_FIELDS
from common.redis import REDIS_DOWN_ERRORS
from instance.runtime import Runtime

log = logging.getLogger(__name__)

NOW_TIMEOUT = 1.0  # seconds a write the caller waits for may take (else the heartbeat writes it)


class Registry:
    """Registers `runtime` under Keys.instance(id) and refreshes it every heartbeat_interval."""

    def __init__(self, runtime: Runtime, redis: Redis) -> None:
        self.runtime = runtime
        self.redis = redis
        self.keys = Keys(runtime.settings.redis_prefix)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._redis_ok = True
        self._stopped = False
        self.beats = 0

    def fields(self) -> dict[str, str]:
        rt = self.runtime
        values: dict[str, str] = {
            "id": rt.identity.id,
            "host": rt.identity.advertise,
            "port": str(rt.identity.port),
            "pid": str(rt.pid),
            "state": rt.state,
            "session": rt.session or "",
            "started_at": f"{rt.started_at:.3f}",
            "heartbeat": f"{time.time():.3f}",
            "version": rt.version,
            "fence": rt.binding.fence if rt.binding else "",
        }
        assert tuple(values) == REGISTRY_FIELDS
        return values

    async def beat(self) -> bool:
        """Write the hash and its TTL once; False (logged) if Redis is unreachable."""
        key = self.keys.instance(self.runtime.identity.id)
        ttl_ms = int(self.runtime.settings.heartbeat_ttl * 1000)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=self.fields())  # type: ignore[arg-type]
                pipe.pexpire(key, ttl_ms)
                pipe.sadd(self.keys.instances(), self.runtime.identity.id)
                await pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            if self._redis_ok:
                log.warning("registry: Redis unreachable (%s); will keep retrying", exc)
            self._redis_ok = False
            return False
        if not self._redis_ok:
            log.info("registry: Redis is back")
        self._redis_ok = True
        self.beats += 1
        return True

    async def beat_now(self) -> bool:
        """Write the entry now, waiting at most NOW_TIMEOUT (a reset's answer waits for it);
        False if it was not written (Redis unreachable or slow, or the registry stopped)."""
        if self._stopped:
            return False
        try:
            async with asyncio.timeout(NOW_TIMEOUT):
                return await self.beat()
        except TimeoutError:
            return False

    def poke(self) -> None:
        """Beat now (state or session changed) instead of at the next interval."""
        self._wake.set()

    async def _run(self) -> None:
        interval = self.runtime.settings.heartbeat_interval
        while not self._stopped:
            await self.beat()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
            self._wake.clear()

    async def start(self) -> None:
        # A new process starts undrained: draining is an order to the process that got it.
        try:
            await self.redis.srem(self.keys.draining(), self.runtime.identity.id)
        except REDIS_DOWN_ERRORS as exc:
            log.warning("registry: could not clear a drain mark (%s)", exc)
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="registry-heartbeat")

    async def stop(self) -> None:
        """Stop beating and remove the entry so the router stops routing here at once."""
        # A flag as well as cancel(): a cancellation that lands inside a Redis call can come
        # back as a redis TimeoutError, which beat() treats as "Redis down" and swallows.
        self._stopped = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.keys.instance(self.runtime.identity.id))
                pipe.srem(self.keys.instances(), self.runtime.identity.id)
                await pipe.execute()
        except REDIS_DOWN_ERRORS as exc:
            log.warning("registry: could not deregister (%s); the entry expires on its own", exc)
