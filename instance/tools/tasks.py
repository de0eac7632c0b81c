"""Task tools: work items that outlive the chat, with optimistic locking and an audit trail.

Tasks are written to Postgres directly (not write-behind): the write *is* the product, so when
Postgres is down these tools say so plainly instead of pretending. Tasks belong to the calling
session unless created with scope="global", or belong to a link group with scope="group"
(stored under the session id "link:{group}"; every member may read and update them, each
change is a group event, and optimistic locking works as for any task).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from common.errors import InvalidArgument
from common.links import TaskEventWrite
from instance.resources import tasks_changed
from instance.runtime import Runtime
from instance.storage.validation import new_id
from instance.tools import exai_tool, headers_of

log = logging.getLogger(__name__)

TaskState = Literal["NOT_STARTED", "IN_PROGRESS", "CANCELLED", "COMPLETE"]
GroupName = Annotated[
    str | None, Field(max_length=100, description="A link group: its tasks instead of this session's.")
]


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    def session(ctx: Context) -> str:
        return runtime.session_for(headers_of(ctx))

    async def scope_of(ctx: Context, group: str | None) -> str:
        """The session id the task lives under: the caller's, or its link group's."""
        if group:
            return str(await runtime.links.require_member(group, session(ctx)))
        return session(ctx)

    async def with_group_event(
        ctx: Context,
        group: str | None,
        write: Callable[[str | None, TaskEventWrite | None], Awaitable[Any]],
    ) -> Any:
        """Run a task write; for a group task, record its group event with it.

        The write's own statement names the group and the sender in the change's audit row
        (common/links.TaskEventWrite), so the change and its event commit together and the
        call costs no more than a session task's; the event itself (its uuid is the audit row's
        id) is spooled once the call's answer is written, and stored and announced by the
        flusher (`Links.task_event_written`). A write that fails as the caller sees it but did
        commit (its reply lost), or an instance killed before the spool took the event, leaves
        the event to the outbox relay (`Links.relay_outbox`), which stores it once.
        """
        if not group:
            return await write(None, None)
        event = TaskEventWrite(group=group, uuid=new_id(), sender=session(ctx))
        result = await write(event.uuid, event)
        runtime.links.task_event_written(event, result)
        return result

    @exai_tool(mcp, runtime, description="Create a task (session-scoped, or scope='global' to share it).")
    async def task_create(
        name: Annotated[str, Field(min_length=1, max_length=500, description="Short title of the task.")],
        ctx: Context,
        description: Annotated[str, Field(max_length=20_000)] = "",
        parent_task_id: Annotated[
            str | None, Field(description="Id of the parent task, for subtasks.")
        ] = None,
        state: TaskState = "NOT_STARTED",
        metadata: dict[str, Any] | None = None,
        scope: Literal["session", "global", "group"] = "session",
        group: GroupName = None,
        task_id: Annotated[
            str | None,
            Field(
                max_length=64,
                description="A UUID you choose for the new task, so a retried create (its answer "
                "lost) returns the task the first attempt made instead of making a second one.",
            ),
        ] = None,
    ) -> dict[str, Any]:
        storage = runtime.require_storage()
        if scope == "group" and not group:
            raise InvalidArgument("scope='group' needs group", hint="Pass the link group's name.")
        group = group if scope == "group" else None
        scope_id = None if scope == "global" else await scope_of(ctx, group)
        task = await with_group_event(
            ctx,
            group,
            lambda event_id, group_event: storage.tasks.create(
                session_id=scope_id,
                name=name,
                description=description,
                parent_task_id=parent_task_id,
                metadata=metadata or {},
                state=state,
                task_id=task_id,
                principal=runtime.principal_for(headers_of(ctx)),
                owner=runtime.owner_for(headers_of(ctx)),
                event_id=event_id,
                group_event=group_event,
            ),
        )
        if task.session_id and not group:
            tasks_changed(runtime, task.session_id)
        return {"status": "success", "task": task.to_dict()}

    @exai_tool(
        mcp,
        runtime,
        description=(
            "Update a task (pass group for a link group's task). expected_version must be the "
            "task's current version (from task_get); "
            "a stale version gives a version_conflict error naming the current one."
        ),
    )
    async def task_update(
        task_id: str,
        expected_version: Annotated[int, Field(ge=1, strict=True, description="The version you last read.")],
        ctx: Context,
        state: TaskState | None = None,
        name: Annotated[str | None, Field(min_length=1, max_length=500)] = None,
        description: Annotated[str | None, Field(max_length=20_000)] = None,
        metadata: dict[str, Any] | None = None,
        parent_task_id: Annotated[str | None, Field(description="New parent; '' detaches.")] = None,
        reopen: Annotated[bool, Field(description="Allow COMPLETE/CANCELLED -> IN_PROGRESS.")] = False,
        group: GroupName = None,
    ) -> dict[str, Any]:
        storage = runtime.require_storage()
        extra: dict[str, Any] = {}
        if parent_task_id is not None:  # omitted: unchanged; "": detach from the parent
            extra["parent_task_id"] = parent_task_id or None
        scope_id = await scope_of(ctx, group)
        task = await with_group_event(
            ctx,
            group,
            lambda event_id, group_event: storage.tasks.update(
                task_id,
                expected_version=expected_version,
                session_id=scope_id,
                state=state,
                name=name,
                description=description,
                metadata=metadata,
                reopen=reopen,
                owner=runtime.owner_for(headers_of(ctx)),
                event_id=event_id,
                group_event=group_event,
                **extra,
            ),
        )
        if task.session_id and not group:
            tasks_changed(runtime, task.session_id)
        return {"status": "success", "task": task.to_dict()}

    @exai_tool(
        mcp, runtime, description="Read one task (this session's or a global one), optionally with history."
    )
    async def task_get(
        task_id: str, ctx: Context, include_events: bool = False, group: GroupName = None
    ) -> dict[str, Any]:
        storage = runtime.require_storage()
        owner = runtime.owner_for(headers_of(ctx))
        sid = await scope_of(ctx, group)
        task = await storage.tasks.get(task_id, session_id=sid, owner=owner)
        out: dict[str, Any] = {"status": "success", "task": task.to_dict()}
        if include_events:
            out["events"] = [
                e.to_dict() for e in await storage.tasks.events(task_id, session_id=sid, owner=owner)
            ]
        return out

    @exai_tool(
        mcp,
        runtime,
        description=(
            "List tasks: scope 'session' (default), 'global' or 'all'; filter by state or parent; "
            "tree=True nests subtasks."
        ),
    )
    async def task_list(
        ctx: Context,
        scope: Literal["session", "global", "all", "group"] = "session",
        state: TaskState | None = None,
        parent_task_id: str | None = None,
        tree: bool = False,
        group: GroupName = None,
    ) -> dict[str, Any]:
        storage = runtime.require_storage()
        if scope == "group" and not group:
            raise InvalidArgument("scope='group' needs group", hint="Pass the link group's name.")
        tasks = await storage.tasks.list(
            session_id=await scope_of(ctx, group if scope == "group" else None),
            scope="session" if scope == "group" else scope,
            state=state,
            parent_task_id=parent_task_id,
            tree=tree,
            owner=runtime.owner_for(headers_of(ctx)),
        )
        items = [t.to_dict() for t in tasks]
        return {"status": "success", "scope": scope, "count": len(items), "tasks": items}
