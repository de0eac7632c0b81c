"""A group task's link event through the change's audit row (the outbox), on a real Postgres.

The task write's own statement names the group and the sender in the change's audit row
(`task_events.link_group`, `link_sender`), so the change and the duty to tell the group commit
together or not at all; the event (its uuid is the audit row's id) is stored afterwards, from
the spool, and the outbox relay (common/links.outbox_relay) stores the events of changes that
never got there (their instance was killed first, or the write's reply was lost: the Postgres
connection cut by a TCP proxy in front of this run's database, never the shared server), once
each, also when it races with a flusher storing the same event.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from common import links as db
from common.errors import StorageUnavailable, VersionConflict
from common.migrate import migrate
from common.settings import load_settings
from instance.storage.pool import Database
from instance.storage.tasks import TaskStore
from instance.storage.validation import new_id
from tests.fakes.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)


def _event(group: str, sender: str = "s-a") -> db.TaskEventWrite:
    return db.TaskEventWrite(group=group, uuid=new_id(), sender=sender)


async def _log(pg_dsn: str, group: str) -> tuple[int, list[db.LinkEvent]]:
    """The group's head (seq) and its task events, oldest first."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        head = int(await conn.fetchval("SELECT seq FROM link_groups WHERE name = $1", group) or 0)
        rows = await conn.fetch(
            "SELECT group_name, id, kind, sender, recipient, subject, thread, body, data, created_at, uuid"
            " FROM link_events WHERE group_name = $1 AND kind = 'task' ORDER BY id",
            group,
        )
        return head, [db.LinkEvent.from_row(r) for r in rows]
    finally:
        await conn.close()


async def _setup(pg_dsn: str, group: str) -> int:
    """The group with members s-a and s-b; its head."""
    await migrate(pg_dsn)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await db.join(conn, group, "s-a", principal=None, client="a")
        await db.join(conn, group, "s-b", principal=None, client="b")
    finally:
        await conn.close()
    return (await _log(pg_dsn, group))[0]


def _store(dsn: str) -> tuple[Database, TaskStore]:
    settings = load_settings(database_url=dsn, glm_api_key=None, kimi_api_key=None)
    database = Database(settings)
    return database, TaskStore(database)


async def _relay(pg_dsn: str, group: str, grace_s: float = 0.0) -> list[tuple[db.LinkEvent, list[str]]]:
    """One relay round; the events it stored for `group` (other tests' groups left out)."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        written = await db.outbox_relay(conn, grace_s=grace_s, horizon_s=3600)
    finally:
        await conn.close()
    return [w for w in written if not isinstance(w, db.RefusedEvent) and w[0].group == group]


async def _audit(pg_dsn: str, event_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(pg_dsn)
    try:
        return await conn.fetchrow(
            "SELECT link_group, link_sender, to_state, version FROM task_events WHERE id = $1", event_id
        )
    finally:
        await conn.close()


async def test_the_audit_row_carries_the_event_and_written_says_whether_it_committed(pg_dsn: str) -> None:
    group = "outbox"
    head = await _setup(pg_dsn, group)
    scope = "link:" + group
    database, tasks = _store(pg_dsn)
    try:
        created = _event(group)
        task = await tasks.create(
            session_id=scope, name="port the parser", event_id=created.uuid, group_event=created
        )
        assert created.written
        row = await _audit(pg_dsn, created.uuid)
        assert row is not None and (row["link_group"], row["link_sender"]) == (group, "s-a")

        moved = _event(group, "s-b")
        task = await tasks.update(
            task.id,
            expected_version=1,
            session_id=scope,
            state="IN_PROGRESS",
            event_id=moved.uuid,
            group_event=moved,
        )
        assert moved.written and (await _audit(pg_dsn, moved.uuid))["link_sender"] == "s-b"  # type: ignore[index]

        # Refused (a stale version): rolled back, no audit row, nothing to tell.
        stale = _event(group)
        with pytest.raises(VersionConflict):
            await tasks.update(
                task.id,
                expected_version=1,
                session_id=scope,
                name="x",
                event_id=stale.uuid,
                group_event=stale,
            )
        assert not stale.written and await _audit(pg_dsn, stale.uuid) is None

        # Another call's create replayed with the same task id: the task, no change of its own.
        replay = _event(group)
        again = await tasks.create(
            session_id=scope,
            name="port the parser",
            task_id=task.id,
            event_id=replay.uuid,
            group_event=replay,
        )
        assert again.id == task.id and not replay.written

        # The slow path (a new parent is checked in a transaction) records it there too.
        parent = await tasks.create(session_id=scope, name="parent")
        adopted = _event(group)
        await tasks.update(
            task.id,
            expected_version=2,
            session_id=scope,
            parent_task_id=parent.id,
            event_id=adopted.uuid,
            group_event=adopted,
        )
        assert adopted.written and (await _audit(pg_dsn, adopted.uuid))["link_group"] == group  # type: ignore[index]
        # A session task's change names no group.
        own = await tasks.create(session_id="s-a", name="mine", event_id=(own_event := new_id()))
        assert own.session_id == "s-a" and (await _audit(pg_dsn, own_event))["link_group"] is None  # type: ignore[index]
    finally:
        await database.close()

    # What the instance spools after the answer, stored by the flusher: the next ids, in order.
    conn = await asyncpg.connect(pg_dsn)
    try:
        spooled = [db.task_event_payload(e, t) for e, t in ((created, task), (moved, task))]
        stored = await db.store_spooled(conn, spooled)
        assert [(e.id, e.uuid) for e, _ in stored] == [(head + 1, created.uuid), (head + 2, moved.uuid)]  # type: ignore[misc]
    finally:
        await conn.close()
    # The relay stores the one that never reached a spool (adopted), and only it, once.
    relayed = await _relay(pg_dsn, group)
    assert [(e.id, e.uuid, sorted(m)) for e, m in relayed] == [(head + 3, adopted.uuid, ["s-a", "s-b"])]
    assert relayed[0][0].data == {
        "task_id": task.id,
        "name": "port the parser",
        "state": "IN_PROGRESS",
        "version": 3,
    }
    assert relayed[0][0].sender == "s-a"
    assert await _relay(pg_dsn, group) == []
    now, events = await _log(pg_dsn, group)
    assert now == head + 3 and [e.uuid for e in events] == [created.uuid, moved.uuid, adopted.uuid]


async def test_the_relay_waits_out_the_grace_period(pg_dsn: str) -> None:
    group = "outbox-grace"
    head = await _setup(pg_dsn, group)
    database, tasks = _store(pg_dsn)
    try:
        event = _event(group)
        await tasks.create(session_id="link:" + group, name="fresh", event_id=event.uuid, group_event=event)
    finally:
        await database.close()
    assert await _relay(pg_dsn, group, grace_s=60) == []  # its spool may still be storing it
    assert [e.uuid for e, _ in await _relay(pg_dsn, group)] == [event.uuid]
    assert (await _log(pg_dsn, group))[0] == head + 1


async def test_a_relay_racing_with_a_flusher_stores_the_event_once(pg_dsn: str) -> None:
    """The flusher's store holds the group's row when the relay looks: the relay, which saw no
    event yet, waits for that row, then inserts nothing for the uuid (ON CONFLICT)."""
    group = "outbox-race"
    head = await _setup(pg_dsn, group)
    database, tasks = _store(pg_dsn)
    try:
        event = _event(group)
        task = await tasks.create(
            session_id="link:" + group, name="raced", event_id=event.uuid, group_event=event
        )
    finally:
        await database.close()
    flusher = await asyncpg.connect(pg_dsn)
    relay_conn = await asyncpg.connect(pg_dsn)
    try:
        tx = flusher.transaction()
        await tx.start()
        stored = await db.store_spooled(flusher, [db.task_event_payload(event, task)])
        assert [e.uuid for e, _ in stored] == [event.uuid]  # type: ignore[misc]
        relaying = asyncio.create_task(db.outbox_relay(relay_conn, grace_s=0, horizon_s=3600))
        await asyncio.sleep(0.3)
        assert not relaying.done()  # waiting for the group's row
        await tx.commit()
        relayed = await asyncio.wait_for(relaying, 10)
        assert [w for w in relayed if not isinstance(w, db.RefusedEvent) and w[0].group == group] == []
    finally:
        await flusher.close()
        await relay_conn.close()
    head_now, events = await _log(pg_dsn, group)
    assert [e.uuid for e in events] == [event.uuid] and events[0].id == head + 1
    assert head_now >= head + 1  # the relay's try may have left an id unused


async def test_the_relay_leaves_what_the_store_refuses(pg_dsn: str) -> None:
    """A change whose sender was removed from the group before its event was stored (no leave:
    the admin removed it), or whose group was deleted: the store refuses its event, so the relay
    does not take it (and does not look at it again every round); a sender that left after the
    change (its leave is newer) still has its event relayed."""
    group, gone = "outbox-removed", "outbox-deleted"
    await _setup(pg_dsn, group)
    await _setup(pg_dsn, gone)
    database, tasks = _store(pg_dsn)
    try:
        removed, left, deleted = _event(group, "s-b"), _event(group, "s-a"), _event(gone)
        for event, name, scope in (
            (removed, "removed", group),
            (left, "left", group),
            (deleted, "deleted", gone),
        ):
            await tasks.create(session_id="link:" + scope, name=name, event_id=event.uuid, group_event=event)
    finally:
        await database.close()
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("DELETE FROM link_members WHERE group_name = $1 AND session_id = 's-b'", group)
        await db.leave(conn, group, "s-a")
        await conn.execute("DELETE FROM link_groups WHERE name = $1", gone)
        # What a flusher would say of the removed sender's event, had it been spooled.
        (refused,) = await db.store_spooled(
            conn, [{**db.task_event_payload(removed, _Task()), "created_at": 0}]
        )
        assert isinstance(refused, db.RefusedEvent) and refused.reason == "not_member"
    finally:
        await conn.close()
    assert [e.uuid for e, _ in await _relay(pg_dsn, group)] == [left.uuid]
    assert await _relay(pg_dsn, group) == [] and await _relay(pg_dsn, gone) == []


class _Task:
    id, name, state, version = new_id(), "removed", "NOT_STARTED", 1


async def _cut_after_commit(proxy: TcpProxy, pg_dsn: str, write: asyncio.Task[Any], name: str) -> None:
    """Wait until the write's task row is committed (its reply held back by the proxy), then cut
    every connection through the proxy: the reply is lost."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        async with asyncio.timeout(10):
            while not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM tasks WHERE name = $1)", name):
                assert not write.done(), write
                await asyncio.sleep(0.01)
    finally:
        await conn.close()
    proxy.delay = 0.0
    proxy.down()


async def test_a_reply_lost_after_the_commit_leaves_the_event_to_the_relay(
    pg_dsn: str, pg_proxy: tuple[TcpProxy, str]
) -> None:
    group = "outbox-cut"
    head = await _setup(pg_dsn, group)
    proxy, dsn = pg_proxy
    database, tasks = _store(dsn)
    event = _event(group)
    try:
        await tasks.list(session_id="s-a")  # the pool's connection is open
        proxy.delay = 2.0  # the server's replies are held back
        write = asyncio.create_task(
            tasks.create(session_id="link:" + group, name="cut-down", event_id=event.uuid, group_event=event)
        )
        await _cut_after_commit(proxy, pg_dsn, write, "cut-down")  # and it stays down
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(write, 10)
    finally:
        proxy.up()
        await database.close()
    assert not event.written  # the caller does not know it committed, so spools nothing
    relayed = await _relay(pg_dsn, group)
    assert [(e.id, e.uuid, e.data["name"]) for e, _ in relayed] == [(head + 1, event.uuid, "cut-down")]
    assert await _relay(pg_dsn, group) == []
