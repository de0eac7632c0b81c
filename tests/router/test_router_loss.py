"""A router process that dies for good: the others adopt the sessions it left bound within a
few heartbeats (router/routers.py), never those of a router that is alive.

Real supervisord runs two router processes on one port (EXAI_ROUTER_PROCESSES=2, SO_REUSEPORT)
and three instances; sessions of both eras are made through router_1 alone, which is then
SIGKILLed and kept stopped. The fleet's leases last 120 s (EXAI_LEASE_TTL), so nothing here can
pass by a lease lapsing: before this, router_2 could free those instances only after that and
EXAI_SESSION_PARK_AFTER more.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS
from tests.router.test_routers import HANDSHAKE, VERSION, RawSession, _pinned

pytestmark = [pytest.mark.usefixtures("provider"), pytest.mark.timeout(300)]

SETTINGS = {
    **ROUTER_TEST_SETTINGS,  # heartbeats every 0.5 s, expiring after 2 s
    "lease_ttl": 120.0,
    "session_park_after": 6.0,
    "allocation_deadline": 5.0,
}
SOON = 20.0  # seconds: far below the leases' 120 s


def _counter(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.split(" ")[0].split("{")[0] == name]
    return sum(float(line.split()[-1]) for line in lines)


async def _metric(fleet: Fleet, pid: str, name: str) -> float:
    """A counter of the router process `pid` (read over a connection that process accepted)."""
    probe = await _pinned(fleet, VERSION, "probe", pid)
    try:
        return _counter(await probe.metrics(), name)
    finally:
        await probe.close()


async def test_a_dead_routers_sessions_are_adopted_within_heartbeats(fleet_factory: Any) -> None:
    fleet: Fleet = await asyncio.to_thread(
        fleet_factory, instances=3, max_instances=3, router_processes=2, **SETTINGS
    )
    procs = {p.full_name: p for p in await asyncio.to_thread(fleet.processes)}
    doomed, survivor = (str(procs[f"router:router_{n}"].pid) for n in (1, 2))
    redis = aioredis.from_url(str(fleet.settings.redis_url), decode_responses=True)
    orphans = [await _pinned(fleet, era, f"orphan-{n}", doomed) for n, era in enumerate((HANDSHAKE, VERSION))]
    own = await _pinned(fleet, VERSION, "own", survivor)
    try:
        for raw in orphans:
            await raw.open()
        first = [await raw.status(1) for raw in orphans]
        mine = await own.status(1)
        sids = [st["session"] for st in first]
        held = {st["instance_id"]: st["session"] for st in first}
        assert len(held) == 2 and mine["instance_id"] not in held
        records = [await redis.hgetall(fleet.keys.session(sid)) for sid in sids]
        doomed_id = records[0]["router"]
        assert {r["router"] for r in records} == {doomed_id}  # the record names who served it
        survivor_id = (await redis.hgetall(fleet.keys.session(mine["session"])))["router"]
        assert survivor_id != doomed_id
        assert await redis.exists(fleet.keys.router(doomed_id), fleet.keys.router(survivor_id)) == 2

        # While router_1 is alive, router_2 beats on and takes none of its sessions.
        start = await _metric(fleet, survivor, "exai_router_heartbeats_total")
        async with asyncio.timeout(SOON):
            while True:
                if await _metric(fleet, survivor, "exai_router_heartbeats_total") >= start + 6:  # 3 s > TTL
                    break
                await asyncio.sleep(0.2)
        assert await _metric(fleet, survivor, "exai_router_sessions_adopted_total") == 0
        for sid, (iid, _) in zip(sids, held.items(), strict=True):
            assert (await redis.hget(fleet.keys.session(sid), "router")) == doomed_id
            assert await redis.get(fleet.keys.lease(iid)) == sid

        for n, raw in enumerate(orphans):  # used just now: not idle for a while yet
            await raw.status(2 + n)
            await raw.close()
        pid = await asyncio.to_thread(fleet._kill, "router:router_1", signal.SIGKILL)
        assert str(pid) == doomed
        await asyncio.to_thread(fleet._wait_dead, pid)
        await asyncio.to_thread(fleet._keep_stopped, "router:router_1")

        # router_2 notices within a few heartbeats, adopts both, and parks them once idle:
        # their instances come free long before the leases (120 s) could lapse.
        async with asyncio.timeout(SOON):
            while True:
                leases = {iid: await redis.get(fleet.keys.lease(iid)) for iid in held}
                bound = [await redis.hget(fleet.keys.session(sid), "instance_id") for sid in sids]
                if all(v is None for v in leases.values()) and bound == ["", ""]:
                    break
                await asyncio.sleep(0.1)
        assert await _metric(fleet, survivor, "exai_router_sessions_adopted_total") == 2
        assert await _metric(fleet, survivor, "exai_router_routers_lost_total") >= 1
        for sid in sids:
            assert (await redis.hget(fleet.keys.session(sid), "router")) == survivor_id
        assert doomed_id not in await redis.smembers(fleet.keys.routers())

        # The orphans go on through router_2 under their own ids.
        for n, (raw, st) in enumerate(zip(orphans, first, strict=True)):
            again = RawSession(fleet, raw.era, raw.name)
            again.sid = raw.sid
            try:
                assert await again.pid() == survivor
                assert (await again.status(10 + n))["session"] == st["session"]
            finally:
                await again.close()
        # router_2's own session was never adopted nor moved by any of this.
        assert (await redis.hget(fleet.keys.session(mine["session"]), "router")) == survivor_id
    finally:
        for raw in [*orphans, own]:
            with contextlib.suppress(Exception):
                await raw.close()
        await redis.aclose()
