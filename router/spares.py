"""Start provisioned idle instances through supervisord when every running one is busy.

supervisord provisions EXAI_MAX_INSTANCES instance processes but autostarts only EXAI_INSTANCES;
the others are spares. Every allocation that has to wait asks for a spare, so several waiters
start several spares at once, but never more than are waiting: spares still booting (running
in supervisord, not yet registered) count against the waiters. The starts themselves go one
at a time (a few milliseconds each, `wait=False`), and a cooldown per instance keeps one that
fails at startup from being started again and again. `exai scale N` sets a ceiling (Redis key
`instance-cap`): no spare starts while N instances run, so a parked session never undoes a
scale-down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.errors import SupervisorFault, SupervisorUnavailable
from common.fleet.supervisor import SupervisorClient

log = logging.getLogger(__name__)


class Spares:
    def __init__(
        self,
        socket_path: Path,
        *,
        cooldown: float = 10.0,
        cap: Callable[[], Awaitable[int | None]] | None = None,
        registered: Callable[[], Awaitable[set[str]]] | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.cooldown = cooldown
        self.cap = cap
        self.registered = registered
        self._started: dict[str, float] = {}  # process name -> when this router last started it
        self._lock = asyncio.Lock()
        self._client: SupervisorClient | None = None

    async def start_one(self, waiting: int = 1) -> str | None:
        """Start a spare for `waiting` waiters: the name started, or None (enough booting
        already, none left, at the ceiling, or no supervisord)."""
        if not await asyncio.to_thread(self.socket_path.exists):  # a stat: off the loop too
            return None
        async with self._lock:
            if self._client is None:
                self._client = SupervisorClient(self.socket_path, timeout=10.0)
            try:
                procs = await self._client.instances()
                ceiling = await self.cap() if self.cap is not None else None
                if ceiling is not None and sum(1 for p in procs if p.active) >= ceiling:
                    return None
                if self.registered is not None:
                    ready = await self.registered()
                    if sum(1 for p in procs if p.active and p.name not in ready) >= waiting:
                        return None  # enough spares are booting for everyone who waits
                now = time.monotonic()
                for proc in procs:
                    if proc.active or now - self._started.get(proc.name, -float("inf")) < self.cooldown:
                        continue
                    self._started[proc.name] = now
                    if await self._client.start(proc.name, wait=False):
                        log.info("started spare instance %s", proc.name)
                        return proc.name
            except (SupervisorUnavailable, SupervisorFault) as exc:
                log.warning("could not start a spare instance: %s", exc)
            return None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
