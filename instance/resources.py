"""MCP resources: the session's notes and tasks, and the notifications that say they changed.

Two static resources of the session the instance serves (an instance serves one session at a
time; the SDK gives static resources no request context, so the binding names it):

- `exai://session/notes`: the session's notes (scope "session"), as JSON;
- `exai://session/tasks`: the session's own tasks, as JSON.

When a tool changes one of them, the instance publishes `notifications/resources/updated`
for its URI to the session's notification stream (instance/notify.py); the router delivers
it on the session's GET stream, or on a `subscriptions/listen` stream that subscribed to the
URI. A client that keeps the list in view re-reads the resource instead of polling.

`resources/list` adds the inbox and status URIs of each link group the session is in
(instance/tools/links.py serves them through the `exai://link/{group}/...` templates).

Handshake-era clients may first ask with `resources/subscribe` (the server advertises
`resources.subscribe`). The instance accepts a subscription to any of its own resources and
refuses other URIs; updates are sent to the session whether or not it subscribed (a session is
only ever told about its own notes and tasks and its own link groups), so a client that never
subscribes still hears of them, and `resources/unsubscribe` is accepted for symmetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Iterator
from typing import Any

from mcp import types
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from common.errors import ExaiError
from instance.runtime import Runtime

NOTES_URI = "exai://session/notes"
TASKS_URI = "exai://session/tasks"
UPDATED = "notifications/resources/updated"
LIST_GROUPS_WAIT = 1.0  # longest resources/list waits for Postgres to name the session's groups
# Every URI this instance serves: the two static resources and the link-group templates.
_OWN_URI = re.compile(r"^exai://(session/(notes|tasks)|link/[A-Za-z0-9][A-Za-z0-9._-]{0,99}/(inbox|status))$")


def notes_changed(runtime: Runtime, session_id: str) -> None:
    runtime.notify(session_id, UPDATED, {"uri": NOTES_URI})


def tasks_changed(runtime: Runtime, session_id: str) -> None:
    runtime.notify(session_id, UPDATED, {"uri": TASKS_URI})


@contextlib.contextmanager
def resource_errors() -> Iterator[None]:
    """A resource read's ExaiError as a JSON-RPC error in its own words (`[not_linked] ...`):
    the SDK turns any other exception of a template into "Error creating resource from
    template", which says nothing of what happened."""
    try:
        yield
    except ExaiError as exc:
        raise MCPError(code=exc.jsonrpc_code, message=f"[{exc.code}] {exc}", data=exc.to_dict()) from None


def _check_subscribable(uri: str) -> None:
    if not _OWN_URI.match(uri):
        raise MCPError(
            code=types.INVALID_PARAMS,
            message=f"[resource_not_found] There is no resource {uri!r} to subscribe to. "
            "Use a URI from resources/list or resources/templates/list "
            "(exai://session/notes, exai://session/tasks, exai://link/{group}/inbox or /status).",
            data={"uri": uri},
        )


def _accept_subscriptions(mcp: MCPServer[Any]) -> None:
    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        _check_subscribable(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        _check_subscribable(str(params.uri))
        return types.EmptyResult()

    # MCPServer has no public hook for these two methods; its low-level server does. Having the
    # handler is also what makes the SDK advertise `resources.subscribe` in the handshake era.
    lowlevel = mcp._lowlevel_server
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)


def _list_with_groups(mcp: MCPServer[Any], runtime: Runtime) -> None:
    """resources/list: the static resources, and the inbox and status of each link group the
    session is in (the templates stay in resources/templates/list). If Postgres does not
    answer, the static ones alone: a listing never fails for the groups."""

    async def list_resources(ctx: Any, params: types.PaginatedRequestParams) -> types.ListResourcesResult:
        from common import links as db

        resources = await mcp.list_resources()
        storage = runtime.storage
        if storage is not None and runtime.links is not None:
            session = runtime.session_for(None)
            try:
                async with asyncio.timeout(LIST_GROUPS_WAIT):
                    groups = await storage.db.run(
                        lambda conn: db.groups_of(conn, session), what="listing link groups"
                    )
            except (ExaiError, TimeoutError):
                groups = []
            for group in groups:
                for uri, what in ((db.inbox_uri(group), "inbox"), (db.status_uri(group), "status")):
                    resources.append(
                        types.Resource(
                            uri=uri,
                            name=f"link-{what}:{group}",
                            description=f"Link group {group!r}: "
                            + (
                                "your unread events (JSON)"
                                if what == "inbox"
                                else "members and presence (JSON)"
                            ),
                            mime_type="application/json",
                        )
                    )
        return types.ListResourcesResult(resources=resources)

    mcp._lowlevel_server.add_request_handler("resources/list", types.PaginatedRequestParams, list_resources)


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    _accept_subscriptions(mcp)
    _list_with_groups(mcp, runtime)

    @mcp.resource(
        NOTES_URI,
        name="session-notes",
        description="This session's notes (JSON); changes come as notifications/resources/updated.",
        mime_type="application/json",
    )
    async def session_notes() -> str:
        with resource_errors():
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
        with resource_errors():
            storage = runtime.require_storage()
            sid = runtime.session_for(None)
            tasks = await storage.tasks.list(session_id=sid, scope="session")
        return json.dumps({"session": sid, "tasks": [t.to_dict() for t in tasks]}, default=str)
