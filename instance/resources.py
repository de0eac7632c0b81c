"""MCP resources: the session's notes and tasks, and the notifications that say they changed.

Two static resources of the session the instance serves (an instance serves one session at a
time; the SDK gives static resources no request context, so the binding names it):

- `exai://session/notes`: the session's notes (scope "session"), as JSON;
- `exai://session/tasks`: the session's own tasks, as JSON.

When a tool changes one of them, the instance publishes `notifications/resources/updated`
for its URI to the session's notification stream (instance/notify.py); the router delivers
it on the session's GET stream, or on a `subscriptions/listen` stream that subscribed to the
URI. A client that keeps the list in view re-reads the resource instead of polling.
"""

from __future__ import annotations

import json
from typing import Any

from mcp.server.mcpserver import MCPServer

from instance.runtime import Runtime

NOTES_URI = "exai://session/notes"
TASKS_URI = "exai://session/tasks"
UPDATED = "notifications/resources/updated"


def notes_changed(runtime: Runtime, session_id: str) -> None:
    runtime.notify(session_id, UPDATED, {"uri": NOTES_URI})


def tasks_changed(runtime: Runtime, session_id: str) -> None:
    runtime.notify(session_id, UPDATED, {"uri": TASKS_URI})


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    @mcp.resource(
        NOTES_URI,
        name="session-notes",
        description="This session's notes (JSON); changes come as notifications/resources/updated.",
        mime_type="application/json",
    )
    async def session_notes() -> str:
        storage = runtime.require_storage()
        sid = runtime.session_for(None)
        notes = await storage.notes.list(scope="session", scope_id=sid)
        return json.dumps({"session": sid, "notes": [n.to_dict() for n in notes]}, default=str)

    @mcp.resource(
        TASKS_URI,
        name="session-tasks",
        description="This session's tasks (JSON); changes come as notifications/resources/updated.",
        mime_type="application/json",
    )
    async def session_tasks() -> str:
        storage = runtime.require_storage()
        sid = runtime.session_for(None)
        tasks = await storage.tasks.list(session_id=sid, scope="session")
        return json.dumps({"session": sid, "tasks": [t.to_dict() for t in tasks]}, default=str)
