"""Note tools: small structured notes per session or per thread that survive restarts.

scope="session" (default) keys notes by the calling session; scope="thread" keys them by a
continuation_id, so any session continuing that thread sees them; scope="group" keys them by a
link group (stored as session notes of the id "link:{group}"), so every member sees them, and
each change is a group event (instance/links.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from common.errors import InvalidArgument
from instance.resources import notes_changed
from instance.runtime import Runtime
from instance.tools import exai_tool, headers_of

Scope = Literal["session", "thread", "group"]
GroupName = Annotated[str | None, Field(max_length=100, description="The link group, for scope='group'.")]
Key = Annotated[str, Field(min_length=1, max_length=200, description="Name of the note in its scope.")]


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    async def scope_id(
        ctx: Context, scope: Scope, continuation_id: str | None, group: str | None = None
    ) -> str:
        if scope == "group":
            return str(await runtime.links.require_member(group, runtime.session_for(headers_of(ctx))))
        if scope == "thread":
            if not continuation_id:
                raise InvalidArgument(
                    "scope='thread' needs continuation_id", hint="Pass the thread's continuation_id."
                )
            # A thread's notes are the thread's: only an existing thread this caller may use.
            owner = runtime.owner_for(headers_of(ctx))
            return await runtime.require_storage().history.check_access(
                continuation_id, owner, session=runtime.session_for(headers_of(ctx))
            )
        return runtime.session_for(headers_of(ctx))

    @exai_tool(mcp, runtime, description="Write (create or replace) a note in this session or a thread.")
    async def note_write(
        key: Key,
        body: Annotated[str, Field(description="The note text.")],
        ctx: Context,
        scope: Scope = "session",
        continuation_id: str | None = None,
        group: GroupName = None,
        kind: Annotated[
            str, Field(min_length=1, max_length=50, description="decision, constraint, todo…")
        ] = "note",
        importance: Annotated[int, Field(ge=0, le=10, strict=True)] = 0,
        expected_version: Annotated[
            int | None, Field(ge=1, strict=True, description="Fail if the note changed since.")
        ] = None,
    ) -> dict[str, Any]:
        storage = runtime.require_storage()
        note = await storage.notes.write(
            scope=_stored(scope),
            scope_id=await scope_id(ctx, scope, continuation_id, group),
            key=key,
            body=body,
            kind=kind,
            importance=importance,
            expected_version=expected_version,
        )
        if scope == "session":
            notes_changed(runtime, note.scope_id)
        elif scope == "group" and group:
            sender = runtime.session_for(headers_of(ctx))
            await runtime.links.emit(group, "note", sender, data={"key": key, "version": note.version})
        return {"status": "success", "note": note.to_dict()}

    @exai_tool(mcp, runtime, description="Read one note by key.")
    async def note_read(
        key: Key,
        ctx: Context,
        scope: Scope = "session",
        continuation_id: str | None = None,
        group: GroupName = None,
    ) -> dict[str, Any]:
        storage = runtime.require_storage()
        note = await storage.notes.read(
            scope=_stored(scope), scope_id=await scope_id(ctx, scope, continuation_id, group), key=key
        )
        return {"status": "success", "note": note.to_dict()}

    @exai_tool(mcp, runtime, description="List the notes of this session or of a thread.")
    async def note_list(
        ctx: Context, scope: Scope = "session", continuation_id: str | None = None, group: GroupName = None
    ) -> dict[str, Any]:
        storage = runtime.require_storage()
        notes = await storage.notes.list(
            scope=_stored(scope), scope_id=await scope_id(ctx, scope, continuation_id, group)
        )
        items = [n.to_dict() for n in notes]
        return {"status": "success", "count": len(items), "notes": items}

    @exai_tool(mcp, runtime, description="Delete a note by key.")
    async def note_delete(
        key: Key,
        ctx: Context,
        scope: Scope = "session",
        continuation_id: str | None = None,
        group: GroupName = None,
    ) -> dict[str, Any]:
        storage = runtime.require_storage()
        deleted = await storage.notes.delete(
            scope=_stored(scope), scope_id=await scope_id(ctx, scope, continuation_id, group), key=key
        )
        if deleted and scope == "session":
            notes_changed(runtime, runtime.session_for(headers_of(ctx)))
        elif deleted and scope == "group" and group:
            sender = runtime.session_for(headers_of(ctx))
            await runtime.links.emit(group, "note", sender, data={"key": key, "deleted": True})
        return {"status": "success", "deleted": deleted, "key": key}


def _stored(scope: Scope) -> str:
    """Group notes are stored as session notes of the group's scope id (link:{group})."""
    return "session" if scope == "group" else scope
