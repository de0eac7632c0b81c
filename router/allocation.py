"""Finding a free instance for a session: try, wait up to a deadline, then refuse clearly.

Waiting is bounded twice: in time (EXAI_ALLOCATION_DEADLINE) and in numbers (MAX_WAITERS),
so a burst of new sessions can never turn into an unbounded queue or a hung request. Every
waiter asks supervisord for a provisioned spare of its own (router/spares.py), so several
waiters start several spares at once. Idle sessions park (router/binding.py), and a waiter
gets the instance of the longest-idle one handed over directly (`reclaim`), so waiting means
that more sessions are working at this moment than instances run.

An instance without a lease key whose registry entry names a live session bound to it is not
free: Redis lost the lease, and `reconcile` restores it instead of resetting the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any, overload

from common.errors import NoFreeInstance
from common.redis import REDIS_DOWN_ERRORS
from common.settings import Settings
from router.leases import Leases
from router.metrics import Metrics
from router.registry import Instance, Registry

log = logging.getLogger(__name__)

MAX_WAITERS = 256
POLL_INTERVAL = 0.1
SPARE_RECHECK = 2.0
ASK_AGAIN = 1.0  # how often a waiter asks the other routers again to park an idle session


class Allocator:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        leases: Leases,
        metrics: Metrics,
        start_spare: Callable[[int], Coroutine[Any, Any, str | None]] | None = None,
        reset: Callable[[Instance, str, str], Coroutine[Any, Any, bool]] | None = None,
        reconcile: Callable[[Instance], Coroutine[Any, Any, bool]] | None = None,
        reclaim: Callable[[str], Coroutine[Any, Any, tuple[Instance, int] | None]] | None = None,
        working: Callable[[], int] | None = None,
        ask_others: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.leases = leases
        self.metrics = metrics
        self.start_spare = start_spare
        self.reset = reset
        self.reconcile = reconcile
        self.reclaim = reclaim
        self.working = working or (lambda: 0)
        # Idle sessions another router serves are parked only by that router: a waiter asks the
        # others (router/binding.py `relieve`) when it starts waiting and every ASK_AGAIN s.
        self.ask_others = ask_others
        self.waiters = 0
        self._freed = asyncio.Event()

    def notify_freed(self) -> None:
        """Wake waiters now instead of at their next poll."""
        self._freed.set()

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(min(self.settings.allocation_deadline, 30.0) or 5.0))

    def known(self) -> list[str]:
        """The instances the last registry read saw, suspects left out: the candidates of the
        one-round-trip lease (here and in router/opening.py), which re-checks each in Redis."""
        return [inst.id for inst in self.registry.last.values() if not self.registry.is_suspect(inst)]

    async def try_once(self, session_id: str, *, known_first: bool = True) -> tuple[Instance, int] | None:
        """A free instance and the fencing token of its new lease, or None. `known_first=False`
        skips the one-round-trip try (the caller has just made it, router/opening.py)."""
        if known_first and (got := await self._try_known(session_id)) is not None:
            return got
        seen = await self.registry.survey(self.leases.keys.lease)
        holders = seen.holders
        candidates = [
            inst
            for inst in seen.instances.values()
            if inst.state == "ready" and inst.id not in seen.draining and not self.registry.is_suspect(inst)
        ]
        for inst in candidates:
            if holders.get(inst.id) is not None:
                continue
            stale = bool(inst.session) and inst.session != session_id
            if stale and self.reconcile is not None and await self.reconcile(inst):
                continue  # its session is alive and bound there: the lease was lost, not freed
            fence = await self.leases.acquire(inst.id, session_id)
            if not fence:
                continue
            if stale and self.reset is not None and not await self.reset(inst, inst.session, inst.fence):
                # A session ended without its reset (a router died mid-way) would let us reset
                # here; the instance refused, so it serves a session this router cannot see.
                await self.leases.release(inst.id, session_id)
                continue
            return inst, fence
        return None

    async def _try_known(self, session_id: str) -> tuple[Instance, int] | None:
        """The usual case in one Redis round trip: lease a free instance among those the last
        registry read saw (the script re-checks each one's state, drain mark and lease)."""
        got = await self.leases.acquire_first(self.known(), session_id)
        if isinstance(got, list):
            return None  # none free (stale ones, if any, are the slow path's to reconcile)
        iid, fence, row = got
        inst = Instance.from_hash(row)
        if inst is None or inst.id != iid:  # malformed entry: give it back, take the slow path
            await self.leases.release(iid, session_id)
            return None
        return inst, fence

    async def _try_or_reclaim(self, session_id: str, known_first: bool = True) -> tuple[Instance, int] | None:
        got = await self.try_once(session_id, known_first=known_first)
        if got is None and self.reclaim is not None:
            got = await self.reclaim(session_id)  # an idle session's instance, handed over
        return got

    @overload
    async def allocate(self, session_id: str, *, known_first: bool = True) -> tuple[Instance, int]: ...

    @overload
    async def allocate(
        self, session_id: str, *, known_first: bool = True, abandon: Callable[[], bool]
    ) -> tuple[Instance, int] | None: ...

    async def allocate(
        self, session_id: str, *, known_first: bool = True, abandon: Callable[[], bool] | None = None
    ) -> tuple[Instance, int] | None:
        """A free instance and its fencing token: at once, after parking an idle session, or
        after waiting (bounded). `known_first=False`: the caller has just tried the known
        instances in one round trip (router/opening.py), so the first try reads the registry.
        `abandon`: asked whenever the wait wakes; None is returned once it says True (another
        router has bound the session meanwhile, say)."""
        got = await self._try_or_reclaim(session_id, known_first)
        if got is not None:
            return got
        if self.waiters >= MAX_WAITERS:
            self.metrics.allocation_failures.inc()
            raise self._refusal()
        self.metrics.allocation_waits.inc()
        self.waiters += 1
        started = time.monotonic()
        deadline = started + self.settings.allocation_deadline
        spare_task: asyncio.Task[str | None] | None = None
        next_spare = next_ask = started
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.metrics.allocation_failures.inc()
                    raise self._refusal()
                if self.ask_others is not None and time.monotonic() >= next_ask:
                    next_ask = time.monotonic() + ASK_AGAIN
                    try:
                        await self.ask_others()
                    except REDIS_DOWN_ERRORS as exc:
                        log.debug("could not ask the other routers for an instance: %s", exc)
                if (
                    self.settings.autostart_spares
                    and self.start_spare is not None
                    and time.monotonic() >= next_spare
                    and (spare_task is None or spare_task.done())
                ):
                    # Asked again every SPARE_RECHECK seconds: a spare that died while booting
                    # must not leave this waiter without one.
                    spare_task = asyncio.create_task(self._start_spare(self.start_spare))
                    spare_task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
                    next_spare = time.monotonic() + SPARE_RECHECK
                self._freed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(POLL_INTERVAL * 2, remaining)):
                        await self._freed.wait()
                if abandon is not None and abandon():
                    return None
                got = await self._try_or_reclaim(session_id)
                if got is not None:
                    return got
        finally:
            self.waiters -= 1
            self.metrics.allocation_wait_seconds.observe(time.monotonic() - started)

    async def _start_spare(self, start: Callable[[int], Coroutine[Any, Any, str | None]]) -> str | None:
        name = await start(self.waiters)
        if name:
            self.metrics.spares_started.inc()
        return name

    def _refusal(self) -> NoFreeInstance:
        live = len(self.registry.last)
        working = self.working()
        cap = self.settings.max_instances
        return NoFreeInstance(
            f"No free instance: {working} sessions are working at this moment and all {live} "
            f"running instances serve one each (at most EXAI_MAX_INSTANCES={cap} run; waited "
            f"{self.settings.allocation_deadline:g}s). Idle sessions do not count: they give "
            f"their instance back after EXAI_SESSION_PARK_AFTER.",
            hint=(
                f"Retry after {self.retry_after}s (Retry-After), when a call has finished; or add "
                f"instances with `exai scale N` (raise EXAI_MAX_INSTANCES beyond {cap})."
            ),
            running=live,
            working=working,
            max_instances=cap,
            retry_after=self.retry_after,
        )
