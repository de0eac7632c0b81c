"""The Redis copy of note scopes (instance/storage/notes_cache.py): served, invalidated by every
committed write, never overwritten by a read that raced a write, re-read when old, and served
while Postgres is down."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from redis.asyncio import Redis

from common.keys import Keys
from common.settings import Settings
from instance.storage import Storage
from instance.storage.cache import RedisGuard
from instance.storage.models import Note
from instance.storage.notes_cache import NotesCache
from tests.instance.storage.conftest import FaultProxy


def _note(scope_id: str, body: str, version: int = 1) -> Note:
    now = datetime.now(UTC)
    return Note(str(uuid.uuid4()), "session", scope_id, "k", body, "note", 0, version, now, now)


async def test_a_write_is_seen_by_the_next_read(storage: Storage) -> None:
    sid = str(uuid.uuid4())
    cache = storage.notes.cache
    assert cache is not None
    assert await storage.notes.for_prompt([("session", sid)]) == [[]]  # a miss: read and stored
    assert await storage.notes.for_prompt([("session", sid)]) == [[]]
    assert cache.hits_total >= 1
    await storage.notes.write(scope="session", scope_id=sid, key="k", body="first")
    (notes,) = await storage.notes.for_prompt([("session", sid)])
    assert [n.body for n in notes] == ["first"]
    await storage.notes.write(scope="session", scope_id=sid, key="k", body="second")
    assert [n.body for n in (await storage.notes.for_prompt([("session", sid)]))[0]] == ["second"]
    assert await storage.notes.capture(
        scope="session", scope_id=sid, key="auto", body="captured", kind="decision", importance=9,
        source_turn=None,
    )  # fmt: skip
    assert [n.key for n in (await storage.notes.for_prompt([("session", sid)]))[0]] == ["auto", "k"]
    assert await storage.notes.delete(scope="session", scope_id=sid, key="auto")
    assert [n.key for n in (await storage.notes.for_prompt([("session", sid)]))[0]] == ["k"]
    # Served from the copy: the same rows Postgres lists, in the same order.
    assert (await storage.notes.for_prompt([("session", sid)]))[0] == await storage.notes.list(
        scope="session", scope_id=sid
    )


async def test_a_read_racing_a_write_does_not_store_older_rows(redis: Redis) -> None:
    """A reader that read Postgres before a write committed must not put its rows back after the
    writer invalidated the copy."""
    sid = str(uuid.uuid4())
    truth = [_note(sid, "old")]
    reading, release = asyncio.Event(), asyncio.Event()

    async def read(scope: str, scope_id: str) -> list[Note]:
        rows = list(truth)  # what Postgres held when the read ran
        reading.set()
        await release.wait()
        return rows

    keys = Keys(f"exainotes{uuid.uuid4().hex[:8]}")
    cache = NotesCache(RedisGuard(redis), keys, read)
    slow = asyncio.create_task(cache.lists([("session", sid)]))
    await reading.wait()
    truth[:] = [_note(sid, "new", 2)]  # the write commits...
    await cache.written("session", sid)  # ...and invalidates, while the old read is in flight
    release.set()
    assert [n.body for n in (await slow)[0]] == ["old"]  # that call saw the older rows, once
    assert cache.refused_total == 1
    assert [n.body for n in (await cache.lists([("session", sid)]))[0]] == ["new"]
    assert [n.body for n in (await cache.lists([("session", sid)]))[0]] == ["new"]
    assert cache.hits_total == 1
    await redis.delete(keys.notes("session", sid), keys.notes_generation("session", sid))


async def test_an_old_copy_is_served_and_reread_in_the_background(redis: Redis) -> None:
    """A change the generation cannot catch (its writer died before invalidating) is picked up by
    the background re-read of a copy older than refresh_s."""
    sid = str(uuid.uuid4())
    truth = [_note(sid, "old")]
    reads = 0

    async def read(scope: str, scope_id: str) -> list[Note]:
        nonlocal reads
        reads += 1
        return list(truth)

    keys = Keys(f"exainotes{uuid.uuid4().hex[:8]}")
    cache = NotesCache(RedisGuard(redis), keys, read, refresh_s=0.0)
    assert [n.body for n in (await cache.lists([("session", sid)]))[0]] == ["old"]
    truth[:] = [_note(sid, "changed", 2)]  # no invalidation
    assert [n.body for n in (await cache.lists([("session", sid)]))[0]] == ["old"]  # served at once
    for _ in range(100):
        if not cache._refreshing:
            break
        await asyncio.sleep(0.01)
    assert reads == 2 and cache.refreshes_total == 1
    assert [n.body for n in (await cache.lists([("session", sid)]))[0]] == ["changed"]
    await cache.stop()
    await redis.delete(keys.notes("session", sid), keys.notes_generation("session", sid))


async def test_a_new_thread_is_seeded_empty_unless_a_note_came_first(redis: Redis) -> None:
    tid = str(uuid.uuid4())
    reads = 0

    async def read(scope: str, scope_id: str) -> list[Note]:
        nonlocal reads
        reads += 1
        return []

    keys = Keys(f"exainotes{uuid.uuid4().hex[:8]}")
    cache = NotesCache(RedisGuard(redis), keys, read)
    await cache.seed_empty("thread", tid)
    assert await cache.lists([("thread", tid)]) == [[]] and reads == 0
    other = str(uuid.uuid4())
    await cache.written("thread", other)  # a note of the thread committed before the seed
    await cache.seed_empty("thread", other)
    assert await cache.lists([("thread", other)]) == [[]] and reads == 1  # not taken from the seed
    await redis.delete(
        *(k for t in (tid, other) for k in (keys.notes("thread", t), keys.notes_generation("thread", t)))
    )


async def test_the_copy_is_served_while_postgres_is_down(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str, redis: Redis
) -> None:
    sid = str(uuid.uuid4())
    settings = storage_settings(database_url=pg_proxy.url(pg_dsn), db_acquire_timeout=0.5)
    async with Storage.open(settings, instance_id="t-notes-down", redis=redis) as st:
        await st.notes.write(scope="session", scope_id=sid, key="k", body="kept")
        assert [n.body for n in (await st.notes.for_prompt([("session", sid)]))[0]] == ["kept"]
        pg_proxy.cut()
        (notes,) = await st.notes.for_prompt([("session", sid)])
        assert [n.body for n in notes] == ["kept"]
        pg_proxy.restore()
