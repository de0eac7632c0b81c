"""RedisGuard.batched (instance/storage/cache.py): commands started in one event-loop turn share one
pipelined round trip, each caller gets its own answer or its own error, and an outage reaches
every caller of the batch as CacheDown. RedisGuard.command: written at once on the direct line
when it is up, else through redis-py; a line lost before the reply sends the command again."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from common.errors import ThreadNotFound
from common.keys import Keys
from common.redis import create_redis
from common.settings import Settings
from instance.storage import Storage
from instance.storage.cache import CacheDown, RedisGuard
from tests.instance.storage.conftest import FaultProxy


async def test_reads_started_together_share_one_round_trip(redis: Redis) -> None:
    key = f"exaibatch:{uuid.uuid4().hex}"
    await redis.set(key, "v", ex=60)
    await redis.hset(key + ":h", mapping={"principal": "p"})
    await redis.expire(key + ":h", 60)
    guard = RedisGuard(redis)
    got = await asyncio.gather(
        guard.batched(lambda r: r.mget([key, key + ":none"])),
        guard.batched(lambda r: r.hget(key + ":h", "principal")),
        guard.batched(lambda r: r.eval("return ARGV[1]", 0, "x")),
    )
    assert got == [["v", None], "p", "x"]
    assert guard.batched_total == 3
    alone = await guard.batched(lambda r: r.get(key))  # a lone command goes as it is
    assert alone == "v"
    assert guard.batched_total == 3


async def test_one_commands_error_reaches_only_its_caller(redis: Redis) -> None:
    key = f"exaibatch:{uuid.uuid4().hex}"
    await redis.set(key, "v", ex=60)
    guard = RedisGuard(redis)
    good, bad = await asyncio.gather(
        guard.batched(lambda r: r.get(key)),
        guard.batched(lambda r: r.hget(key, "field")),  # WRONGTYPE: a string, not a hash
        return_exceptions=True,
    )
    assert good == "v"
    assert isinstance(bad, ResponseError)


async def test_an_outage_is_cache_down_for_every_caller(redis_url: str) -> None:
    proxy = await FaultProxy(*_host_port(redis_url)).start()
    client = create_redis(proxy.url(redis_url))
    try:
        guard = RedisGuard(client)
        assert await guard.batched(lambda r: r.ping())
        proxy.cut()
        results = await asyncio.gather(
            guard.batched(lambda r: r.get("exaibatch:x")),
            guard.batched(lambda r: r.mget(["exaibatch:y"])),
            return_exceptions=True,
        )
        assert all(isinstance(r, CacheDown) for r in results), results
        with pytest.raises(CacheDown):  # remembered: no new attempt during the cooldown
            await guard.batched(lambda r: r.get("exaibatch:x"))
    finally:
        proxy.restore()
        await client.aclose()
        await proxy.close()


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


async def test_a_chat_calls_thread_and_notes_reads_share_one_round_trip(
    storage_settings: Callable[..., Settings], redis: Redis
) -> None:
    """chat starts the thread load, the owner check and the notes read together: the ones that
    go to Redis at once travel in one pipeline, and each gets what it would have alone. (Without
    a tracking connection, which takes these reads on itself: test_tracking.py.)"""
    settings = storage_settings(  # rows stay pending
        flush_interval_ms=60_000, flush_batch_size=10_000, redis_tracking=False
    )
    async with Storage.open(settings, instance_id="t-batch", redis=redis) as st:
        cid, _ = await st.history.start_thread(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            session_id="s",
            tool_name="chat",
            model=None,
            principal="alice",
        )
        await st.notes.for_prompt([("thread", cid), ("session", "s")])  # the copies exist now
        before = _sent_together(st)
        thread, owner, notes = await asyncio.gather(
            st.history.load(cid),
            st.history.check_access(cid, "alice"),
            st.notes.for_prompt([("thread", cid), ("session", "s")]),
        )
        assert [m.content for m in thread] == ["q", "a"]
        assert owner == cid
        assert notes == [[], []]
        # the owner was recorded by this process when it started the thread: no Redis read
        assert _sent_together(st) - before == 2
        with pytest.raises(ThreadNotFound):  # another principal's thread is still refused
            await asyncio.gather(st.history.load(cid), st.history.check_access(cid, "bob"))

        # Another process reads the owner once (in the same round trip), then knows it.
        async with Storage.open(settings, instance_id="t-batch-other", redis=redis) as other:
            before = _sent_together(other)
            await asyncio.gather(
                other.history.load(cid),
                other.history.check_access(cid, "alice"),
                other.notes.for_prompt([("thread", cid), ("session", "s")]),
            )
            assert _sent_together(other) - before == 3
            await redis.delete(Keys(settings.redis_prefix).thread_meta(cid))  # the cache is gone ...
            assert await other.history.check_access(cid, "alice") == cid  # ... the owner is known
            with pytest.raises(ThreadNotFound):
                await other.history.check_access(cid, "bob")


def _sent_together(st: Storage) -> int:
    """Commands that went out at once: on the direct line, or in a pipeline with others."""
    return st.cache.batched_total + st.cache.line_commands_total


async def _line_up(guard: RedisGuard) -> None:
    guard.start()
    assert guard.line is not None
    for _ in range(200):
        if guard.line.up:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the direct line did not come up")


async def test_commands_go_out_on_the_direct_line_once_it_is_up(redis: Redis) -> None:
    key = f"exaibatch:{uuid.uuid4().hex}"
    await redis.set(key, "v", ex=60)
    guard = RedisGuard(redis, line=True)
    try:
        assert guard.send_now("GET", key) is None  # not connected yet: it starts connecting
        assert await guard.command("GET", key) == "v"  # meanwhile through redis-py
        assert guard.line_commands_total == 0
        await _line_up(guard)
        got = await asyncio.gather(
            guard.command("MGET", key, key + ":none", batched=True),
            guard.command("EVAL", "return ARGV[1]", 0, "x", batched=True),
            guard.command("HGET", key, "field"),  # WRONGTYPE: only this caller's error
            return_exceptions=True,
        )
        assert got[:2] == [["v", None], "x"]
        assert isinstance(got[2], ResponseError)
        assert guard.line_commands_total == 2
        assert guard.batched_total == 0
    finally:
        await guard.close()


async def test_a_line_lost_before_the_reply_sends_the_command_through_redis_py(redis: Redis) -> None:
    key = f"exaibatch:{uuid.uuid4().hex}"
    guard = RedisGuard(redis, line=True)
    try:
        await _line_up(guard)
        assert guard.line is not None
        args = ("EVAL", "return redis.call('INCR', KEYS[1])", 1, key)
        sent = guard.send_now(*args)
        assert sent is not None
        conn = guard.line._conn
        assert conn is not None and conn.transport is not None
        conn.transport.abort()  # lost before its reply could be read
        got = await guard.reply(sent, *args)
        assert got in (1, 2)  # like redis-py's own retry: the command may have run before the loss
        assert int(await redis.get(key)) == got
        assert guard.line_commands_total == 0
    finally:
        await redis.delete(key)
        await guard.close()


async def test_redis_known_down_skips_the_line(redis_url: str) -> None:
    proxy = await FaultProxy(*_host_port(redis_url)).start()
    client = create_redis(proxy.url(redis_url))
    guard = RedisGuard(client, line=True)
    try:
        await _line_up(guard)
        proxy.cut()
        with pytest.raises(CacheDown):
            await guard.command("GET", "exaibatch:x")
        assert guard.send_now("GET", "exaibatch:x") is None  # known down: not even the line
        with pytest.raises(CacheDown):
            await guard.command("GET", "exaibatch:x")
    finally:
        proxy.restore()
        await guard.close()
        await client.aclose()
        await proxy.close()


async def test_no_reply_within_the_line_timeout_is_redis_down(redis_url: str) -> None:
    """A line that times out is an outage, as redis-py's own timeout is: CacheDown, Redis skipped
    for the cooldown, and the command is not sent a second time."""
    proxy = await FaultProxy(*_host_port(redis_url)).start()
    client = create_redis(proxy.url(redis_url))
    guard = RedisGuard(client, line=True, line_timeout=0.2)
    key = f"exaibatch:{uuid.uuid4().hex}"
    try:
        await _line_up(guard)
        proxy.delay = 0.5  # every command reaches Redis after the line gave up on it
        with pytest.raises(CacheDown):
            await guard.command("INCR", key)
        assert guard.send_now("GET", key) is None  # known down now
        proxy.delay = 0.0
        await asyncio.sleep(0.6)
        direct = create_redis(redis_url)
        try:
            assert await direct.get(key) == "1"  # it ran once, late
            await direct.delete(key)
        finally:
            await direct.aclose()
    finally:
        await guard.close()
        await client.aclose()
        await proxy.close()


@pytest.mark.parametrize("tracking", [False, True], ids=["direct-lines", "tracking"])
async def test_two_processes_on_the_direct_line_keep_one_thread_in_one_order(
    storage_settings: Callable[..., Settings], redis: Redis, tracking: bool
) -> None:
    """Two instances continuing one thread at once, their positions and reads on their direct
    lines: every exchange kept whole, positions 1..N without a gap or a tie, and both read the
    same order (the cache, the spools and Postgres merged). Without tracking the reads are on the
    direct lines too; with it they go on the tracking connections, and a read made while the
    other process's last invalidation is on its way may trust a copy without that exchange: a
    prefix of the same order."""
    settings = storage_settings(redis_tracking=tracking)
    async with (
        Storage.open(settings, instance_id="t-line-a", redis=redis) as a,
        Storage.open(settings, instance_id="t-line-b", redis=redis) as b,
    ):
        for st in (a, b):
            await _line_up(st.cache)
        cid, _ = await a.history.start_thread(
            [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}],
            session_id="s",
            tool_name="chat",
            model=None,
        )

        async def calls(st: Storage, name: str) -> None:
            for i in range(8):
                await st.history.load(cid)
                await st.history.append_exchange(
                    cid,
                    [
                        {"role": "user", "content": f"{name}q{i}"},
                        {"role": "assistant", "content": f"{name}a{i}"},
                    ],
                )

        await asyncio.gather(calls(a, "a"), calls(b, "b"))
        seen = [await st.history.load(cid) for st in (a, b)]
        turns = max(seen, key=len)
        for one in seen:
            assert [m.id for m in one] == [m.id for m in turns][: len(one)]
        if not tracking:
            assert len(seen[0]) == len(seen[1])
        assert len(turns) == 2 + 2 * 16
        assert [m.pos for m in turns] == [p for p in range(1, 18) for _ in (0, 1)]
        for question, answer in zip(turns[::2], turns[1::2], strict=True):
            assert question.role == "user" and answer.role == "assistant"
            assert answer.content == question.content.replace("q", "a")
        if not tracking:
            assert a.cache.line_commands_total >= 16 and b.cache.line_commands_total >= 16
