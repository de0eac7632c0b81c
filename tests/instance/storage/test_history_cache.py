"""The thread cache without a Postgres query per hit, and still never hiding turns Postgres holds.

A cache hit is checked against Postgres only when the cache was last checked on another Redis
run (Redis restarted, perhaps from an AOF that lacks its last writes); appends that missed Redis
leave a mark in Postgres through the writer's spool, which every instance applies. Scenarios
(issue 14, point 2): Redis restarted from its AOF with an old cache; the writer killed while
Redis was down (its in-memory "dirty" set is gone). The writer cut off from Redis alone is
test_history_truth.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from common.keys import Keys
from common.redis import create_redis
from common.settings import Settings
from instance.storage import Storage
from instance.storage.history import CACHE_SYNC_S, CACHE_TTL_MS
from tests.instance.storage.conftest import FaultProxy
from tests.redis_server import OwnRedis


def exchange(q: str, a: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


class QueryCounter:
    """Counts the Postgres operations a Storage runs (a spy on Database.run, which it still calls)."""

    def __init__(self, storage: Storage) -> None:
        self.count = 0
        real = storage.db.run

        async def run(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            return await real(*args, **kwargs)

        storage.db.run = run  # type: ignore[method-assign]


async def until_reachable(client: Redis) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                await client.ping()
                return
            except Exception:
                await asyncio.sleep(0.1)


async def test_a_redis_restarted_from_its_aof_is_checked_once_then_hits_cost_no_query(
    storage_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    own = OwnRedis(tmp_path / "redis").start()
    client = create_redis(own.url)
    try:
        async with Storage.open(storage_settings(), instance_id="t-aof", redis=client) as st:
            h = st.history
            lossy = await h.new_thread(session_id="s", tool_name="chat", model=None)
            kept = await h.new_thread(session_id="s", tool_name="chat", model=None)
            for cid in (lossy, kept):
                await h.append_exchange(cid, exchange("q1", "a1"))
                await h.append_exchange(cid, exchange("q2", "a2"))
            assert await st.flush(10)
            queries = QueryCounter(st)
            for cid in (lossy, kept):
                assert [m.content for m in await h.load(cid)] == ["q1", "a1", "q2", "a2"]
            assert queries.count == 0 and h.cache_checks_total == 0  # hits on the run they were made on

            # The AOF lost the last exchange of one thread (as an everysec fsync can), then a restart.
            keys = Keys(st.settings.redis_prefix)
            await client.rpop(keys.thread(lossy), 2)
            await client.hincrby(keys.thread_meta(lossy), "turns", -2)
            await client.decr(keys.thread_pos(lossy))
            await client.execute_command("BGREWRITEAOF")
            await asyncio.sleep(1.5)  # let the rewrite land before the SIGKILL
            own.kill()
            own.start()
            await until_reachable(client)
            assert await client.hget(keys.thread_meta(lossy), "turns") == "2"  # the old cache is back

            # Each cache is checked once on the new run: the stale one is dropped, the other stamped.
            assert [m.content for m in await h.load(lossy)] == ["q1", "a1", "q2", "a2"]
            assert not await client.exists(keys.thread_meta(lossy))
            assert [m.content for m in await h.load(kept)] == ["q1", "a1", "q2", "a2"]
            assert h.cache_checks_total == 2
            before = queries.count
            for _ in range(3):
                assert [m.content for m in await h.load(kept)] == ["q1", "a1", "q2", "a2"]
            assert queries.count == before and h.cache_checks_total == 2

            # Positions go on past what Postgres holds, though the counter lost one.
            await h.append_exchange(lossy, exchange("q3", "a3"))
            await h.append_exchange(kept, exchange("q3", "a3"))
            for cid in (lossy, kept):
                loaded = await h.load(cid)
                assert [m.content for m in loaded] == ["q1", "a1", "q2", "a2", "q3", "a3"]
                assert [m.pos for m in loaded] == [1, 1, 2, 2, 3, 3]
    finally:
        await client.aclose()
        own.stop()


async def test_a_writer_killed_while_redis_was_down_still_invalidates_the_cache(
    storage_settings: Callable[..., Settings],
    redis_proxy: FaultProxy,
    pg_proxy: FaultProxy,
    redis_url: str,
    pg_dsn: str,
    redis: Redis,
    tmp_path: Path,
) -> None:
    settings_a = storage_settings(redis_url=redis_proxy.url(redis_url), database_url=pg_proxy.url(pg_dsn))
    spool_a = tmp_path / "spool-a"
    redis_a = create_redis(settings_a.redis_url)
    try:
        async with Storage.open(storage_settings(), instance_id="t-killed-b", redis=redis) as b:
            async with Storage.open(
                settings_a,
                instance_id="t-killed-a",
                redis=redis_a,
                spool_dir=spool_a,
                close_flush_timeout=0.2,
            ) as a:
                cid = await a.history.new_thread(session_id="s", tool_name="chat", model=None)
                await a.history.append_exchange(cid, exchange("q1", "a1"))
                assert await a.flush(10)
                assert [m.content for m in await b.history.load(cid)] == ["q1", "a1"]
                redis_proxy.cut()
                pg_proxy.cut()
                await a.history.append_exchange(cid, exchange("q2", "a2"))
            # A is gone with its turns (and the mark) only in its spool, its memory lost.
            redis_proxy.restore()
            pg_proxy.restore()
            assert [m.content for m in await b.history.load(cid)] == ["q1", "a1"]  # nothing else stored yet

            async with Storage.open(
                settings_a, instance_id="t-killed-a", redis=redis_a, spool_dir=spool_a
            ) as a2:
                assert await a2.flush(10)  # the restarted writer replays its spool, mark included
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10 * CACHE_SYNC_S
                while (loaded := [m.content for m in await b.history.load(cid)]) != ["q1", "a1", "q2", "a2"]:
                    assert loaded == ["q1", "a1"], loaded
                    assert loop.time() < deadline, "B never applied the replayed cache mark"
                    await asyncio.sleep(CACHE_SYNC_S / 5)
                # The restarted writer may also have pushed the exchange onto the cache itself (its
                # spooled turns had no position: their script was sent again); the mark still lands.
                while b.history.marks_applied_total < 1:
                    assert loop.time() < deadline, "B never applied the replayed cache mark"
                    await asyncio.sleep(CACHE_SYNC_S / 5)
    finally:
        await redis_a.aclose()


async def test_a_read_stops_where_an_exchange_is_not_stored_yet(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str, redis: Redis
) -> None:
    """Exchange 4 took its position on a writer whose Postgres is cut, exchange 5 was stored
    elsewhere: a reader gets 1-3 (a prefix of the final order), then 1-5 once 4 lands."""
    small = {"history_cache_turns": 2}  # the cache covers the last exchange only
    async with (
        Storage.open(storage_settings(**small), instance_id="t-gap-a", redis=redis) as a,
        Storage.open(
            storage_settings(database_url=pg_proxy.url(pg_dsn), **small),
            instance_id="t-gap-slow",
            redis=redis,
        ) as slow,
        Storage.open(storage_settings(**small), instance_id="t-gap-reader", redis=redis) as reader,
    ):
        cid = await a.history.new_thread(session_id="s", tool_name="chat", model=None)
        for i in (1, 2, 3):
            await a.history.append_exchange(cid, exchange(f"q{i}", f"a{i}"))
        assert await a.flush(10)
        await slow.history.load(cid)
        pg_proxy.cut()
        await slow.history.append_exchange(cid, exchange("q4", "a4"))
        await a.history.load(cid)
        await a.history.append_exchange(cid, exchange("q5", "a5"))
        assert await a.flush(10)

        loaded = await reader.history.load(cid)
        assert [m.content for m in loaded] == ["q1", "a1", "q2", "a2", "q3", "a3"]
        pg_proxy.restore()
        assert await slow.flush(10)
        loaded = await reader.history.load(cid)
        assert [m.content for m in loaded] == [f"{r}{i}" for i in range(1, 6) for r in ("q", "a")]
        assert [m.pos for m in loaded] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


async def test_a_load_skips_the_spool_only_when_the_cache_holds_this_process_last_exchange(
    storage_settings: Callable[..., Settings], redis: Redis
) -> None:
    """Unflushed turns are read from the spool unless a complete cache holds this process's
    last exchange; a cache that lost it (Redis lost writes) is never served on its own."""
    settings = storage_settings(flush_interval_ms=60_000, flush_batch_size=10_000)  # rows stay pending
    async with Storage.open(settings, instance_id="t-skip", redis=redis) as st:
        cid, _ = await st.history.start_thread(
            exchange("q1", "a1"), session_id="s", tool_name="chat", model=None
        )
        await st.history.append_exchange(cid, exchange("q2", "a2"))
        assert st.spool.has_pending(cid)
        assert [m.content for m in await st.history.load(cid)] == ["q1", "a1", "q2", "a2"]
        assert st.history.spool_reads_skipped_total == 1
        # Redis loses the last exchange (the list and its count), as after a restart from an AOF.
        keys = Keys(settings.redis_prefix)
        await redis.rpop(keys.thread(cid), 2)
        await redis.hincrby(keys.thread_meta(cid), "turns", -2)
        assert [m.content for m in await st.history.load(cid)] == ["q1", "a1", "q2", "a2"]
        assert st.history.spool_reads_skipped_total == 1  # read from the spool this time
        await redis.delete(keys.thread(cid), keys.thread_meta(cid), keys.thread_pos(cid))


async def test_reads_decode_only_the_new_turns_and_stay_whole(
    storage_settings: Callable[..., Settings], redis: Redis, keys: Keys
) -> None:
    """A process keeps the thread's cached turns it decoded; the next read takes from Redis only
    the turns after them, whoever appended those, and falls back to the whole list when its copy
    is no longer a prefix (trimmed, dropped, or held on another Redis run). Without tracking: the
    tracked path, which skips these reads, is test_tracking.py."""
    settings = storage_settings(history_cache_turns=6, redis_tracking=False)
    async with (
        Storage.open(settings, instance_id="t-held-a", redis=redis) as a,
        Storage.open(settings, instance_id="t-held-b", redis=redis) as b,
    ):
        cid = await a.history.new_thread(session_id="s", tool_name="chat", model=None)
        await a.history.append_exchange(cid, exchange("q1", "a1"))
        assert [m.content for m in await a.history.load(cid)] == ["q1", "a1"]
        assert a.history.cache_tail_reads_total == 0  # nothing held yet: the whole list

        # Another process appends between two reads of this one: its turns come with the tail.
        await b.history.append_exchange(cid, exchange("q2", "a2"))
        await a.history.append_exchange(cid, exchange("q3", "a3"))
        loaded = await a.history.load(cid)
        assert [m.content for m in loaded] == ["q1", "a1", "q2", "a2", "q3", "a3"]
        assert [m.pos for m in loaded] == [1, 1, 2, 2, 3, 3]
        assert a.history.cache_tail_reads_total == 1
        assert [m.content for m in await a.history.load(cid)] == ["q1", "a1", "q2", "a2", "q3", "a3"]
        assert a.history.cache_tail_reads_total == 2

        # The list is trimmed (6 turns kept): index no longer means turn, the whole list is read
        # and merged with Postgres as before.
        await b.history.append_exchange(cid, exchange("q4", "a4"))
        assert await redis.llen(keys.thread(cid)) == 6
        assert await a.flush(10) and await b.flush(10)
        expected = ["q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"]
        assert [m.content for m in await a.history.load(cid)] == expected
        assert a.history.cache_tail_reads_total == 2

        # A held copy from another Redis run is never continued: the script compares run ids.
        other = await a.history.new_thread(session_id="s", tool_name="chat", model=None)
        await a.history.append_exchange(other, exchange("x1", "y1"))
        assert [m.content for m in await a.history.load(other)] == ["x1", "y1"]
        held = a.history._held.copies[other]
        a.history._held.copies[other] = dataclasses.replace(held, run="another-run")
        await b.history.append_exchange(other, exchange("x2", "y2"))
        assert [m.content for m in await a.history.load(other)] == ["x1", "y1", "x2", "y2"]
        assert a.history.cache_tail_reads_total == 2

        # A dropped cache is a miss: the held copy goes too, and Postgres/spool answer.
        assert await b.flush(10)
        await redis.delete(keys.thread(other), keys.thread_meta(other))
        assert [m.content for m in await a.history.load(other)] == ["x1", "y1", "x2", "y2"]
        assert other not in a.history._held.copies


async def test_an_exchange_appended_right_after_the_held_turns_is_held_as_appended(
    storage_settings: Callable[..., Settings], redis: Redis, keys: Keys
) -> None:
    """When this process's append extends the cache right after the turns it holds (nobody
    pushed in between), it holds its own turns as appended: the next read takes nothing from
    Redis it has, and the history equals what a process reading it afresh gets. When another
    process pushed in between, its own turns come back from Redis with the other's, in order."""
    settings = storage_settings()
    async with (
        Storage.open(settings, instance_id="t-own-a", redis=redis) as a,
        Storage.open(settings, instance_id="t-own-b", redis=redis) as b,
    ):
        cid, _ = await a.history.start_thread(
            exchange("q1", "a1"), session_id="s", tool_name="chat", model=None
        )
        assert [m.content for m in await a.history.load(cid)] == ["q1", "a1"]
        asked, answered = await a.history.append_exchange(cid, exchange("q2", "a2"))
        await a.history._positions.placed(cid)  # the position's reply may come after the call returned
        assert [m.content for m in a.history._held.copies[cid].messages] == ["q1", "a1", "q2", "a2"]
        loaded = await a.history.load(cid)
        assert loaded[2] is asked and loaded[3] is answered  # held, not decoded again
        assert loaded == await b.history.load(cid)  # every field as a fresh read has it
        assert [m.pos for m in loaded] == [1, 1, 2, 2]

        # Another process appends between this one's read and its append: not held as appended.
        await b.history.append_exchange(cid, exchange("q3", "a3"))
        asked, _ = await a.history.append_exchange(cid, exchange("q4", "a4"))
        await a.history._positions.placed(cid)
        assert len(a.history._held.copies[cid].messages) == 4
        loaded = await a.history.load(cid)
        assert [m.content for m in loaded] == ["q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"]
        assert [m.pos for m in loaded] == [1, 1, 2, 2, 3, 3, 4, 4]
        assert loaded[6] == asked and loaded[6] is not asked  # from Redis, with the other's turns
        assert loaded == await b.history.load(cid)
        await redis.delete(
            keys.thread(cid), keys.thread_meta(cid), keys.thread_pos(cid), keys.thread_xids(cid)
        )


async def test_an_exchange_sent_twice_to_redis_keeps_one_position_and_one_copy(
    storage_settings: Callable[..., Settings], redis: Redis
) -> None:
    """A client library that re-sends the append script after losing the connection with its
    reply (redis-py's retry, or the direct line's fallback) must not give the exchange a second
    position or a second copy in the thread's cache: the script answers a repeat from the
    positions it handed out, by the exchange's first turn id."""
    settings = storage_settings()
    async with Storage.open(settings, instance_id="t-resend", redis=redis) as st:
        cid, _ = await st.history.start_thread(
            exchange("q1", "a1"), session_id="s", tool_name="chat", model=None
        )
        h = st.history
        blob = '{"pos":null,"id":"%s","continuation_id":"%s","seq":1,"role":"%s","content":"%s"}'
        ids = [str(uuid.uuid4()) for _ in range(4)]
        first = [blob % (ids[0], cid, "user", "q2"), blob % (ids[1], cid, "assistant", "a2")]
        pos, _ = await h._positions._cache_append(cid, first, -1)
        again, _ = await h._positions._cache_append(cid, first, -1)  # the same exchange, sent again
        later, _ = await h._positions._cache_append(
            cid, [blob % (ids[2], cid, "user", "q3"), blob % (ids[3], cid, "assistant", "a3")], -1
        )
        assert (pos, again, later) == (pos, pos, pos + 1)
        keys = Keys(settings.redis_prefix)
        cached = [str(x) for x in await redis.lrange(keys.thread(cid), 0, -1)]
        assert sum(ids[0] in x for x in cached) == 1 and sum(ids[2] in x for x in cached) == 1
        assert await redis.hget(keys.thread_meta(cid), "turns") in (b"6", "6")
        # Remembered as long as the thread's counter: a restarted writer re-sends what it spooled
        # before the reply came (instance/storage/positions.py, Positions.recover), however long it was away.
        assert 60_000 < await redis.pttl(keys.thread_xids(cid)) <= CACHE_TTL_MS
        await redis.delete(
            keys.thread(cid), keys.thread_meta(cid), keys.thread_pos(cid), keys.thread_xids(cid)
        )
