"""A group task's link event stored by the task write's own statement, on a real Postgres.

The task row, its audit row and its link event commit together (common/links.TaskEventWrite,
instance/storage/tasks.py), the event taking the group's next id; a refused write stores none
and takes no id. With the reply of a committed write lost (the Postgres connection cut by a TCP
proxy in front of this run's database, never the shared server): the pool's retry finds the
event its first attempt stored, which is then announced once and never stored twice; when the
retry fails too, the recheck the instance spools finds it once Postgres answers. While the
instance's spool holds link events, a task event goes to the spool behind them instead.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from common import links as db
from common.errors import StorageUnavailable, VersionConflict
from common.migrate import migrate
from common.settings import load_settings
from instance import after_answer
from instance.after_answer import AfterAnswer
from instance.links import Links
from instance.storage.pool import Database
from instance.storage.spool import Spool
from instance.storage.tasks import TaskStore
from instance.storage.writebehind import KIND_LINK_EVENT, Flusher
from tests.fakes.tcp_proxy import TcpProxy

pytestmark = pytest.mark.timeout(60)


def _event(group: str, sender: str = "s-a") -> db.TaskEventWrite:
    return db.TaskEventWrite(group=group, uuid=str(uuid.uuid4()), sender=sender)


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


async def test_the_event_commits_with_the_task_and_takes_the_next_id(pg_dsn: str) -> None:
    group = "direct"
    head = await _setup(pg_dsn, group)
    scope = "link:" + group
    database, tasks = _store(pg_dsn)
    try:
        created = _event(group)
        task = await tasks.create(session_id=scope, name="port the parser", group_event=created)
        assert created.stored is not None and created.stored.id == head + 1
        assert created.stored.data == {
            "task_id": task.id,
            "name": "port the parser",
            "state": "NOT_STARTED",
            "version": 1,
        }
        assert sorted(created.members) == ["s-a", "s-b"]

        moved = _event(group, "s-b")
        task = await tasks.update(
            task.id, expected_version=1, session_id=scope, state="IN_PROGRESS", group_event=moved
        )
        assert moved.stored is not None and moved.stored.id == head + 2
        assert moved.stored.data["state"] == "IN_PROGRESS" and moved.stored.data["version"] == 2

        # Refused (a stale version): rolled back, no event, no id taken.
        stale = _event(group)
        with pytest.raises(VersionConflict):
            await tasks.update(task.id, expected_version=1, session_id=scope, name="x", group_event=stale)
        assert stale.stored is None

        # Another call's create replayed with the same task id: the task, no second event.
        replay = _event(group)
        again = await tasks.create(
            session_id=scope, name="port the parser", task_id=task.id, group_event=replay
        )
        assert again.id == task.id and replay.stored is None

        # The slow path (a new parent is checked in a transaction) stores it there.
        parent = await tasks.create(session_id=scope, name="parent")
        adopted = _event(group)
        await tasks.update(
            task.id, expected_version=2, session_id=scope, parent_task_id=parent.id, group_event=adopted
        )
        assert adopted.stored is not None and adopted.stored.id == head + 3

        # A group deleted meanwhile: the task is written, its event is dropped, nothing else moves.
        gone = _event("gone-group")
        await tasks.create(session_id="link:gone-group", name="orphan", group_event=gone)
        assert gone.stored is None
    finally:
        await database.close()

    now, events = await _log(pg_dsn, group)
    assert now == head + 3  # gapless: only the three stored events took ids
    assert [e.to_dict() for e in events] == [
        e.stored.to_dict() for e in (created, moved, adopted) if e.stored
    ]
    assert [e.uuid for e in events] == [created.uuid, moved.uuid, adopted.uuid]


@pytest.fixture
def pg_proxy(pg_dsn: str) -> Iterator[tuple[TcpProxy, str]]:
    parts = urlsplit(pg_dsn)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432).running() as proxy:
        netloc = parts.netloc.rsplit("@", 1)
        auth = netloc[0] + "@" if len(netloc) == 2 else ""
        yield proxy, urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{proxy.port}"))


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


async def test_a_reply_lost_after_the_commit_finds_its_event_on_the_retry(
    pg_dsn: str, pg_proxy: tuple[TcpProxy, str]
) -> None:
    group = "direct-retry"
    head = await _setup(pg_dsn, group)
    proxy, dsn = pg_proxy
    database, tasks = _store(dsn)
    try:
        await tasks.list(session_id="s-a")  # the pool's connection is open
        event = _event(group)
        proxy.delay = 2.0  # the server's replies are held back
        write = asyncio.create_task(
            tasks.create(session_id="link:" + group, name="cut-retry", group_event=event)
        )
        await _cut_after_commit(proxy, pg_dsn, write, "cut-retry")
        proxy.up()  # back before the pool's one retry: it finds its own commit
        task = await asyncio.wait_for(write, 10)
    finally:
        await database.close()
    now, events = await _log(pg_dsn, group)
    assert now == head + 1 and len(events) == 1  # stored once
    assert event.stored is not None and event.stored.to_dict() == events[0].to_dict()
    assert events[0].data["task_id"] == task.id and sorted(event.members) == ["s-a", "s-b"]


async def test_a_write_that_failed_after_its_commit_is_rechecked_from_the_spool(
    pg_dsn: str, pg_proxy: tuple[TcpProxy, str], tmp_path: Path
) -> None:
    group = "direct-recheck"
    head = await _setup(pg_dsn, group)
    proxy, dsn = pg_proxy
    database, tasks = _store(dsn)
    event = _event(group)
    try:
        await tasks.list(session_id="s-a")
        proxy.delay = 2.0
        write = asyncio.create_task(
            tasks.create(
                session_id="link:" + group, name="cut-down", group_event=event, event_id=str(uuid.uuid4())
            )
        )
        await _cut_after_commit(proxy, pg_dsn, write, "cut-down")  # and it stays down
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(write, 10)
    finally:
        proxy.up()
        await database.close()
    assert event.stored is None  # the caller does not know it was stored

    # What the instance spools for it (instance/tools/tasks.py -> Links.task_event_unsure).
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(KIND_LINK_EVENT,))
    await spool.open()
    try:
        settings = load_settings(state_dir=tmp_path / "state", glm_api_key=None, kimi_api_key=None)
        runtime = SimpleNamespace(settings=settings, storage=SimpleNamespace(spool=spool))
        links = Links(runtime)  # type: ignore[arg-type]
        links.task_event_unsure(event, "a-task-events-id")
        async with asyncio.timeout(5):
            while spool.rows < 1:  # noqa: ASYNC110 - the spool commits on its thread
                await asyncio.sleep(0.01)
        (payload,) = [json.loads(e.blob) for e in await spool.read_batch(10)]
    finally:
        await spool.close()
    assert payload["recheck"] is True and payload["uuid"] == event.uuid and payload["group"] == group

    # The flusher's store of it: found and returned for the announcement, never stored again;
    # a recheck of an event that was never stored finds nothing.
    missing = {**payload, "uuid": str(uuid.uuid4())}
    conn = await asyncpg.connect(pg_dsn)
    try:
        for _ in range(2):  # a replay of the recheck changes nothing either
            found = await db.store_spooled(conn, [payload, missing])
            assert [(e.uuid, e.id, sorted(m)) for e, m in found] == [(event.uuid, head + 1, ["s-a", "s-b"])]
    finally:
        await conn.close()
    now, events = await _log(pg_dsn, group)
    assert now == head + 1 and [e.uuid for e in events] == [event.uuid]


async def test_the_event_goes_to_the_spool_behind_link_events_waiting_there(tmp_path: Path) -> None:
    """So the group's log keeps the order of this instance's calls: a message still in the spool
    gets its id before a task event made after it."""
    spool = Spool(tmp_path / "spool", max_bytes=1 << 24, hot_kinds=(KIND_LINK_EVENT,))
    await spool.open()
    flusher = Flusher(spool, db=None, batch_size=100, interval_s=0.01)  # type: ignore[arg-type]
    settings = load_settings(state_dir=tmp_path / "state", glm_api_key=None, kimi_api_key=None)
    runtime = SimpleNamespace(settings=settings, storage=SimpleNamespace(spool=spool, flusher=flusher))
    runtime.require_storage = lambda: runtime.storage
    links = Links(runtime)  # type: ignore[arg-type]
    try:
        assert links.task_event("crew", "s-a") is not None  # nothing waits: the write stores it
        message = {"uuid": str(uuid.uuid4()), "group": "crew", "kind": "message", "created_at": time.time()}
        await spool.append(KIND_LINK_EVENT, message, urgent=True, sync="normal")
        assert links.task_event("crew", "s-a") is None  # behind the message, through the spool
        assert links.stats()["task_spooled"] == 1
        await spool.ack(await spool.read_batch(10))  # stored: the next one goes direct again
        assert links.task_event("crew", "s-a") is not None
    finally:
        await spool.close()


async def test_a_stored_event_is_announced_after_the_answer(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state", glm_api_key=None, kimi_api_key=None)
    runtime = SimpleNamespace(settings=settings, storage=None, redis=None, notifier=None)
    links = Links(runtime)  # type: ignore[arg-type]
    told: list[tuple[list[db.LinkEvent], list[list[str]]]] = []
    links.flushed = lambda written: told.append(([e for e, _ in written], [m for _, m in written]))  # type: ignore[method-assign]
    event = _event("crew")
    event.stored = db.LinkEvent(
        group="crew", id=7, kind="task", sender="s-a", recipient=None, subject=None, thread=None,
        body="", data={}, created_at=datetime.now(UTC), uuid=event.uuid,
    )  # fmt: skip
    event.members = ["s-a", "s-b"]
    pending = AfterAnswer()
    token = after_answer.current_answer.set(pending)
    try:
        links.task_event_written(event)
        links.task_event_written(_event("crew"))  # stored none: nothing to announce
    finally:
        after_answer.current_answer.reset(token)
    assert told == []  # not beside the answer
    pending.run()  # the answer's last byte is written
    assert told == [([event.stored], [["s-a", "s-b"]])]
    assert links.stats()["task_direct"] == 1
