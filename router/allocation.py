"""Finding a free instance for a session: try, wait up to a deadline, then refuse clearly.

Waiting is bounded twice: in time (EXAI_ALLOCATION_DEADLINE) and in numbers (MAX_WAITERS),
so a burst of new sessions can never turn into an unbounded queue or a hung request. While
waiting, the router asks supervisord to start a provisioned spare if that is allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from common.errors import NoFreeInstance
from common.settings import Settings
from router.leases import Leases
from router.metrics import Metrics
from router.registry import Instance, Registry

log = logging.getLogger(__name__)

MAX_WAITERS = 256
POLL_INTERVAL = 0.1


class Allocator:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        leases: Leases,
        metrics: Metrics,
        start_spare: Callable[[], Coroutine[Any, Any, str | None]] | None = None,
        reset: Callable[[Instance], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.leases = leases
        self.metrics = metrics
        self.start_spare = start_spare
        self.reset = reset
        self.waiters = 0
        self._freed = asyncio.Event()

    def notify_freed(self) -> None:
        """Wake waiters now instead of at their next poll."""
        self._freed.set()

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(min(self.settings.allocation_deadline, 30.0) or 5.0))

    async def try_once(self, session_id: str) -> Instance | None:
        instances = await self.registry.instances()
        draining = await self.registry.draining()
        candidates = [
            inst
            for inst in instances.values()
            if inst.state == "ready" and inst.id not in draining and not self.registry.is_suspect(inst)
        ]
        holders = await self.leases.holders([c.id for c in candidates])
        for inst in candidates:
            if holders.get(inst.id) is None and await self.leases.acquire(inst.id, session_id):
                if inst.session and inst.session != session_id and self.reset is not None:
                    # A session ended without its reset (a router died mid-way): reset now.
                    await self.reset(inst)
                return inst
        return None

    async def allocate(self, session_id: str) -> Instance:
        inst = await self.try_once(session_id)
        if inst is not None:
            return inst
        if self.waiters >= MAX_WAITERS:
            self.metrics.allocation_failures.inc()
            raise self._refusal()
        self.metrics.allocation_waits.inc()
        self.waiters += 1
        started = time.monotonic()
        deadline = started + self.settings.allocation_deadline
        spare_task: asyncio.Task[str | None] | None = None
        if self.settings.autostart_spares and self.start_spare is not None:
            spare_task = asyncio.create_task(self._start_spare(self.start_spare))
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.metrics.allocation_failures.inc()
                    raise self._refusal()
                self._freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(POLL_INTERVAL * 2, remaining)):
                        await self._freed.wait()
                inst = await self.try_once(session_id)
                if inst is not None:
                    return inst
        finally:
            self.waiters -= 1
            self.metrics.allocation_wait_seconds.observe(time.monotonic() - started)
            if spare_task is not None and not spare_task.done():
                spare_task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _start_spare(self, start: Callable[[], Coroutine[Any, Any, str | None]]) -> str | None:
        name = await start()
        if name:
            self.metrics.spares_started.inc()
        return name

    def _refusal(self) -> NoFreeInstance:
        live = len(self.registry.last)
        return NoFreeInstance(
            f"No free instance: all {live} running instances are serving other sessions "
            f"(waited {self.settings.allocation_deadline:g}s).",
            running=live,
            max_instances=self.settings.max_instances,
            retry_after=self.retry_after,
        )
