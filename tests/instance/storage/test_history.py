"""Threads: write-behind appends, reads that see pending rows, cross-process continuation, Redis faults."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import asyncpg
import pytest
from redis.asyncio import Redis

from common.errors import InvalidArgument, StorageUnavailable, ThreadNotFound
from common.keys import Keys
from common.redis import create_redis
from common.settings import Settings
from instance.storage import Storage
from tests.instance.storage.conftest import FaultProxy


async def _pg_count(dsn: str, cid: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1", cid))
    finally:
        await conn.close()


async def test_append_load_roundtrip_and_flush(storage: Storage, pg_dsn: str) -> None:
    cid = await storage.history.new_thread(session_id="s1", tool_name="chat", model="glm-4.6")
    for i in range(6):
        await storage.history.append(cid, "user" if i % 2 == 0 else "assistant", f"turn {i}", session_id="s1")
    loaded = await storage.history.load(cid)
    assert [m.content for m in loaded] == [f"turn {i}" for i in range(6)]
    assert [m.content for m in await storage.history.load(cid, limit=2)] == ["turn 4", "turn 5"]
    assert await storage.flush(10)
    assert await _pg_count(pg_dsn, cid) == 6
    assert storage.backlog()["rows"] == 0 and storage.backlog()["flushed_total"] >= 7
    assert loaded[0].to_dict()["continuation_id"] == cid


async def test_reads_include_own_unflushed_rows(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str, redis: Redis
) -> None:
    settings = storage_settings(database_url=pg_proxy.url(pg_dsn), history_cache_turns=0)
    pg_proxy.cut()
    async with Storage.open(settings, instance_id="t-pending", redis=redis, close_flush_timeout=0.5) as st:
        cid = await st.history.new_thread(session_id="s", tool_name="chat", model=None)
        await st.history.append(cid, "user", "kept locally")
        assert [m.content for m in await st.history.load(cid)] == ["kept locally"]
        assert await st.history.exists(cid)
        assert st.backlog()["rows"] == 2
        # direct writes say clearly that Postgres is down and nothing was changed
        with pytest.raises(StorageUnavailable, match="Nothing was changed"):
            await st.tasks.create(session_id="s", name="x")
        pg_proxy.restore()
        assert await st.flush(10)
    assert await _pg_count(pg_dsn, cid) == 1


async def test_thread_continues_in_another_process(
    storage_settings: Callable[..., Settings], redis: Redis, keys: Keys, pg_dsn: str
) -> None:
    settings = storage_settings()
    async with (
        Storage.open(settings, instance_id="t-a", redis=redis) as a,
        Storage.open(settings, instance_id="t-b", redis=redis) as b,
    ):
        cid = await a.history.new_thread(session_id="s", tool_name="chat", model="kimi-k2")
        await a.history.append(cid, "user", "question")
        await a.history.append(cid, "assistant", "answer")
        # B sees A's turns through the Redis cache before anything reached Postgres ...
        assert [m.content for m in await b.history.load(cid)] == ["question", "answer"]
        await b.history.append(cid, "user", "follow-up")
        assert [m.content for m in await a.history.load(cid)] == ["question", "answer", "follow-up"]
        assert await a.flush(10) and await b.flush(10)
        # ... and through Postgres once the cache is gone.
        await redis.delete(keys.thread(cid), keys.thread_meta(cid))
        assert [m.content for m in await b.history.load(cid)] == ["question", "answer", "follow-up"]
    assert await _pg_count(pg_dsn, cid) == 3


async def test_cache_holds_recent_turns_full_history_from_postgres(
    storage_settings: Callable[..., Settings], redis: Redis, keys: Keys
) -> None:
    async with Storage.open(storage_settings(history_cache_turns=3), instance_id="t-trim", redis=redis) as st:
        cid = await st.history.new_thread(session_id="s", tool_name="chat", model=None)
        for i in range(7):
            await st.history.append(cid, "user", f"m{i}")
        assert await redis.llen(keys.thread(cid)) == 3
        assert await st.flush(10)
        assert [m.content for m in await st.history.load(cid)] == [f"m{i}" for i in range(7)]
        assert [m.content for m in await st.history.load(cid, limit=2)] == ["m5", "m6"]


async def test_unknown_thread_and_bad_input(storage: Storage) -> None:
    with pytest.raises(ThreadNotFound):
        await storage.history.load(str(uuid.uuid4()))
    assert not await storage.history.exists(str(uuid.uuid4()))
    cid = await storage.history.new_thread(session_id=None, tool_name="chat", model=None)
    with pytest.raises(InvalidArgument):
        await storage.history.append("not-a-uuid", "user", "x")
    with pytest.raises(InvalidArgument, match="role"):
        await storage.history.append(cid, "robot", "x")
    with pytest.raises(InvalidArgument):
        await storage.history.append(cid, "user", "x", metadata={"bad": object()})
    assert await storage.history.load(cid) == []
    assert storage.backlog()["dead_rows"] == 0


async def test_redis_down_history_and_tasks_keep_working_then_cache_returns(
    storage_settings: Callable[..., Settings], redis_proxy: FaultProxy, redis_url: str, keys: Keys
) -> None:
    client = create_redis(redis_proxy.url(redis_url))
    try:
        async with Storage.open(storage_settings(), instance_id="t-redis", redis=client) as st:
            cid = await st.history.new_thread(session_id="s", tool_name="chat", model=None)
            await st.history.append(cid, "user", "before")
            redis_proxy.cut()
            await st.history.append(cid, "assistant", "during outage")
            assert [m.content for m in await st.history.load(cid)] == ["before", "during outage"]
            task = await st.tasks.create(session_id="s", name="works without Redis")
            assert (await st.tasks.get(task.id, session_id="s")).name == task.name
            redis_proxy.restore()
            st.cache._down_until = 0.0  # skip the breaker's cooldown instead of sleeping
            await st.history.append(cid, "user", "after")
            # the cache that missed a turn was dropped, so nothing stale is ever served
            assert await st.history.load(cid) == (await st.history.load(cid))
            assert [m.content for m in await st.history.load(cid)] == ["before", "during outage", "after"]
            assert not await client.exists(keys.thread_meta(cid))
            fresh = await st.history.new_thread(session_id="s", tool_name="chat", model=None)
            assert await client.exists(keys.thread_meta(fresh))  # reconnected on its own
    finally:
        await client.aclose()
