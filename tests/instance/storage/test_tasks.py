"""Tasks against real Postgres: lifecycle, optimistic locking, audit rows, scopes, bad input."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from common.errors import InvalidArgument, InvalidTransition, TaskNotFound, VersionConflict
from instance.storage import Storage, TaskNode


def sid() -> str:
    return "s-" + uuid.uuid4().hex[:12]


async def test_lifecycle_sets_completed_at_and_writes_one_event_per_change(storage: Storage) -> None:
    s = sid()
    t = await storage.tasks.create(session_id=s, name="write the spool", metadata={"prio": 1})
    assert (t.state, t.version, t.completed_at) == ("NOT_STARTED", 1, None)
    t = await storage.tasks.update(t.id, expected_version=1, session_id=s, state="IN_PROGRESS")
    t = await storage.tasks.update(t.id, expected_version=2, session_id=s, state="COMPLETE")
    assert t.version == 3 and t.completed_at is not None
    with pytest.raises(InvalidTransition, match="reopen"):
        await storage.tasks.update(t.id, expected_version=3, session_id=s, state="IN_PROGRESS")
    t = await storage.tasks.update(t.id, expected_version=3, session_id=s, reopen=True, state="IN_PROGRESS")
    assert (t.state, t.version, t.completed_at) == ("IN_PROGRESS", 4, None)
    events = await storage.tasks.events(t.id, session_id=s)
    assert [(e.event, e.from_state, e.to_state, e.version) for e in events] == [
        ("created", None, "NOT_STARTED", 1),
        ("state_changed", "NOT_STARTED", "IN_PROGRESS", 2),
        ("state_changed", "IN_PROGRESS", "COMPLETE", 3),
        ("reopened", "COMPLETE", "IN_PROGRESS", 4),
    ]
    assert t.to_dict()["completed_at"] is None and isinstance(t.to_dict()["created_at"], str)


async def test_two_concurrent_writers_exactly_one_wins(storage: Storage, pg_dsn: str) -> None:
    s = sid()
    t = await storage.tasks.create(session_id=s, name="contended")
    results = await asyncio.gather(
        storage.tasks.update(t.id, expected_version=1, session_id=s, name="writer A"),
        storage.tasks.update(t.id, expected_version=1, session_id=s, name="writer B"),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    losses = [r for r in results if isinstance(r, VersionConflict)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].details["current_version"] == 2
    assert "version 2" in losses[0].message and "NOT_STARTED" in losses[0].message
    final = await storage.tasks.get(t.id, session_id=s)
    assert final.version == 2 and final.name == wins[0].name
    assert len(await storage.tasks.events(t.id, session_id=s)) == 2


async def test_no_lost_update_when_writers_retry_on_conflict(storage: Storage) -> None:
    s = sid()
    t = await storage.tasks.create(session_id=s, name="counter", metadata={"n": 0})

    async def increment() -> None:
        while True:
            cur = await storage.tasks.get(t.id, session_id=s)
            try:
                await storage.tasks.update(
                    t.id, expected_version=cur.version, session_id=s, metadata={"n": cur.metadata["n"] + 1}
                )
                return
            except VersionConflict:
                continue

    await asyncio.gather(*(increment() for _ in range(8)))
    final = await storage.tasks.get(t.id, session_id=s)
    assert final.metadata["n"] == 8 and final.version == 9


async def test_scopes_visibility_listing_and_tree(storage: Storage) -> None:
    s1, s2 = sid(), sid()
    glob = await storage.tasks.create(session_id=None, name="global root")
    root = await storage.tasks.create(session_id=s1, name="root")
    child = await storage.tasks.create(session_id=s1, name="child", parent_task_id=root.id)
    await storage.tasks.create(session_id=s1, name="grandchild", parent_task_id=child.id, state="IN_PROGRESS")
    other = await storage.tasks.create(session_id=s2, name="other session")

    with pytest.raises(TaskNotFound):
        await storage.tasks.get(other.id, session_id=s1)
    assert (await storage.tasks.get(glob.id, session_id=s2)).is_global

    mine = await storage.tasks.list(session_id=s1, scope="session")
    assert [t.name for t in mine] == ["root", "child", "grandchild"]  # type: ignore[union-attr]
    everything = await storage.tasks.list(session_id=s1, scope="all")
    ids = {t.id for t in everything}  # type: ignore[union-attr]
    assert glob.id in ids and other.id not in ids
    assert [
        t.name for t in await storage.tasks.list(session_id=s1, scope="session", state="IN_PROGRESS")
    ] == [  # type: ignore[union-attr]
        "grandchild"
    ]
    assert [t.id for t in await storage.tasks.list(session_id=s1, parent_task_id=root.id)] == [child.id]  # type: ignore[union-attr]

    tree = await storage.tasks.list(session_id=s1, scope="session", tree=True)
    assert len(tree) == 1 and isinstance(tree[0], TaskNode)
    assert tree[0].children[0].children[0].task.name == "grandchild"
    assert tree[0].to_dict()["children"][0]["name"] == "child"

    # a task cannot become a child of its own descendant
    with pytest.raises(InvalidArgument, match="cycle"):
        await storage.tasks.update(root.id, expected_version=1, session_id=s1, parent_task_id=child.id)


async def test_idempotent_create_with_client_id(storage: Storage) -> None:
    s, tid = sid(), str(uuid.uuid4())
    a = await storage.tasks.create(session_id=s, name="once", task_id=tid)
    b = await storage.tasks.create(session_id=s, name="once", task_id=tid)
    assert a == b
    assert len(await storage.tasks.events(tid, session_id=s)) == 1


async def test_bad_input_is_refused_and_changes_nothing(storage: Storage, pg_dsn: str) -> None:
    s = sid()
    t = await storage.tasks.create(session_id=s, name="stable")
    bad_calls = [
        (TaskNotFound, storage.tasks.update(str(uuid.uuid4()), expected_version=1, session_id=s, name="x")),
        (TaskNotFound, storage.tasks.get(str(uuid.uuid4()), session_id=s)),
        (InvalidArgument, storage.tasks.get("not-a-uuid", session_id=s)),
        (InvalidTransition, storage.tasks.update(t.id, expected_version=1, session_id=s, reopen=True)),
        (InvalidArgument, storage.tasks.update(t.id, expected_version=1, session_id=s, metadata=["list"])),  # type: ignore[arg-type]
        (
            InvalidArgument,
            storage.tasks.update(t.id, expected_version=1, session_id=s, metadata={"x": {1, 2}}),
        ),
        (InvalidArgument, storage.tasks.update(t.id, expected_version=1, session_id=s, state="DONE")),
        (InvalidArgument, storage.tasks.update(t.id, expected_version=1, session_id=s)),
        (InvalidArgument, storage.tasks.create(session_id=s, name="")),
        (InvalidArgument, storage.tasks.create(session_id=s, name="x", metadata={"f": float("nan")})),
        (TaskNotFound, storage.tasks.create(session_id=s, name="orphan", parent_task_id=str(uuid.uuid4()))),
        (VersionConflict, storage.tasks.update(t.id, expected_version=7, session_id=s, name="stale")),
    ]
    for exc_type, call in bad_calls:
        with pytest.raises(exc_type) as info:
            await call
        assert info.value.message  # every error says what happened
    conn = await asyncpg.connect(pg_dsn)
    try:
        row = await conn.fetchrow("SELECT name, version FROM tasks WHERE id = $1", t.id)
        events = await conn.fetchval("SELECT count(*) FROM task_events WHERE task_id = $1", t.id)
        orphans = await conn.fetchval("SELECT count(*) FROM tasks WHERE name = 'orphan'")
    finally:
        await conn.close()
    assert (row["name"], row["version"], events, orphans) == ("stable", 1, 1, 0)
