"""A session's binding in one Redis round trip (router/opening.py), on real Redis.

Counted on a connection of the test's own that counts the commands it sends: opening a new
2026-07-28 session, or binding a parked one again, is one EVALSHA, and it writes exactly what
the slower path would (a fenced lease, the key mapping, the record), never sharing an instance.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from common.errors import NoFreeInstance
from common.keys import Keys
from router.allocation import Allocator
from router.leases import Leases
from router.metrics import Metrics
from router.opening import GONE, Bound, NoneFree, Opened, Opening, Taken
from router.proxy import Proxy
from router.registry import Instance, Registry
from router.security import Guard
from router.sessions import Session, SessionTable, binding_of, new_session_id


class Counting(aioredis.Redis):
    """A client that counts the commands it sends (a pipeline would count as one)."""

    sent: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return await super().execute_command(*args, **options)


@pytest.fixture
async def counting(redis_url: str) -> AsyncIterator[Counting]:
    client = Counting.from_url(redis_url, decode_responses=True)
    client.sent = []
    yield client
    await client.aclose()


async def _register(r: aioredis.Redis, keys: Keys, iid: str, **fields: str) -> None:
    row = {"id": iid, "host": "127.0.0.1", "port": "1", "state": "ready", "session": "", **fields}
    await r.hset(keys.instance(iid), mapping=row)  # type: ignore[arg-type,misc]


def _router(client: aioredis.Redis, keys: Keys) -> tuple[SessionTable, Leases, Opening]:
    table = SessionTable(client, keys, expire_after=60)
    leases = Leases(client, keys, ttl=30)
    return table, leases, Opening(table, leases)


def _counted(opening: Opening, client: Counting) -> None:
    """Count the commands that go out on the opening's own line (router start opens it) with
    the client's: one round trip is one command, whichever connection carried it."""
    line = opening.line
    assert line is not None
    send = line.send

    def counted(*args: Any) -> Any:
        sent = send(*args)
        if sent is not None:
            client.sent.append(str(args[0]))
        return sent

    line.send = counted  # type: ignore[method-assign]


async def _line_up(opening: Opening) -> None:
    for _ in range(500):
        if opening.line is not None and opening.line.up:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the opening's line to Redis did not come up")


def _stateless(key: str) -> Session:
    return Session(id=new_session_id(), era="stateless", principal="local", client="c", key=key)


async def test_a_new_session_is_one_round_trip_with_a_fenced_lease_and_its_record(
    counting: Counting, keys: Keys
) -> None:
    tag = secrets.token_hex(3)
    busy, free = f"op-{tag}-busy", f"op-{tag}-free"
    for iid in (busy, free):
        await _register(counting, keys, iid)
    table, leases, opening = _router(counting, keys)
    await leases.acquire(busy, "someone")
    await opening.load()
    _counted(opening, counting)
    await _line_up(opening)
    before = int(await counting.get(keys.lease_generation(free)) or 0)

    sess = _stateless(f"local/client/{tag}")
    counting.sent.clear()
    got = await opening.open(sess, [busy, free])
    assert counting.sent == ["EVALSHA"]  # key check, lease, key claim and record: one round trip
    assert opening.by_line == 1  # on the line: written at the call
    assert isinstance(got, Opened)
    assert got.instance_id == free and got.instance is not None and got.instance.id == free
    assert got.fence == before + 1 == int(await counting.get(keys.lease_generation(free)) or 0)
    assert await leases.holder(free) == sess.id and await leases.holder(busy) == "someone"
    assert await counting.get(keys.session_key(sess.key)) == sess.id
    assert 0 < await counting.pttl(keys.session_key(sess.key)) <= 60_000
    record = await table.redis.hgetall(keys.session(sess.id))  # type: ignore[misc]
    stored = Session.from_hash(record)
    assert (stored.instance_id, stored.fence, stored.ver) == (free, got.fence, got.ver)
    assert got.ver == 1
    assert (stored.era, stored.principal, stored.key, stored.client) == ("stateless", "local", sess.key, "c")
    assert await counting.zscore(keys.sessions(), sess.id) is not None

    # Another router opening the same key gets the existing session, and takes nothing.
    other_table, _, other = _router(counting, keys)
    counting.sent.clear()
    assert await other.open(_stateless(sess.key), [free]) == Taken(sess.id)
    assert counting.sent == ["EVALSHA"]
    assert await other_table.fetch(sess.id) is not None

    # Parked, then bound again (resume): one round trip, announced to the other routers.
    await leases.release(free, sess.id)
    await table.save(sess, create=False)
    counting.sent.clear()
    opening._open.sha = "0" * 40  # as if Redis had restarted: NOSCRIPT, loaded again, retried
    changes = {"generation": 1, "resumes": 1, "parked_at": 0.0}
    again = await opening.bind(sess, [busy, free], changes, found="")  # the record says parked
    assert counting.sent == ["EVALSHA", "SCRIPT LOAD", "EVALSHA"]
    assert isinstance(again, Opened) and again.instance_id == free and again.fence == got.fence + 1
    counting.sent.clear()
    found = binding_of(free, again.fence)
    assert await opening.bind(sess, [busy, free], {}, found=found) == NoneFree("")  # nothing written
    assert counting.sent == ["EVALSHA"]
    record = await table.redis.hgetall(keys.session(sess.id))  # type: ignore[misc]
    assert (record["fence"], record["resumes"], record["generation"]) == (str(again.fence), "1", "1")
    assert int(record["ver"]) == again.ver > got.ver
    # A router that found it parked ('') while another bound it meanwhile gets that binding,
    # and nothing is leased or written (two routers resuming one session at once).
    await leases.release(free, sess.id)
    assert await opening.bind(sess, [free], changes, found="") == Bound(free, again.ver)
    assert await leases.holder(free) is None
    assert await table.redis.hgetall(keys.session(sess.id)) == record  # type: ignore[misc]
    # So does a router that found it on that instance under an older lease (it was parked and
    # resumed there again meanwhile): the fence is part of the binding.
    stale = binding_of(free, again.fence - 1)
    assert await opening.bind(sess, [free], changes, found=stale) == Bound(free, again.ver)
    assert await leases.holder(free) is None

    # Ended through another router: binding it takes no lease.
    await leases.release(free, sess.id)
    await other_table.remove(Session.from_hash(record))
    assert await counting.get(keys.session_key(sess.key)) is None  # the end dropped the mapping
    assert await opening.bind(sess, [free], {}, found=found) is GONE
    assert await leases.holder(free) is None
    await opening.close()


async def test_nothing_free_writes_nothing_and_a_given_instance_is_recorded(
    counting: Counting, keys: Keys
) -> None:
    tag = secrets.token_hex(3)
    stale, draining, starting = (f"op-{tag}-{n}" for n in ("stale", "draining", "starting"))
    await _register(counting, keys, stale, session="another-session")  # lost lease to reconcile
    await _register(counting, keys, draining)
    await _register(counting, keys, starting, state="starting")
    await counting.sadd(keys.draining(), draining)  # type: ignore[misc]
    table, leases, opening = _router(counting, keys)
    sess = _stateless(f"local/client/{tag}")

    assert await opening.open(sess, [draining, starting, stale]) == NoneFree(stale)
    assert await opening.open(sess, []) == NoneFree("")
    assert await counting.exists(keys.session(sess.id), keys.session_key(sess.key)) == 0
    for iid in (stale, draining, starting):
        assert await leases.holder(iid) is None

    # The slow path's instance: the key claim and the record in one more round trip.
    fence = await leases.acquire(draining, sess.id)
    inst = await table.redis.hgetall(keys.instance(draining))  # type: ignore[misc]
    given = Instance.from_hash(inst)
    assert given is not None
    counting.sent.clear()
    got = await opening.open(sess, [stale], given=(given, fence))
    assert counting.sent == ["EVALSHA"]
    assert got == Opened(draining, fence, 1, given)
    assert await counting.get(keys.session_key(sess.key)) == sess.id
    assert await counting.hget(keys.session(sess.id), "instance_id") == draining  # type: ignore[misc]
    await counting.srem(keys.draining(), draining)  # type: ignore[misc]


async def test_concurrent_openings_never_share_an_instance(counting: Counting, keys: Keys) -> None:
    tag = secrets.token_hex(3)
    ids = [f"op-{tag}-{n}" for n in range(5)]
    for iid in ids:
        await _register(counting, keys, iid)
    routers = [_router(counting, keys)[2] for _ in range(3)]

    # 30 new sessions on three routers at once, 5 free instances: 5 get one each.
    sessions = [_stateless(f"local/client/{tag}-{n}") for n in range(30)]
    got = await asyncio.gather(*(routers[n % 3].open(s, ids) for n, s in enumerate(sessions)))
    opened = [(s, g) for s, g in zip(sessions, got, strict=True) if isinstance(g, Opened)]
    assert len(opened) == 5
    assert sorted(g.instance_id for _, g in opened) == sorted(ids)
    assert all(g == NoneFree("") for g in got if not isinstance(g, Opened))
    leases = Leases(counting, keys, ttl=30)
    for sess, g in opened:
        assert await leases.holder(g.instance_id) == sess.id

    # One key opened by many at once: exactly one session, every other opening is told its id.
    for s, g in opened:
        assert isinstance(g, Opened)
        await leases.release(g.instance_id, s.id)
    same = [_stateless(f"local/client/{tag}-same") for _ in range(12)]
    got = await asyncio.gather(*(routers[n % 3].open(s, ids) for n, s in enumerate(same)))
    winners = [s.id for s, g in zip(same, got, strict=True) if isinstance(g, Opened)]
    assert len(winners) == 1
    assert all(g == Taken(winners[0]) for g in got if not isinstance(g, Opened))
    held = [await leases.holder(iid) for iid in ids]
    assert held.count(winners[0]) == 1 and held.count(None) == 4


def _proxy(client: aioredis.Redis, keys: Keys, http: aiohttp.ClientSession, deadline: float = 0.3) -> Proxy:
    """The router's /mcp side without a server: what opening a session goes through."""
    settings: Any = SimpleNamespace(allocation_deadline=deadline, autostart_spares=False, max_instances=2)
    registry = Registry(client, keys)
    table, leases, _ = _router(client, keys)
    allocator = Allocator(settings, registry, leases, Metrics())
    return Proxy(
        http=http, table=table, registry=registry, leases=leases, allocator=allocator,
        guard=Guard(tokens={}, admin_token=None, origins=()), metrics=Metrics(), internal_token="t",
        max_body_bytes=1 << 20,
    )  # fmt: skip


async def test_the_router_opens_a_session_in_one_round_trip_and_falls_back_when_none_is_known(
    counting: Counting, keys: Keys
) -> None:
    tag = secrets.token_hex(3)
    keys = Keys(f"{keys.prefix}:op{tag}")  # a registry of this test's own
    ids = [f"op-{tag}-{n}" for n in range(2)]
    for iid in ids:
        await _register(counting, keys, iid)
        await counting.sadd(keys.instances(), iid)  # type: ignore[misc]
    request: Any = SimpleNamespace(remote="127.0.0.1")
    async with aiohttp.ClientSession() as http:
        one, two = _proxy(counting, keys, http), _proxy(counting, keys, http)
        await one.registry.instances()  # as after the router's first registry read
        await one.bindings.opening.load()
        _counted(one.bindings.opening, counting)

        counting.sent.clear()
        sess = await one._open_stateless(request, "local", f"local/client/{tag}", "c")
        assert counting.sent == ["EVALSHA"]
        assert one.table.by_key[sess.key] is sess and sess.stored and sess.ver == 1
        first = one.bindings.targets[sess.id]
        assert first.id == sess.instance_id and await one.leases.holder(first.id) == sess.id

        # Another router, which has not read the registry yet: the key's session, from Redis.
        counting.sent.clear()
        found = await two._open_stateless(request, "local", f"local/client/{tag}", "c")
        assert found.id == sess.id and found.instance_id == first.id
        assert counting.sent == ["EVALSHA", "HGETALL"]
        # A new key there: nothing known, so the allocator's slow path, then claim and record.
        other = await two._open_stateless(request, "local", f"local/client/{tag}-2", "c")
        (second,) = [i for i in ids if i != first.id]
        assert other.instance_id == second and await two.leases.holder(second) == other.id
        record = await counting.hgetall(keys.session(other.id))  # type: ignore[misc]
        assert (record["instance_id"], record["fence"]) == (second, str(other.fence))
        assert await counting.get(keys.session_key(other.key)) == other.id

        # Both taken: the third waits out the deadline, is refused, and leaves nothing behind.
        with pytest.raises(NoFreeInstance):
            await one._open_stateless(request, "local", f"local/client/{tag}-3", "c")
        assert await counting.get(keys.session_key(f"local/client/{tag}-3")) is None
        assert await counting.zcard(keys.sessions()) == 2
        await one.close()
        await two.close()


async def test_concurrent_lookups_of_one_session_share_one_redis_read(counting: Counting, keys: Keys) -> None:
    """64 calls of a session this router does not hold yet (it was opened by another router) read
    its record once; a caller that goes away does not cancel the others' read."""
    other_table, _, _ = _router(counting, keys)
    sess = Session(id=new_session_id(), era="stateless", principal="local", client="c")
    assert await other_table.save(sess)

    table, _, _ = _router(counting, keys)
    counting.sent.clear()
    first = asyncio.ensure_future(table.fetch(sess.id))
    await asyncio.sleep(0)
    first.cancel()  # its client disconnected
    got = await asyncio.gather(*(table.fetch(sess.id) for _ in range(64)))
    assert {s.id for s in got if s is not None} == {sess.id} and None not in got
    assert counting.sent.count("HGETALL") == 1
    assert first.cancelled()
    # and a session nobody has is one read too, answered None to every caller
    counting.sent.clear()
    unknown = new_session_id()
    missing = await asyncio.gather(*(table.fetch(unknown) for _ in range(8)))
    assert missing == [None] * 8 and counting.sent.count("HGETALL") == 1


class _BrokenLine:
    """A line that took the script and then broke (the script may or may not have run)."""

    up = True

    def send(self, *args: Any) -> asyncio.Future[Any]:
        sent: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        sent.set_exception(RedisConnectionError("the direct Redis line closed"))
        return sent

    async def close(self) -> None:
        pass


async def test_without_its_line_the_script_goes_through_redis_py(counting: Counting, keys: Keys) -> None:
    """The line is an optimisation: down (closed, not connected yet) or broken with the script
    in flight, the opening goes through redis-py and comes out the same."""
    tag = secrets.token_hex(3)
    ids = [f"op-{tag}-{n}" for n in range(3)]
    for iid in ids:
        await _register(counting, keys, iid)
    table, leases, opening = _router(counting, keys)
    await opening.load()
    await _line_up(opening)
    first = _stateless(f"local/client/{tag}-1")
    counting.sent.clear()
    assert isinstance(await opening.open(first, ids), Opened)
    assert counting.sent == [] and opening.by_line == 1  # the line carried it

    await opening.close()  # the line is down now
    second = _stateless(f"local/client/{tag}-2")
    got = await opening.open(second, ids)
    assert counting.sent == ["EVALSHA"] and opening.by_line == 1
    assert isinstance(got, Opened) and await leases.holder(got.instance_id) == second.id

    opening.line = _BrokenLine()  # type: ignore[assignment]
    third = _stateless(f"local/client/{tag}-3")
    counting.sent.clear()
    got = await opening.open(third, ids)
    assert counting.sent == ["EVALSHA"] and opening.by_line == 1
    assert isinstance(got, Opened) and await leases.holder(got.instance_id) == third.id
    assert await counting.hget(keys.session(third.id), "instance_id") == got.instance_id  # type: ignore[misc]
    for sess in (first, second, third):
        await table.remove(sess)


async def test_a_park_writes_only_over_the_binding_it_parks(counting: Counting, keys: Keys) -> None:
    """Parking (router/binding.py `_park_record`) is a compare-and-set too: a router whose copy
    is stale (another router moved the session meanwhile) must not write "parked" over the new
    binding, or the session's next call would bind it a second time while the other router
    still serves it there. It takes the record's view instead."""
    ours = SessionTable(counting, keys, expire_after=60)
    theirs = SessionTable(counting, keys, expire_after=60)
    tag = secrets.token_hex(3)
    sess = Session(
        id=new_session_id(), era="handshake", principal="local", client="c", instance_id=f"{tag}-1", fence=5
    )
    assert await ours.save(sess)
    moved = await theirs.fetch(sess.id)
    assert moved is not None
    moved.instance_id, moved.fence = f"{tag}-2", 6
    assert await theirs.save(moved, create=False)  # another router moved it

    sess.instance_id, sess.parked_at = "", 1.0  # the stale router parks what it thinks it has
    assert not await ours.save(sess, create=False, expect=(f"{tag}-1", 5))
    stored = Session.from_hash(await counting.hgetall(keys.session(sess.id)))  # type: ignore[misc]
    assert (stored.instance_id, stored.fence, stored.parked_at) == (f"{tag}-2", 6, 0.0)
    assert (sess.instance_id, sess.fence) == (f"{tag}-2", 6) and not sess.ended  # the record's view

    sess.instance_id, sess.parked_at = "", 2.0  # now the binding it names: parked
    assert await ours.save(sess, create=False, expect=(f"{tag}-2", 6))
    stored = Session.from_hash(await counting.hgetall(keys.session(sess.id)))  # type: ignore[misc]
    assert (stored.instance_id, stored.parked_at) == ("", 2.0)
    await ours.remove(sess)


async def test_a_session_waiting_for_an_instance_takes_the_binding_another_router_gave_it(
    counting: Counting, keys: Keys
) -> None:
    """A full fleet: this router waits for an instance to resume a parked session while another
    router binds that session (it had an instance to hand over). Once the change notice comes,
    the waiter takes that binding instead of waiting out the allocation deadline for a second
    instance, and then refusing a call the other router is serving (tests/router/test_zz_* runs
    showed clients refused after 30 s while their session was bound)."""
    tag = secrets.token_hex(3)
    keys = Keys(f"{keys.prefix}:op{tag}")
    ids = [f"op-{tag}-{n}" for n in range(2)]
    for n, iid in enumerate(ids):
        await _register(counting, keys, iid)
        await counting.sadd(keys.instances(), iid)  # type: ignore[misc]
        await Leases(counting, keys, ttl=30).acquire(iid, f"busy-{n}")  # both serve other sessions
    async with aiohttp.ClientSession() as http:
        one, two = _proxy(counting, keys, http, deadline=20.0), _proxy(counting, keys, http)
        sess = Session(id=new_session_id(), era="stateless", principal="local", client="c", parked_at=1.0)
        assert await two.table.save(sess)
        mine = await one.table.fetch(sess.id)
        assert mine is not None and not mine.instance_id
        watching = asyncio.create_task(one.table.watch())
        try:
            await one.registry.instances()
            waiting = asyncio.create_task(one.bindings.rebind(mine, mine.generation, "resume"))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # no free instance: waiting
            # The other router hands busy-0's instance to the session and writes its record.
            fence = await two.leases.transfer(ids[0], "busy-0", sess.id, 1)
            assert fence
            sess.instance_id, sess.fence, sess.parked_at = ids[0], fence, 0.0
            assert await two.table.save(sess, create=False)
            await asyncio.wait_for(waiting, 5.0)  # not the 20 s allocation deadline
            waiting.result()
        finally:
            watching.cancel()
        assert (mine.instance_id, mine.fence) == (ids[0], fence)
        assert [await one.leases.holder(i) for i in ids] == [sess.id, "busy-1"]
        await one.close()
        await two.close()


async def test_a_session_opened_after_a_wait_is_recorded_as_seen_when_opened(
    counting: Counting, keys: Keys
) -> None:
    """Other routers judge a session's idleness by its record's last-seen time. A session that
    waited for an instance must not be recorded as last seen when the wait began: another
    router would take it for idle while its first calls are only starting, and park it."""
    tag = secrets.token_hex(3)
    keys = Keys(f"{keys.prefix}:op{tag}")
    iid = f"op-{tag}-0"
    await _register(counting, keys, iid)
    await counting.sadd(keys.instances(), iid)  # type: ignore[misc]
    leases = Leases(counting, keys, ttl=30)
    await leases.acquire(iid, "busy")
    request: Any = SimpleNamespace(remote="127.0.0.1")
    async with aiohttp.ClientSession() as http:
        proxy = _proxy(counting, keys, http, deadline=10.0)
        await proxy.registry.instances()
        opening = asyncio.create_task(proxy._open_stateless(request, "local", f"local/client/{tag}", "c"))
        await asyncio.sleep(1.0)
        assert not opening.done()  # waiting for the busy instance
        freed_at = time.time()
        await leases.release(iid, "busy")
        proxy.allocator.notify_freed()
        sess = await asyncio.wait_for(opening, 5.0)
        record = await counting.hgetall(keys.session(sess.id))  # type: ignore[misc]
        assert float(record["last_seen"]) >= freed_at
        await proxy.close()
