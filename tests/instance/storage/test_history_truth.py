"""A thread's Redis cache can never hide turns that Postgres holds (issue 14, point 2).

Reproduction: process A writes turns while its link to Redis is cut (its cache appends fail,
the thread is only marked dirty in A's memory), its spool flushes them to Postgres, Redis comes
back, and A never touches Redis again. Process B then reads the thread: the cache still says
"2 turns, complete" while Postgres holds 4.

A cache hit no longer asks Postgres (instance/storage/history.py): A's spool carries a mark
with those turns, and B drops the cache when it applies the marks (every CACHE_SYNC_S), so B
reads the whole thread within that delay. A Redis restart is caught by the run_id stamp.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio import Redis

from common.keys import Keys
from common.redis import create_redis
from common.settings import Settings
from instance.storage import Storage
from instance.storage.history import CACHE_SYNC_S
from tests.instance.storage.conftest import FaultProxy


async def test_turns_written_while_redis_was_away_are_never_hidden(
    storage_settings: Callable[..., Settings], redis_proxy: FaultProxy, redis_url: str, redis: Redis
) -> None:
    # A's rows wait for its flush() calls: B cannot apply A's cache mark before the test checks
    # B's stale cache (a mark can be spooled after the turns, as soon as Redis's reply is lost).
    settings_a = storage_settings(
        redis_url=redis_proxy.url(redis_url), flush_interval_ms=60_000, flush_batch_size=10_000
    )
    settings_b = storage_settings()
    redis_a = create_redis(settings_a.redis_url)
    try:
        async with (
            Storage.open(settings_a, instance_id="t-away-a", redis=redis_a) as a,
            Storage.open(settings_b, instance_id="t-away-b", redis=redis) as b,
        ):
            cid = await a.history.new_thread(session_id="s", tool_name="chat", model=None)
            await a.history.append(cid, "user", "q1")
            await a.history.append(cid, "assistant", "a1")
            assert await a.flush(10)
            redis_proxy.cut()
            for text in ("q2", "a2", "q3", "a3"):
                await a.history.append(cid, "user" if text[0] == "q" else "assistant", text)
            keys = Keys(settings_b.redis_prefix)
            assert await redis.hget(keys.thread_meta(cid), "turns") == "2"  # the cache claims 2 of 2
            assert await a.flush(10)
            redis_proxy.restore()  # A stays idle: it never learns that Redis is back

            whole = ["q1", "a1", "q2", "a2", "q3", "a3"]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10 * CACHE_SYNC_S
            while (loaded := [m.content for m in await b.history.load(cid)]) != whole:
                assert loaded == ["q1", "a1"], loaded  # the cache's prefix until B applies the mark
                assert loop.time() < deadline, "B never applied A's cache mark"
                await asyncio.sleep(CACHE_SYNC_S / 5)
            assert b.history.marks_applied_total >= 1
            assert [m.content for m in await b.history.load(cid, limit=2)] == ["q3", "a3"]
            # The stale cache is gone, and new turns on B are still read back in full.
            assert not await redis.exists(keys.thread_meta(cid))
            await b.history.append(cid, "user", "q4")
            assert [m.content for m in await b.history.load(cid)][-2:] == ["a3", "q4"]
    finally:
        await redis_a.aclose()


async def test_a_consistent_cache_still_serves_reads(storage: Storage, redis: Redis) -> None:
    cid = await storage.history.new_thread(session_id="s", tool_name="chat", model=None)
    await storage.history.append(cid, "user", "hello")
    await storage.history.append(cid, "assistant", "hi")
    assert await storage.flush(10)
    assert [m.content for m in await storage.history.load(cid)] == ["hello", "hi"]
    keys = Keys(storage.settings.redis_prefix)
    assert await redis.exists(keys.thread_meta(cid))  # checked, found whole, kept
