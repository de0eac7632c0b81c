"""router/routers.py on a real Redis: which sessions a router adopts, and which it never does."""

from __future__ import annotations

import asyncio
import secrets
import time

import redis.asyncio as aioredis

from common.keys import Keys
from router.metrics import Metrics
from router.registry import Registry
from router.routers import Routers
from router.sessions import SessionTable

INTERVAL = 0.1
TTL = 0.3


def _router(redis: aioredis.Redis, keys: Keys, adopted: list[str]) -> Routers:
    table = SessionTable(redis, keys)

    async def renewed() -> None:
        adopted.append(table.origin)

    return Routers(
        redis, keys, table, Registry(redis, keys), Metrics(), ttl=TTL, interval=INTERVAL, adopted=renewed
    )


async def _bound(redis: aioredis.Redis, keys: Keys, iid: str, sid: str, router: str) -> None:
    """An instance serving `sid`, leased to it, whose record names `router`."""
    await redis.sadd(keys.instances(), iid)
    await redis.hset(keys.instance(iid), mapping={"id": iid, "port": "1", "session": sid, "state": "ready"})
    await redis.set(keys.lease(iid), sid)
    record = {"id": sid, "era": "handshake", "instance_id": iid, "router": router, "ver": "1",
              "last_seen": repr(time.time())}  # fmt: skip
    await redis.hset(keys.session(sid), mapping=record)


async def test_only_a_dead_routers_bound_sessions_are_adopted_once(redis_url: str) -> None:
    keys = Keys(f"adopt{secrets.token_hex(3)}")
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    calls: list[str] = []
    a, b = _router(redis, keys, calls), _router(redis, keys, calls)
    try:
        await a.beat()
        await b.beat()
        # A router that died (listed, no key) left s-dead bound; b is alive; c never beat at all.
        await redis.sadd(keys.routers(), "dead")
        await _bound(redis, keys, "i-1", "s-dead", "dead")
        await _bound(redis, keys, "i-2", "s-b", b.id)
        # Redis forgot b's key (a restart): b writes it again within an interval, so it is
        # never taken for dead, however often a looks meanwhile.
        await redis.delete(keys.router(b.id))
        await a.round()
        deadline = time.monotonic() + a.grace * 0.8
        while time.monotonic() < deadline:
            await asyncio.sleep(INTERVAL / 2)
            await a.round()
            await b.round()
        assert (await redis.hget(keys.session("s-b"), "router")) == b.id
        assert "s-b" not in a.table.by_id
        # The dead router's session: adopted by the first survivor to claim it, and only once.
        async with asyncio.timeout(5):
            while "s-dead" not in a.table.by_id and "s-dead" not in b.table.by_id:
                await asyncio.sleep(INTERVAL)
                await a.round()
                await b.round()
        owner = a if "s-dead" in a.table.by_id else b
        other = b if owner is a else a
        assert (await redis.hget(keys.session("s-dead"), "router")) == owner.id
        assert owner.table.by_id["s-dead"].routed_here
        assert "s-dead" not in other.table.by_id
        assert calls == [owner.id]  # its leases renewed and idle sessions parked right after
        assert "dead" not in await redis.smembers(keys.routers())
        assert await owner.adopt("dead") == 0  # again: nothing left to adopt
        assert "s-b" not in a.table.by_id and (await redis.hget(keys.session("s-b"), "router")) == b.id
    finally:
        async for key in redis.scan_iter(match=f"{keys.prefix}:*"):
            await redis.delete(key)
        await redis.aclose()
