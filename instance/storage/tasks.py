"""Tasks: written straight to Postgres with optimistic locking and an audit row per change.

Tasks are what the task tools produce, so a write must be in Postgres when the tool answers
(no write-behind). An update carries the version the caller read; if another writer got there
first the update fails with VersionConflict naming the current version and state, so no update
is ever lost silently. Each change and its `task_events` row commit in one transaction. Every
write has a client-generated id (the task id on create, the event id on update), which makes
the pool's one retry after a dropped connection safe: a retry that finds its own event already
committed returns the task instead of reporting a false conflict.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import json
from typing import Any, Literal

import asyncpg

from common import links as link_store
from common.errors import InvalidArgument, InvalidTransition, TaskNotFound, VersionConflict
from instance.storage.models import TASK_STATES, Task, TaskEvent, TaskNode
from instance.storage.pool import Database
from instance.storage.validation import as_uuid, check_metadata, check_text, new_id

NAME_MAX = 500
DESCRIPTION_MAX = 64 * 1024

# Lifecycle. COMPLETE and CANCELLED are closed: leaving them needs `reopen=True`.
TRANSITIONS: dict[str, frozenset[str]] = {
    "NOT_STARTED": frozenset({"IN_PROGRESS", "COMPLETE", "CANCELLED"}),
    "IN_PROGRESS": frozenset({"NOT_STARTED", "COMPLETE", "CANCELLED"}),
    "COMPLETE": frozenset(),
    "CANCELLED": frozenset(),
}
CLOSED_STATES = frozenset({"COMPLETE", "CANCELLED"})
REOPEN_STATES = frozenset({"NOT_STARTED", "IN_PROGRESS"})

_COLS = (
    "id, session_id, name, description, state, parent_task_id, created_at, updated_at, completed_at,"
    " metadata, version"
)
# A session sees its own tasks and the global ones (session_id IS NULL) of its principal ($3;
# NULL: every principal's, the single-principal default and the admin; rows without an owner
# are from before owners were recorded and stay visible to all).
_VISIBLE = (
    "(session_id = $2 OR (session_id IS NULL AND ($3::text IS NULL OR principal IS NULL OR principal = $3)))"
)


class _Unchanged:
    """Sentinel type: "leave parent_task_id as it is" (None means "detach from the parent")."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Any = _Unchanged()


def _check_state(state: Any) -> str:
    if state not in TASK_STATES:
        raise InvalidArgument(f"state must be one of {', '.join(TASK_STATES)}, got {state!r}")
    return str(state)


class TaskStore:
    """Create, update, read and list tasks; raises StorageUnavailable when Postgres is down."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(
        self,
        *,
        session_id: str | None,
        name: str,
        description: str = "",
        parent_task_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        state: str = "NOT_STARTED",
        task_id: str | None = None,
        principal: str | None = None,
        owner: str | None = None,
        event_id: str | None = None,
        group_event: link_store.TaskEventWrite | None = None,
    ) -> Task:
        """Create a task; with a caller-chosen `task_id` a repeated create returns the same task.

        `event_id`: the id of its `created` audit row.
        `group_event`: a group task's link event (common/links.TaskEventWrite): its group and
        sender go into the audit row, with the task; `written` says whether this call's audit
        row committed (False for a replay of another call's create).
        """
        tid = new_id() if task_id is None else as_uuid(task_id, "task_id")
        check_text(name, "name", min_len=1, max_len=NAME_MAX)
        if not name.strip():
            raise InvalidArgument("name must not be blank")
        check_text(description, "description", max_len=DESCRIPTION_MAX)
        state = _check_state(state)
        meta = check_metadata(metadata)
        parent = None if parent_task_id is None else as_uuid(parent_task_id, "parent_task_id")
        if parent == tid:
            raise InvalidArgument("a task cannot be its own parent")
        event_id = new_id() if event_id is None else as_uuid(event_id, "event_id")
        changes = {"name": name, "state": state, "parent_task_id": parent, "metadata": meta}

        link_args = [] if group_event is None else [group_event.group, group_event.sender]

        async def fast(conn: asyncpg.Connection) -> Task | None:
            # One statement (atomic on its own): the row and its `created` event (naming a group
            # task's group and sender), or nothing when the id exists or the parent is not
            # visible (the transaction below says which).
            row = await conn.fetchrow(
                _create_sql(group_event is not None),
                tid,
                session_id,
                owner,
                name,
                description,
                state,
                parent,
                json.dumps(meta),
                principal,
                event_id,
                json.dumps(changes, default=str),
                *link_args,
            )
            return None if row is None else _written(row, group_event)

        async def op(conn: asyncpg.Connection) -> Task:
            if (task := await fast(conn)) is not None:
                return task
            async with conn.transaction():
                if parent is not None:
                    await self._require_visible(conn, parent, session_id, owner, what="parent task")
                row = await conn.fetchrow(
                    f"INSERT INTO tasks (id, session_id, name, description, state, parent_task_id, metadata,"
                    f" completed_at, principal) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb,"
                    f" CASE WHEN $5 = 'COMPLETE' THEN now() END, $8)"
                    f" ON CONFLICT (id) DO NOTHING RETURNING {_COLS}",
                    tid,
                    session_id,
                    name,
                    description,
                    state,
                    parent,
                    json.dumps(meta),
                    principal,
                )
                if row is None:  # the id exists: a replayed create, or a clash with another task
                    existing = await conn.fetchrow(
                        f"SELECT {_COLS} FROM tasks WHERE id = $1 AND {_VISIBLE}", tid, session_id, owner
                    )
                    if existing is None:
                        raise InvalidArgument(
                            f"task id {tid} is already used by a task this session cannot see"
                        )
                    if group_event is not None:  # our own earlier attempt, or another call's
                        group_event.written = bool(
                            await conn.fetchval(
                                "SELECT EXISTS (SELECT 1 FROM task_events WHERE id = $1)", event_id
                            )
                        )
                    return Task.from_row(existing)
                await _event(conn, event_id, tid, session_id, "created", None, state, 1, changes, group_event)
                if group_event is not None:
                    group_event.written = True
                return Task.from_row(row)

        return await self._db.run(op, what="creating the task")

    async def update(
        self,
        task_id: str,
        *,
        expected_version: int,
        session_id: str | None,
        state: str | None = None,
        name: str | None = None,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        parent_task_id: Any = UNCHANGED,
        reopen: bool = False,
        owner: str | None = None,
        event_id: str | None = None,
        group_event: link_store.TaskEventWrite | None = None,
    ) -> Task:
        """Apply a change if the task is still at `expected_version`; VersionConflict otherwise.

        `metadata` replaces the stored object; `parent_task_id=None` detaches from the parent.
        `event_id`: the id of the change's audit row.
        `group_event`: a group task's link event, recorded with the change (as for `create`).
        """
        tid = as_uuid(task_id, "task_id")
        if (
            isinstance(expected_version, bool)
            or not isinstance(expected_version, int)
            or expected_version < 1
        ):
            raise InvalidArgument(f"expected_version must be a positive integer, got {expected_version!r}")
        if state is not None:
            state = _check_state(state)
        if name is not None:
            check_text(name, "name", min_len=1, max_len=NAME_MAX)
            if not name.strip():
                raise InvalidArgument("name must not be blank")
        if description is not None:
            check_text(description, "description", max_len=DESCRIPTION_MAX)
        meta = None if metadata is None else check_metadata(metadata)
        parent_given = parent_task_id is not UNCHANGED
        parent = None
        if parent_given and parent_task_id is not None:
            parent = as_uuid(parent_task_id, "parent_task_id")
            if parent == tid:
                raise InvalidArgument("a task cannot be its own parent")
        if (
            not reopen
            and state is None
            and name is None
            and description is None
            and meta is None
            and not parent_given
        ):
            raise InvalidArgument(
                "nothing to update: give at least one of state, name, description, metadata, parent"
            )
        event_id = new_id() if event_id is None else as_uuid(event_id, "event_id")
        # Where the task may be now -> where this update takes it (transitions refused leave it out).
        moves: dict[str, str] = {}
        for current_state in TASK_STATES:
            with contextlib.suppress(InvalidTransition):
                moves[current_state] = _next_state(current_state, state, reopen)

        link_args = [] if group_event is None else [group_event.group, group_event.sender]

        async def fast(conn: asyncpg.Connection) -> Task | None:
            # One statement (atomic on its own) for the usual update: the row at the expected
            # version moves along an allowed transition and its event is written (naming a
            # group task's group and sender). Anything else (conflict, unknown task, refused transition, a
            # new parent to check, a retry after our own commit) returns nothing and the
            # transaction below explains it.
            row = await conn.fetchrow(
                _update_sql(group_event is not None),
                tid,
                session_id,
                owner,
                expected_version,
                name,
                description,
                None if meta is None else json.dumps(meta),
                parent_given,
                list(moves),
                list(moves.values()),
                event_id,
                reopen,
                *link_args,
            )
            return None if row is None else _written(row, group_event)

        async def op(conn: asyncpg.Connection) -> Task:
            if parent is None and moves and (task := await fast(conn)) is not None:
                return task
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"SELECT {_COLS} FROM tasks WHERE id = $1 AND {_VISIBLE} FOR UPDATE",
                    tid,
                    session_id,
                    owner,
                )
                if row is None:
                    raise TaskNotFound(f"no task {tid} is visible to this session")
                current = Task.from_row(row)
                if current.version != expected_version:
                    mine = await conn.fetchval(
                        "SELECT EXISTS (SELECT 1 FROM task_events WHERE id = $1)", event_id
                    )
                    if mine:  # our own earlier attempt committed before the connection dropped
                        if group_event is not None:
                            group_event.written = True
                        return current
                    raise VersionConflict(
                        f"task {tid} is at version {current.version} (state {current.state}), "
                        f"not {expected_version}: someone else changed it since you read it",
                        current_version=current.version,
                        current_state=current.state,
                        task=current.to_dict(),
                    )
                new_state = _next_state(current.state, state, reopen)
                if parent_given and parent is not None:
                    await self._require_visible(conn, parent, session_id, owner, what="parent task")
                    await _refuse_cycle(conn, tid, parent)
                changes: dict[str, Any] = {}
                if name is not None and name != current.name:
                    changes["name"] = name
                if description is not None and description != current.description:
                    changes["description"] = description
                if meta is not None and meta != current.metadata:
                    changes["metadata"] = meta
                if parent_given and parent != current.parent_task_id:
                    changes["parent_task_id"] = parent
                if new_state != current.state:
                    changes["state"] = new_state
                updated = await conn.fetchrow(
                    f"""UPDATE tasks SET
                        name = COALESCE($3, name),
                        description = COALESCE($4, description),
                        metadata = COALESCE($5::jsonb, metadata),
                        parent_task_id = CASE WHEN $6 THEN $7::uuid ELSE parent_task_id END,
                        state = $8,
                        completed_at = CASE WHEN $8 = 'COMPLETE' AND state <> 'COMPLETE' THEN now()
                                            WHEN $8 <> 'COMPLETE' THEN NULL ELSE completed_at END,
                        updated_at = now(),
                        version = version + 1
                    WHERE id = $1 AND version = $2
                    RETURNING {_COLS}""",
                    tid,
                    expected_version,
                    name,
                    description,
                    None if meta is None else json.dumps(meta),
                    parent_given,
                    parent,
                    new_state,
                )
                assert updated is not None  # the row is locked FOR UPDATE at this version
                result = Task.from_row(updated)
                kind = "reopened" if reopen else "state_changed" if new_state != current.state else "updated"
                await _event(
                    conn,
                    event_id,
                    tid,
                    session_id,
                    kind,
                    current.state,
                    new_state,
                    result.version,
                    changes,
                    group_event,
                )
                if group_event is not None:
                    group_event.written = True
                return result

        return await self._db.run(op, what="updating the task")

    async def get(self, task_id: str, *, session_id: str | None, owner: str | None = None) -> Task:
        tid = as_uuid(task_id, "task_id")

        async def op(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(
                f"SELECT {_COLS} FROM tasks WHERE id = $1 AND {_VISIBLE}", tid, session_id, owner
            )

        row = await self._db.run(op, what="reading the task")
        if row is None:
            raise TaskNotFound(f"no task {tid} is visible to this session")
        return Task.from_row(row)

    async def list(
        self,
        *,
        session_id: str | None,
        scope: Literal["session", "global", "all"] = "all",
        state: str | None = None,
        parent_task_id: str | None = None,
        tree: bool = False,
        owner: str | None = None,
    ) -> list[Task] | list[TaskNode]:
        """Tasks visible to the session, oldest first; `tree=True` nests children under parents."""
        if scope not in ("session", "global", "all"):
            raise InvalidArgument(f"scope must be session, global or all, got {scope!r}")
        if state is not None:
            state = _check_state(state)
        parent = None if parent_task_id is None else as_uuid(parent_task_id, "parent_task_id")
        where = ["TRUE"]
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        def mine() -> str:
            return "TRUE" if owner is None else f"(principal IS NULL OR principal = {arg(owner)})"

        if scope == "session":
            where.append(f"session_id = {arg(session_id)}" if session_id is not None else "FALSE")
        elif scope == "global":
            where.append(f"session_id IS NULL AND {mine()}")
        else:
            where.append(f"((session_id IS NULL AND {mine()}) OR session_id = {arg(session_id)})")
        if state is not None:
            where.append(f"state = {arg(state)}")
        if parent is not None:
            where.append(f"parent_task_id = {arg(parent)}")
        sql = f"SELECT {_COLS} FROM tasks WHERE {' AND '.join(where)} ORDER BY created_at, id"

        async def op(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            return await conn.fetch(sql, *args)  # type: ignore[no-any-return]

        tasks = [Task.from_row(r) for r in await self._db.run(op, what="listing tasks")]
        return build_tree(tasks) if tree else tasks

    async def events(
        self, task_id: str, *, session_id: str | None, owner: str | None = None
    ) -> builtins.list[TaskEvent]:
        """The audit trail of a visible task, oldest first."""
        tid = as_uuid(task_id, "task_id")

        async def op(conn: asyncpg.Connection) -> list[asyncpg.Record] | None:
            await self._require_visible(conn, tid, session_id, owner, what="task")
            return await conn.fetch(  # type: ignore[no-any-return]
                "SELECT id, task_id, session_id, event, from_state, to_state, version, changes, created_at"
                " FROM task_events WHERE task_id = $1 ORDER BY version, created_at",
                tid,
            )

        rows = await self._db.run(op, what="reading task events") or []
        return [TaskEvent.from_row(r) for r in rows]

    @staticmethod
    async def _require_visible(
        conn: asyncpg.Connection, tid: str, session_id: str | None, owner: str | None, *, what: str
    ) -> None:
        ok = await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM tasks WHERE id = $1 AND {_VISIBLE})", tid, session_id, owner
        )
        if not ok:
            raise TaskNotFound(f"no {what} {tid} is visible to this session")


@functools.cache
def _create_sql(with_event: bool) -> str:
    """The one statement of a create: the task row and its `created` audit row; with_event: the
    audit row names a group task's group and sender ($12, $13: common/links.TaskEventWrite)."""
    link_columns, link_values = (", link_group, link_sender", ", $12, $13") if with_event else ("", "")
    return f"""WITH ins AS (
                INSERT INTO tasks (id, session_id, name, description, state, parent_task_id, metadata,
                    completed_at, principal)
                SELECT $1, $2, $4, $5, $6, $7::uuid, $8::jsonb,
                    CASE WHEN $6 = 'COMPLETE' THEN now() END, $9
                WHERE $7::uuid IS NULL OR EXISTS (SELECT 1 FROM tasks WHERE id = $7::uuid AND {_VISIBLE})
                ON CONFLICT (id) DO NOTHING RETURNING {_COLS}
            ), ev AS (
                INSERT INTO task_events (id, task_id, session_id, event, from_state, to_state, version,
                    changes{link_columns})
                SELECT $10, id, $2, 'created', NULL, state, 1, $11::jsonb{link_values} FROM ins
            )
            SELECT ins.* FROM ins"""


@functools.cache
def _update_sql(with_event: bool) -> str:
    """The one statement of the usual update (see TaskStore.update); with_event: the audit row
    names a group task's group and sender ($13, $14: common/links.TaskEventWrite)."""
    link_columns, link_values = (", link_group, link_sender", ", $13, $14") if with_event else ("", "")
    return f"""WITH cur AS (
                    SELECT tasks.id, tasks.name, tasks.description, tasks.metadata, tasks.parent_task_id,
                        tasks.state, m.to_state
                    FROM tasks JOIN unnest($9::text[], $10::text[]) AS m(from_state, to_state)
                        ON m.from_state = tasks.state
                    WHERE tasks.id = $1 AND tasks.version = $4 AND {_VISIBLE}
                    FOR UPDATE OF tasks
                ), upd AS (
                    UPDATE tasks SET
                        name = COALESCE($5, tasks.name),
                        description = COALESCE($6, tasks.description),
                        metadata = COALESCE($7::jsonb, tasks.metadata),
                        parent_task_id = CASE WHEN $8 THEN NULL ELSE tasks.parent_task_id END,
                        state = cur.to_state,
                        completed_at = CASE WHEN cur.to_state = 'COMPLETE' AND tasks.state <> 'COMPLETE'
                                            THEN now()
                                            WHEN cur.to_state <> 'COMPLETE' THEN NULL
                                            ELSE tasks.completed_at END,
                        updated_at = now(),
                        version = tasks.version + 1
                    FROM cur WHERE tasks.id = cur.id
                    RETURNING {", ".join("tasks." + c.strip() for c in _COLS.split(","))},
                        cur.state AS from_state, cur.name AS old_name, cur.description AS old_description,
                        cur.metadata AS old_metadata, cur.parent_task_id AS old_parent
                ), ev AS (
                    INSERT INTO task_events (id, task_id, session_id, event, from_state, to_state, version,
                        changes{link_columns})
                    SELECT $11, id, $2,
                        CASE WHEN $12 THEN 'reopened' WHEN state <> from_state THEN 'state_changed'
                             ELSE 'updated' END,
                        from_state, state, version,
                        (CASE WHEN $5::text IS NOT NULL AND $5 <> old_name
                              THEN jsonb_build_object('name', $5::text) ELSE '{{}}'::jsonb END)
                        || (CASE WHEN $6::text IS NOT NULL AND $6 <> old_description
                                 THEN jsonb_build_object('description', $6::text) ELSE '{{}}'::jsonb END)
                        || (CASE WHEN $7::jsonb IS NOT NULL AND $7::jsonb <> old_metadata
                                 THEN jsonb_build_object('metadata', $7::jsonb) ELSE '{{}}'::jsonb END)
                        || (CASE WHEN $8 AND old_parent IS NOT NULL
                                 THEN jsonb_build_object('parent_task_id', NULL) ELSE '{{}}'::jsonb END)
                        || (CASE WHEN state <> from_state
                                 THEN jsonb_build_object('state', state) ELSE '{{}}'::jsonb END)
                        {link_values}
                    FROM upd
                )
                SELECT {", ".join("upd." + c.strip() for c in _COLS.split(","))} FROM upd"""


def _next_state(current: str, requested: str | None, reopen: bool) -> str:
    if reopen:
        if current not in CLOSED_STATES:
            raise InvalidTransition(
                f"reopen applies to COMPLETE or CANCELLED tasks; this task is {current}",
                hint="Drop reopen=True and set the state directly.",
            )
        target = requested or "NOT_STARTED"
        if target not in REOPEN_STATES:
            raise InvalidTransition(f"a reopened task goes to NOT_STARTED or IN_PROGRESS, not {target}")
        return target
    if requested is None or requested == current:
        return current
    if requested not in TRANSITIONS[current]:
        if current in CLOSED_STATES:
            raise InvalidTransition(
                f"the task is {current}; it cannot move to {requested} unless it is reopened",
                hint="Pass reopen=True to move it back to NOT_STARTED or IN_PROGRESS.",
            )
        raise InvalidTransition(f"a task cannot go from {current} to {requested}")
    return requested


async def _refuse_cycle(conn: asyncpg.Connection, tid: str, parent: str) -> None:
    """Refuse a parent that is the task itself or one of its descendants."""
    cycle = await conn.fetchval(
        """WITH RECURSIVE up(id, depth) AS (
               SELECT $2::uuid, 0
               UNION ALL
               SELECT t.parent_task_id, up.depth + 1 FROM tasks t JOIN up ON t.id = up.id
               WHERE t.parent_task_id IS NOT NULL AND up.depth < 1000)
           SELECT EXISTS (SELECT 1 FROM up WHERE id = $1::uuid)""",
        tid,
        parent,
    )
    if cycle:
        raise InvalidArgument(
            f"task {parent} is a descendant of {tid}; making it the parent would create a cycle"
        )


async def _event(
    conn: asyncpg.Connection,
    event_id: str,
    tid: str,
    session_id: str | None,
    event: str,
    from_state: str | None,
    to_state: str | None,
    version: int,
    changes: dict[str, Any],
    group_event: link_store.TaskEventWrite | None = None,
) -> None:
    await conn.execute(
        "INSERT INTO task_events (id, task_id, session_id, event, from_state, to_state, version, changes,"
        " link_group, link_sender) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10)",
        event_id,
        tid,
        session_id,
        event,
        from_state,
        to_state,
        version,
        json.dumps(changes, default=str),
        None if group_event is None else group_event.group,
        None if group_event is None else group_event.sender,
    )


def build_tree(tasks: list[Task]) -> list[TaskNode]:
    """Nest tasks under their parents; a task whose parent is not in the list becomes a root."""
    nodes = {t.id: TaskNode(t) for t in tasks}
    roots: list[TaskNode] = []
    for t in tasks:
        node = nodes[t.id]
        parent = nodes.get(t.parent_task_id) if t.parent_task_id else None
        if parent is not None:
            parent.children.append(node)
        else:
            roots.append(node)
    return roots


def _written(row: asyncpg.Record, group_event: link_store.TaskEventWrite | None) -> Task:
    """The task a one-statement write returned (its audit row committed with it)."""
    if group_event is not None:
        group_event.written = True
    return Task.from_row(row)
