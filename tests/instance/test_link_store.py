"""common/links.py on a real Postgres: ids, cursors, principals and reservation overlaps."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from common import links as db
from common.errors import InvalidArgument, LinkForbidden, NotLinked, ReservationConflict
from common.migrate import migrate


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("src/**", "src/app.py", True),
        ("src/**", "src/deep/x.py", True),
        ("src/*.py", "src/app.py", True),
        ("src/**", "docs/**", False),
        ("src/a.py", "src/b.py", False),
        ("src/*.py", "docs/x.py", False),
        ("src/parser/**", "src/**", True),
        ("*.md", "README.md", True),
    ],
)
def test_reservation_patterns_overlap(a: str, b: str, expected: bool) -> None:
    assert db.overlaps(a, b) is expected
    assert db.overlaps(b, a) is expected


def test_group_names_are_checked() -> None:
    assert db.check_group("my-project.v2") == "my-project.v2"
    for bad in ("", "-x", "a/b", "x" * 101, "exai://x"):
        with pytest.raises(InvalidArgument):
            db.check_group(bad)


async def test_concurrent_senders_get_gapless_ids_and_cursors_read_each_once(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=6)
    try:
        async with pool.acquire() as conn:
            assert (await db.join(conn, "store", "s-a", principal="alice", client="a"))[0]
            assert (await db.join(conn, "store", "s-b", principal="alice", client="b"))[0]
            assert (await db.join(conn, "store", "s-b", principal="alice", client="b")) == (False, None)
            with pytest.raises(LinkForbidden):
                await db.join(conn, "store", "s-c", principal="bob", client="c")
            assert (await db.join(conn, "store", "s-admin", principal="bob", client="c", admin=True))[0]
            with pytest.raises(NotLinked):
                await db.unread(conn, "store", "s-outsider", limit=10)

        async def send(i: int) -> int:
            async with pool.acquire() as conn:
                return (await db.append(conn, "store", "message", sender="s-a", body=f"m{i}")).id

        ids = await asyncio.gather(*(send(i) for i in range(60)))
        assert sorted(ids) == list(range(4, 64))  # after the three joins, gapless
        async with pool.acquire() as conn:
            seen: list[int] = []
            while page := await db.unread(conn, "store", "s-b", limit=7):
                seen += [e.id for e in page]
                await db.ack(conn, "store", "s-b", page[-1].id)
                await db.ack(conn, "store", "s-b", page[0].id)  # a late, smaller ack never moves it back
            assert seen == [3, *sorted(ids)]  # the admin-linked join, then the messages

            held = await db.reserve(conn, "store", "s-a", ["src/**"], ttl=60, exclusive=True)
            assert held[0]["pattern"] == "src/**"
            with pytest.raises(ReservationConflict) as refused:
                await db.reserve(conn, "store", "s-b", ["src/x.py"], ttl=60, exclusive=False)
            assert refused.value.details["holder"] == "s-a" and refused.value.details["holder_client"] == "a"
            await db.reserve(conn, "store", "s-b", ["docs/**"], ttl=60, exclusive=True)
            await db.reserve(conn, "store", "s-a", ["tmp/**"], ttl=0.2, exclusive=True)
            await asyncio.sleep(0.5)  # expired reservations stop conflicting
            await db.reserve(conn, "store", "s-b", ["tmp/x"], ttl=60, exclusive=True)
            assert await db.release(conn, "store", "s-a", None) == ["src/**"]
            await db.reserve(conn, "store", "s-b", ["src/x.py"], ttl=60, exclusive=True)
    finally:
        await pool.close()


async def test_spooled_events_get_gapless_ids_once_and_a_replay_takes_none(pg_dsn: str) -> None:
    """What the flusher does with spooled link events: ids in spool order, per group, and a
    batch replayed after a crash (committed, not yet acknowledged in the spool) changes nothing."""
    import time
    import uuid

    await migrate(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await db.join(conn, "spooled-a", "s-1", principal="p", client="one")
        await db.join(conn, "spooled-b", "s-1", principal="p", client="one")
        await db.join(conn, "spooled-b", "s-2", principal="p", client="two")

        def event(group: str, body: str, **extra: object) -> dict[str, object]:
            return {"uuid": str(uuid.uuid4()), "group": group, "kind": "message", "sender": "s-1",
                    "body": body, "created_at": time.time(), **extra}  # fmt: skip

        batch = [event("spooled-b", "b1"), event("spooled-a", "a1"), event("spooled-b", "b2")]
        batch.append(event("gone", "to a deleted group"))
        batch.append(event("spooled-b", "refused task write", kind="task", task_event=str(uuid.uuid4())))
        async with conn.transaction():
            written = await db.store_spooled(conn, batch)
        stored = [w for w in written if not isinstance(w, db.RefusedEvent)]
        assert [(e.group, e.id, e.body) for e, _ in stored] == [
            ("spooled-a", 2, "a1"), ("spooled-b", 3, "b1"), ("spooled-b", 4, "b2"),
        ]  # fmt: skip
        # The deleted group's event is refused for its sender (told by its instance), not dropped.
        refused = [w for w in written if isinstance(w, db.RefusedEvent)]
        assert [(r.uuid, r.group, r.reason) for r in refused] == [(batch[3]["uuid"], "gone", "group_deleted")]
        assert sorted(stored[1][1]) == ["s-1", "s-2"]  # the members, for the notifications
        assert stored[1][0].uuid == batch[0]["uuid"]
        async with conn.transaction():
            assert await db.store_spooled(conn, [*batch, event("spooled-b", "b3")]) != []
        rows = await conn.fetch("SELECT id, body FROM link_events WHERE group_name = 'spooled-b' ORDER BY id")
        assert [(r["id"], r["body"]) for r in rows] == [(1, ""), (2, ""), (3, "b1"), (4, "b2"), (5, "b3")]
        assert await conn.fetchval("SELECT seq FROM link_groups WHERE name = 'spooled-b'") == 5
    finally:
        await conn.close()


async def test_flushers_of_several_instances_interleave_into_gapless_ids(pg_dsn: str) -> None:
    import time
    import uuid

    await migrate(pg_dsn)
    pool = await asyncpg.create_pool(pg_dsn, min_size=4, max_size=4)
    try:
        async with pool.acquire() as conn:
            await db.join(conn, "flushers", "s-x", principal="p", client="x")

        async def flush(instance: int) -> list[int]:
            ids: list[int] = []
            for b in range(10):
                batch = [
                    {"uuid": str(uuid.uuid4()), "group": "flushers", "kind": "message", "sender": "s-x",
                     "body": f"{instance}-{b}-{i}", "created_at": time.time()}
                    for i in range(5)
                ]  # fmt: skip
                async with pool.acquire() as conn, conn.transaction():
                    ids += [e.id for e, _ in await db.store_spooled(conn, batch)]
            return ids

        per_instance = await asyncio.gather(*(flush(n) for n in range(4)))
        for ids in per_instance:
            assert ids == sorted(ids)  # each instance's events keep their spool order
        assert sorted(i for ids in per_instance for i in ids) == list(range(2, 202))
    finally:
        await pool.close()
