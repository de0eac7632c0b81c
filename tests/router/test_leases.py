"""The one-round-trip lease of a new session (router/leases.py `acquire_first`), on real Redis.

It must take only an instance that is registered, ready, not draining, bound to no other
session and unleased, exactly as the slower allocation path would.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from common.keys import Keys
from router.leases import Leases
from router.registry import Registry


async def _register(r: aioredis.Redis, keys: Keys, iid: str, **fields: str) -> None:
    row = {"id": iid, "host": "127.0.0.1", "port": "1", "state": "ready", "session": "", **fields}
    await r.hset(keys.instance(iid), mapping=row)  # type: ignore[arg-type,misc]


async def test_acquire_first_takes_only_a_free_ready_instance(
    redis_client: aioredis.Redis, keys: Keys
) -> None:
    tag = secrets.token_hex(3)
    ids = [f"inst-{tag}-{n}" for n in range(6)]
    busy, draining, starting, gone, free, bound = ids
    leases = Leases(redis_client, keys, ttl=30)
    for iid in (busy, draining, free):
        await _register(redis_client, keys, iid)
    await _register(redis_client, keys, starting, state="starting")
    await _register(redis_client, keys, bound, session="someone-else")
    # `gone` has no registry entry at all (its heartbeat key expired)
    assert await leases.acquire(busy, "holder") > 0
    await redis_client.sadd(keys.draining(), draining)  # type: ignore[misc]

    got = await leases.acquire_first(ids, "newcomer")
    assert isinstance(got, tuple), got
    iid, fence, row = got
    assert iid == free and fence > 0 and row["id"] == free
    assert await leases.holder(free) == "newcomer"
    assert await leases.holder(busy) == "holder"  # a busy instance is refused, its lease kept
    for other in (draining, starting, bound, gone):
        assert await leases.holder(other) is None

    # Nothing free is left: no lease is taken anywhere, and a second session gets nothing
    # but the unleased instance that names another session (a lost lease to reconcile).
    assert await leases.acquire_first(ids, "late") == [bound]
    assert await leases.acquire_first([busy, draining, starting, gone], "late") == []
    assert await leases.holder(free) == "newcomer"
    # That instance comes before a free one: nothing is taken, the slow path decides in order.
    assert await leases.release(free, "newcomer")
    assert await leases.acquire_first([bound, free], "late") == [bound]
    assert await leases.holder(free) is None
    assert await leases.acquire(free, "newcomer") > fence
    fence = int(str(await redis_client.get(keys.lease_generation(free))))

    # The fencing token grows with each new lease of the same instance.
    assert await leases.release(free, "newcomer")
    again = await leases.acquire_first([free], "next")
    assert isinstance(again, tuple) and again[1] > fence
    await redis_client.srem(keys.draining(), draining)  # type: ignore[misc]


async def test_transfer_moves_only_the_holders_lease_of_a_ready_instance_to_a_higher_token(
    redis_client: aioredis.Redis, keys: Keys
) -> None:
    """`transfer` (an idle session's instance handed to a waiting one) moves the lease only
    from its holder, only on a registered, ready, undrained instance, and always to a token
    above the holder's, even after Redis lost the lease counter."""
    tag = secrets.token_hex(3)
    iid, starting, gone = f"inst-{tag}-0", f"inst-{tag}-1", f"inst-{tag}-2"
    leases = Leases(redis_client, keys, ttl=30)
    await _register(redis_client, keys, iid)
    await _register(redis_client, keys, starting, state="starting")
    fence = await leases.acquire(iid, "idle")
    assert await leases.transfer(iid, "someone-else", "waiting", fence) == 0  # not the holder
    assert await leases.holder(iid) == "idle"
    await redis_client.sadd(keys.draining(), iid)  # type: ignore[misc]
    assert await leases.transfer(iid, "idle", "waiting", fence) == 0
    await redis_client.srem(keys.draining(), iid)  # type: ignore[misc]
    for other in (starting, gone):
        held = await leases.acquire(other, "idle")
        assert await leases.transfer(other, "idle", "waiting", held) == 0
        assert await leases.holder(other) == "idle"
    moved = await leases.transfer(iid, "idle", "waiting", fence)
    assert moved > fence and await leases.holder(iid) == "waiting"
    ttl = await redis_client.pttl(keys.lease(iid))
    assert 0 < ttl <= 30_000  # a lease like any other: it expires unless renewed
    # Redis lost the counter (restarted without its data): the token still goes past the holder's.
    await redis_client.delete(keys.lease_generation(iid))
    again = await leases.transfer(iid, "waiting", "third", moved)
    assert again == moved + 1 and await leases.holder(iid) == "third"
    assert await leases.acquire_first([iid], "late") == []  # held: nobody else gets it
    assert await leases.release(iid, "third")
    assert isinstance(got := await leases.acquire_first([iid], "late"), tuple) and got[1] > again


async def test_the_allocators_survey_is_the_three_reads_in_two_round_trips(
    redis_client: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Registry.survey` (the allocator's look at the whole fleet) says what `instances()`,
    `draining()` and `Leases.holders` say, in two pipelined round trips."""
    tag = secrets.token_hex(3)
    keys = Keys(f"{keys.prefix}:sv{tag}")  # a registry of this test's own
    ids = [f"inst-{tag}-{n}" for n in range(4)]
    held, draining, free, gone = ids
    for iid in (held, draining, free):
        await _register(redis_client, keys, iid)
    await redis_client.sadd(keys.instances(), *ids)  # type: ignore[misc]
    await redis_client.sadd(keys.draining(), draining)  # type: ignore[misc]
    leases = Leases(redis_client, keys, ttl=30)
    assert await leases.acquire(held, "holder") > 0

    trips = 0
    execute = Pipeline.execute

    async def counted(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
        nonlocal trips
        trips += 1
        return await execute(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "execute", counted)
    seen = await Registry(redis_client, keys).survey(keys.lease)
    survey_trips = trips
    monkeypatch.undo()
    assert survey_trips == 2
    assert sorted(seen.instances) == [held, draining, free]  # `gone` has no entry: pruned
    assert seen.draining == {draining}
    assert seen.holders[held] == "holder" and seen.holders[free] is None
    assert await redis_client.sismember(keys.instances(), gone) == 0  # type: ignore[misc]
    again = Registry(redis_client, keys)
    assert await again.instances() == seen.instances and await again.draining() == seen.draining
    assert await leases.holders(list(seen.instances)) == seen.holders
