"""The router processes that are alive, as their Redis heartbeats say, and what a dead one leaves.

Several router processes may share one port (EXAI_ROUTER_PROCESSES, SO_REUSEPORT) and one
session table. A session's record names the router process that served it last (`router`,
written by every structural write, by the one-round-trip opening and by the per-second flush
of the sessions a router served: router/sessions.py, router/opening.py). Every router writes
a heartbeat key `router:{id}` (its pid, expiring after EXAI_HEARTBEAT_TTL) every
EXAI_HEARTBEAT_INTERVAL and is listed in the `routers` set.

When a router's key has expired (the process was killed, or cut off from Redis for longer
than the TTL) and stays missing for two more intervals (a live router whose key Redis forgot
in a restart writes it again within one), the others notice on their next round. The
sessions it left bound to an instance are found through the instances (their leases and
registry entries: a handful of keys, not the session table) and adopted by the first survivor
whose compare-and-set turns the record's `router` from the dead router to itself: the
survivor caches them, renews their leases from then on, may park them for a waiting session
(router/binding.py `reclaim`), and parks them when they are idle exactly as its own (at once
if they have been idle for EXAI_SESSION_PARK_AFTER already). So a dead router's instances
come free, or go on serving its sessions through another router, within the heartbeat TTL
plus three intervals (2 s + 1.5 s in the tests, 6 s + 6 s by default), instead of after its
leases lapse (EXAI_LEASE_TTL) and an allocation reconciles them, and a router that never
served them waits EXAI_SESSION_PARK_AFTER more to park them.

Only sessions whose record names a router whose heartbeat has expired are adopted: a live
router's sessions are never taken. A router that was alive but cut off from Redis for longer
than the TTL does have its sessions adopted; it keeps its copies, as routers that share a
session always have, and the record decides which instance serves it. The one thing that can
then go wrong: a call in flight on that router, in a session idle for EXAI_SESSION_PARK_AFTER
by the record (which that router could not refresh), is cut when the adopter parks it.
The dead router leaves the set only once its sessions are adopted; a survivor that dies midway
leaves it there for the next one, and adopting twice changes nothing. A router that stops
gracefully deletes its key, so the others adopt its sessions after the grace, without waiting
for the TTL.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from common.keys import Keys
from common.redis import REDIS_DOWN_ERRORS
from router.metrics import Counter, Metrics
from router.registry import Registry
from router.sessions import SessionTable

log = logging.getLogger(__name__)

# KEYS: the session's record. ARGV: the dead router's id, this router's id. 1 if the record
# named the dead router (and now names this one), else 0 (another survivor was first).
_CLAIM = """
if redis.call('hget', KEYS[1], 'router') == ARGV[1] then
  redis.call('hset', KEYS[1], 'router', ARGV[2])
  return 1
end
return 0
"""


class Routers:
    """This router's heartbeat, and the adoption of the sessions dead routers leave bound."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        table: SessionTable,
        registry: Registry,
        metrics: Metrics,
        *,
        ttl: float,
        interval: float,
        adopted: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.table = table
        self.registry = registry
        self.id = table.origin
        self.ttl_ms = int(ttl * 1000)
        # A router is dead once its key has been missing this long, as this router saw it: a
        # live one that lost its key (Redis restarted and forgot it) writes it again within an
        # interval, so it is never taken for dead.
        self.grace = 2 * interval
        self._missing: dict[str, float] = {}  # router id -> when this router first found no key
        # Whether another router's heartbeat was there at the last round (until the first round:
        # assume so). Parking then allows for the other routers' flush lag (router/binding.py).
        self.others_alive = True
        self.adopted = adopted  # run after sessions were adopted: renew their leases, park the idle
        self._claim = redis.register_script(_CLAIM)
        self.lost = Counter(
            "exai_router_routers_lost_total",
            "Other router processes whose heartbeat expired, noticed (and their sessions adopted) here.",
        )
        self.adoptions = Counter(
            "exai_router_sessions_adopted_total",
            "Sessions bound to an instance that a dead router process left, adopted by this one.",
        )
        self.beats = Counter("exai_router_heartbeats_total", "Heartbeats this router process wrote to Redis.")
        metrics.add(self.lost)
        metrics.add(self.adoptions)
        metrics.add(self.beats)

    async def beat(self) -> list[str]:
        """Write this router's heartbeat; return the ids of the routers listed (itself too)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.router(self.id), str(os.getpid()), px=self.ttl_ms)
            pipe.sadd(self.keys.routers(), self.id)
            pipe.smembers(self.keys.routers())
            *_, listed = await pipe.execute()
        self.beats.inc()
        ids = sorted(str(r) for r in listed)
        if ids == [self.id]:  # known at once when this router is the only one ever listed
            self.others_alive = False
        return ids

    async def round(self) -> None:
        """One heartbeat, and the adoption of what routers found dead left (router/app.py)."""
        others = [r for r in await self.beat() if r != self.id]
        if not others:
            self.others_alive = False
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in others:
                pipe.exists(self.keys.router(rid))
            alive = await pipe.execute()
        self.others_alive = any(alive)
        now = time.monotonic()
        for rid, up in zip(others, alive, strict=True):
            if up:
                self._missing.pop(rid, None)
            else:
                self._missing.setdefault(rid, now)
        for gone in set(self._missing) - set(others):
            del self._missing[gone]
        dead = [rid for rid in others if now - self._missing.get(rid, now) >= self.grace]
        for rid in dead:
            count = await self.adopt(rid)
            self.lost.inc()
            log.warning("router process %s stopped beating: adopted %d bound session(s) it left", rid, count)
            await self.redis.srem(self.keys.routers(), rid)
            self._missing.pop(rid, None)

    async def adopt(self, dead: str) -> int:
        """Adopt the sessions bound to an instance whose record names the router `dead`."""
        instances = await self.registry.instances()
        ids = sorted(instances)
        candidates = {inst.session for inst in instances.values() if inst.session}
        if ids:
            holders = await self.redis.mget([self.keys.lease(iid) for iid in ids])
            candidates |= {str(h) for h in holders if h}
        sids = sorted(candidates)
        if not sids:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hmget(self.keys.session(sid), ["router", "instance_id"])
            rows = await pipe.execute()
        count = 0
        for sid, (router, instance_id) in zip(sids, rows, strict=True):
            if router is None or str(router) != dead or not instance_id:
                continue
            if not await self._claim(keys=[self.keys.session(sid)], args=[dead, self.id]):
                continue  # another survivor claimed it first
            sess = await self.table.fetch(sid)
            if sess is None or sess.ended:
                continue
            if sess.stored:
                await self.table.refresh(sess)  # a copy cached here before may be old
            sess.routed_here = True  # no other router serves it: this one may park it under pressure
            count += 1
            self.adoptions.inc()
            log.info("adopted session %s on %s from router process %s", sid[:8], sess.instance_id, dead)
        if count and self.adopted is not None:
            await self.adopted()
        return count

    async def close(self) -> None:
        """A graceful stop: the others adopt this router's sessions at once."""
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await self.redis.delete(self.keys.router(self.id))
