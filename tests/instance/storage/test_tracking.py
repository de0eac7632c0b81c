"""Held thread and note copies trusted without a Redis round trip while Redis reports no change
(instance/storage/tracking.py), against the real Redis: another process's append or note write
is seen by the next read once its invalidation arrives; a lost tracking connection or a Redis
restart sends the next read to Redis; the common case (nothing changed) asks Redis nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from common.errors import StorageUnavailable
from common.redis import create_redis
from common.settings import Settings
from instance.storage import Storage
from instance.storage.tracking import Tracker
from tests.instance.storage.conftest import FaultProxy
from tests.instance.storage.test_history_cache import exchange, until_reachable
from tests.redis_server import OwnRedis


class RedisSpy:
    """Counts the Redis commands a Storage's thread and notes reads send (on its tracking
    connection or through its guard), still sending them."""

    def __init__(self, st: Storage) -> None:
        self.count = 0
        # A read's command: on the tracking connection (None: not sent there), else the guard's.
        # (Not the guard's `call`: the background mark sync may drop other tests' caches.)
        self._wrap(st.cache, "command")
        if st.tracker is not None:
            self._wrap(st.tracker, "send")

    def _wrap(self, obj: Any, name: str) -> None:
        real = getattr(obj, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            if result is not None:
                self.count += 1
            return result

        setattr(obj, name, counted)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition` (polled on every loop turn), failing after 10 s."""
    try:
        async with asyncio.timeout(10):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


def tracking_on(st: Storage) -> bool:
    return st.tracker is not None and st.tracker.up


async def test_a_held_thread_and_notes_cost_no_redis_command_until_another_process_writes(
    storage_settings: Callable[..., Settings], redis: Redis
) -> None:
    settings = storage_settings()
    async with (
        Storage.open(settings, instance_id="t-trk-a", redis=redis) as a,
        Storage.open(settings, instance_id="t-trk-b", redis=redis) as b,
    ):
        await until(lambda: tracking_on(a) and tracking_on(b), "both tracking connections are up")
        h = a.history
        cid = await h.new_thread(session_id="s", tool_name="chat", model=None)
        await h.append_exchange(cid, exchange("q1", "a1"))
        assert [m.content for m in await h.load(cid)] == ["q1", "a1"]  # read from Redis, held
        assert a.notes.cache is not None and b.notes.cache is not None
        session = f"s-{cid}"  # the database is shared with other tests: a scope of its own
        scopes = [("thread", cid), ("session", session)]
        await b.notes.write(scope="thread", scope_id=cid, key="k", body="first")
        assert [n.body for n in (await a.notes.for_prompt(scopes))[0]] == ["first"]  # Postgres, stored
        assert [n.body for n in (await a.notes.for_prompt(scopes))[0]] == ["first"]  # the copy, held

        # The session's own exchange: held as appended, then confirmed on the tracking connection.
        await h.append_exchange(cid, exchange("q2", "a2"))
        await until(lambda: h.tracked_confirms_total == 1, "the held copy is confirmed")

        spy = RedisSpy(a)
        hits, notes_hits = h.tracked_hits_total, a.notes.cache.tracked_hits_total
        for _ in range(3):
            assert [m.content for m in await h.load(cid)] == ["q1", "a1", "q2", "a2"]
            assert [[n.body for n in s] for s in await a.notes.for_prompt(scopes)] == [["first"], []]
        assert spy.count == 0
        assert h.tracked_hits_total == hits + 3 and a.notes.cache.tracked_hits_total == notes_hits + 6

        # Another instance continues the thread: its invalidation arrives, the next read asks Redis.
        assert a.tracker is not None
        seen = a.tracker.invalidations_total
        await b.history.append_exchange(cid, exchange("q3", "a3"))
        await until(lambda: a.tracker is not None and a.tracker.invalidations_total > seen, "a hears of it")
        assert [m.content for m in await h.load(cid)] == ["q1", "a1", "q2", "a2", "q3", "a3"]
        assert spy.count == 1

        # Another instance writes a note of the thread: the same.
        seen = a.tracker.invalidations_total
        await b.notes.write(scope="thread", scope_id=cid, key="k", body="second")
        await until(lambda: a.tracker is not None and a.tracker.invalidations_total > seen, "a hears of it")
        assert [n.body for n in (await a.notes.for_prompt(scopes))[0]] == ["second"]


async def test_the_writer_sees_its_own_note_write_at_once(
    storage_settings: Callable[..., Settings], redis: Redis
) -> None:
    """Without waiting for the invalidation of its own bump: the write drops the held copy."""
    async with Storage.open(storage_settings(), instance_id="t-trk-w", redis=redis) as a:
        await until(lambda: tracking_on(a), "the tracking connection is up")
        assert a.notes.cache is not None and a.tracker is not None
        own = f"s-own-{uuid.uuid4()}"
        scopes = [("session", own)]
        await a.notes.write(scope="session", scope_id=own, key="k", body="one")
        for _ in range(50):  # Postgres, then the copy (held), then the held copy
            assert [n.body for n in (await a.notes.for_prompt(scopes))[0]] == ["one"]
            if a.notes.cache.tracked_hits_total:
                break
        assert a.notes.cache.tracked_hits_total >= 1
        a.tracker._pushed = lambda *_: None  # type: ignore[method-assign]  # no invalidation arrives
        await a.notes.write(scope="session", scope_id=own, key="k", body="two")
        assert [n.body for n in (await a.notes.for_prompt(scopes))[0]] == ["two"]


async def test_an_append_racing_anothers_loses_trust_though_the_invalidation_is_late(
    storage_settings: Callable[..., Settings], redis: Redis
) -> None:
    """The invalidation of another process's append is still in flight (held back here) when this
    process appends: the list is longer than the held copy plus its exchange, so the copy is not
    trusted, and the next read holds both exchanges. A read that trusts the copy before then gets
    a prefix of the thread's order."""
    settings = storage_settings()
    async with (
        Storage.open(settings, instance_id="t-trk-ra", redis=redis) as a,
        Storage.open(settings, instance_id="t-trk-rb", redis=redis) as b,
    ):
        await until(lambda: tracking_on(a), "the tracking connection is up")
        h, tracker = a.history, a.tracker
        assert tracker is not None
        cid = await h.new_thread(session_id="s", tool_name="chat", model=None)
        await h.append_exchange(cid, exchange("q1", "a1"))
        await h.load(cid)
        await h.append_exchange(cid, exchange("q2", "a2"))
        await until(lambda: h.tracked_confirms_total == 1, "the held copy is confirmed")

        held_back: list[Any] = []
        real = tracker._pushed
        tracker._pushed = lambda conn, push: held_back.append((conn, push))  # type: ignore[method-assign]
        await b.history.append_exchange(cid, exchange("q3", "a3"))
        early = [m.content for m in await h.load(cid)]  # trusted: the invalidation is held back
        assert early == ["q1", "a1", "q2", "a2"]
        await h.append_exchange(cid, exchange("q4", "a4"))
        hits = h.tracked_hits_total
        final = ["q1", "a1", "q2", "a2", "q3", "a3", "q4", "a4"]
        assert [m.content for m in await h.load(cid)] == final
        assert h.tracked_hits_total == hits  # asked Redis
        assert final[: len(early)] == early
        tracker._pushed = real  # type: ignore[method-assign]
        for conn, push in held_back:
            real(conn, push)


async def test_a_lost_tracking_connection_or_a_redis_restart_sends_the_next_read_to_redis(
    storage_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    own = OwnRedis(tmp_path / "redis").start()
    client = create_redis(own.url)
    try:
        async with Storage.open(storage_settings(), instance_id="t-trk-kill", redis=client) as a:
            await until(lambda: tracking_on(a), "the tracking connection is up")
            h, tracker = a.history, a.tracker
            assert tracker is not None
            cid = await h.new_thread(session_id="s", tool_name="chat", model=None)
            await h.append_exchange(cid, exchange("q1", "a1"))
            await h.load(cid)
            hits = h.tracked_hits_total
            await h.load(cid)
            assert h.tracked_hits_total == hits + 1

            # The tracking connection is killed: nothing held is trusted, even after it is back.
            await client.client_kill_filter(_id=tracker.client_id)
            await until(lambda: tracker.losses_total == 1, "the loss is noticed")
            spy = RedisSpy(a)
            assert [m.content for m in await h.load(cid)] == ["q1", "a1"]
            assert spy.count == 1 and h.tracked_hits_total == hits + 1
            await until(lambda: tracker.connects_total == 2 and tracker.up, "tracking is back")
            assert [m.content for m in await h.load(cid)] == ["q1", "a1"]  # read, held on the new epoch
            assert spy.count == 2
            await h.load(cid)
            assert spy.count == 2 and h.tracked_hits_total == hits + 2

            # Redis restarts: the same.
            own.kill()
            own.start()
            await until_reachable(client)
            await until(lambda: tracker.losses_total == 2, "the loss is noticed")
            assert [m.content for m in await h.load(cid)] == ["q1", "a1"]
            assert spy.count >= 3 and h.tracked_hits_total == hits + 2
    finally:
        await client.aclose()
        own.stop()


async def test_without_a_tracking_connection_every_read_asks_redis(
    storage_settings: Callable[..., Settings], redis: Redis
) -> None:
    async with Storage.open(
        storage_settings(redis_tracking=False), instance_id="t-trk-off", redis=redis
    ) as a:
        assert a.tracker is None
        cid = await a.history.new_thread(session_id="s", tool_name="chat", model=None)
        await a.history.append_exchange(cid, exchange("q1", "a1"))
        await a.history.load(cid)
        spy = RedisSpy(a)
        await a.history.load(cid)
        assert spy.count == 1 and a.history.tracked_hits_total == 0


class CommandSpy:
    """Counts every command a Storage's history sends to Redis (on the direct line, on the
    tracking connection, or through redis-py by its guard's `command` and `reply`), still
    sending them."""

    def __init__(self, st: Storage) -> None:
        self.count = 0
        self._wrap(st.cache, "send_now")
        self._wrap(st.cache, "_ordinary")
        if st.tracker is not None:
            self._wrap(st.tracker, "send")

    def _wrap(self, obj: Any, name: str) -> None:
        real = getattr(obj, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            result = real(*args, **kwargs)
            if result is not None:
                self.count += 1
            return result

        setattr(obj, name, counted)


@pytest.mark.parametrize("server", ["shared", "embedded"])
async def test_an_own_append_keeps_the_held_copy_trusted_with_no_command_but_itself(
    storage_settings: Callable[..., Settings], redis: Redis, tmp_path: Path, server: str
) -> None:
    """The exchange's append script goes on the tracking connection (NOLOOP): its reply confirms
    the copy it extends, so neither a confirming read nor the next loads send Redis anything
    (and on Redis 7 no invalidation of this process's own append arrives at all; the embedded
    Redis, 6.2, sends it before the reply, which voids nothing)."""
    if server == "shared":
        await _own_append_trusted(storage_settings, redis)
        return
    own = OwnRedis(tmp_path / "redis").start()
    client = create_redis(own.url)
    try:
        await _own_append_trusted(storage_settings, client)
    finally:
        await client.aclose()
        own.stop()


async def _own_append_trusted(storage_settings: Callable[..., Settings], redis: Redis) -> None:
    async with Storage.open(storage_settings(), instance_id="t-trk-own", redis=redis) as a:
        await until(lambda: tracking_on(a), "the tracking connection is up")
        h, tracker = a.history, a.tracker
        assert tracker is not None
        cid = await h.new_thread(session_id="s", tool_name="chat", model=None)
        await h.append_exchange(cid, exchange("q1", "a1"))
        await h.load(cid)  # read from Redis, held
        seen = tracker.invalidations_total
        spy = CommandSpy(a)
        await h.append_exchange(cid, exchange("q2", "a2"))
        await until(lambda: h.tracked_confirms_total == 1, "the held copy is confirmed")
        assert spy.count == 1  # the append script alone
        hits = h.tracked_hits_total
        for i in (1, 2):
            assert [m.content for m in await h.load(cid)] == ["q1", "a1", "q2", "a2"]
            assert h.tracked_hits_total == hits + i and spy.count == 1
            # Whatever the append made Redis push here has arrived before this PING's answer.
            pinged = Tracker.send(tracker, "PING")
            assert pinged is not None
            await pinged
        if int(str((await redis.info("server"))["redis_version"]).split(".")[0]) >= 7:
            assert tracker.invalidations_total == seen


async def test_a_scope_redis_has_no_copy_of_is_not_asked_for_again_while_postgres_is_down(
    storage_settings: Callable[..., Settings], redis: Redis, pg_proxy: FaultProxy, pg_dsn: str
) -> None:
    """A session that began during a Postgres outage has no copy of its notes: its chats go
    without them, and after the first one without asking Redis for the copy each time. Another
    process storing a copy is heard of (Redis tracks a key read while it did not exist) and the
    next read serves it; once Postgres is back the scope is read from it and copied again."""
    own = f"s-absent-{uuid.uuid4()}"
    scopes = [("session", own)]
    async with (
        Storage.open(
            storage_settings(database_url=pg_proxy.url(pg_dsn), db_acquire_timeout=0.5),
            instance_id="t-trk-absent",
            redis=redis,
        ) as a,
        Storage.open(storage_settings(), instance_id="t-trk-other", redis=redis) as b,
    ):
        await until(lambda: tracking_on(a), "the tracking connection is up")
        assert a.notes.cache is not None and b.notes.cache is not None and a.tracker is not None
        pg_proxy.cut()
        try:
            with pytest.raises(StorageUnavailable):  # asked Redis (no copy), then Postgres (down)
                await a.notes.for_prompt(scopes)
            spy = RedisSpy(a)
            for _ in range(3):
                with pytest.raises(StorageUnavailable):
                    await a.notes.for_prompt(scopes)
            assert spy.count == 0 and a.notes.cache.absent_skips_total == 3

            # Another instance (its Postgres up) writes a note and copies the scope.
            seen = a.tracker.invalidations_total
            await b.notes.write(scope="session", scope_id=own, key="k", body="from b")
            assert [n.body for n in (await b.notes.for_prompt(scopes))[0]] == ["from b"]
            await until(
                lambda: a.tracker is not None and a.tracker.invalidations_total > seen, "a hears of it"
            )
            assert [n.body for n in (await a.notes.for_prompt(scopes))[0]] == ["from b"]  # the copy
            assert spy.count == 1
        finally:
            pg_proxy.restore()

        # Postgres back: a scope without a copy is read from it again (and copied).
        async with asyncio.timeout(20):  # (in an instance its flusher and outbox relay do this)
            while True:
                try:
                    await a.db.run(lambda conn: conn.fetchval("SELECT 1"), what="a probe")
                    break
                except StorageUnavailable:
                    await asyncio.sleep(0.1)
        other = [("session", f"{own}-2")]
        misses = a.notes.cache.misses_total
        assert await a.notes.for_prompt(other) == [[]]  # Redis, no copy; Postgres: read and copied
        assert await a.notes.for_prompt(other) == [[]]  # the copy
        assert a.notes.cache.misses_total == misses + 1 and a.notes.cache.absent_skips_total == 3
