"""RedisGuard.batched (instance/storage/cache.py): commands started in one event-loop turn share one
pipelined round trip, each caller gets its own answer or its own error, and an outage reaches
every caller of the batch as CacheDown."""

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
    go to Redis at once travel in one pipeline, and each gets what it would have alone."""
    settings = storage_settings(flush_interval_ms=60_000, flush_batch_size=10_000)  # rows stay pending
    async with Storage.open(settings, instance_id="t-batch", redis=redis) as st:
        cid, _ = await st.history.start_thread(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            session_id="s",
            tool_name="chat",
            model=None,
            principal="alice",
        )
        await st.notes.for_prompt([("thread", cid), ("session", "s")])  # the copies exist now
        before = st.cache.batched_total
        thread, owner, notes = await asyncio.gather(
            st.history.load(cid),
            st.history.check_access(cid, "alice"),
            st.notes.for_prompt([("thread", cid), ("session", "s")]),
        )
        assert [m.content for m in thread] == ["q", "a"]
        assert owner == cid
        assert notes == [[], []]
        # the owner was recorded by this process when it started the thread: no Redis read
        assert st.cache.batched_total - before == 2
        with pytest.raises(ThreadNotFound):  # another principal's thread is still refused
            await asyncio.gather(st.history.load(cid), st.history.check_access(cid, "bob"))

        # Another process reads the owner once (in the same round trip), then knows it.
        async with Storage.open(settings, instance_id="t-batch-other", redis=redis) as other:
            before = other.cache.batched_total
            await asyncio.gather(
                other.history.load(cid),
                other.history.check_access(cid, "alice"),
                other.notes.for_prompt([("thread", cid), ("session", "s")]),
            )
            assert other.cache.batched_total - before == 3
            await redis.delete(Keys(settings.redis_prefix).thread_meta(cid))  # the cache is gone ...
            assert await other.history.check_access(cid, "alice") == cid  # ... the owner is known
            with pytest.raises(ThreadNotFound):
                await other.history.check_access(cid, "bob")
