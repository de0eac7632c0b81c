"""Link tools and resources: sessions that choose to work together in a named group.

Tools: link_join (chat_context opts chat into the group's context), link_handoff (the note left
when the session ends or leaves), link_leave (with a handoff note), link_status (members, clients, active or
parked, last seen, in-progress tasks, reservations), link_send, link_inbox (unread first,
acknowledge), link_reserve / link_release (advisory file reservations with a TTL).
Resources: `exai://link/{group}/inbox` (this session's unread events, not acknowledged) and
`exai://link/{group}/status`. Each group event sends the members it concerns
`notifications/resources/updated` for the inbox URI (see instance/links.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import asyncpg
from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from common import links as db
from common.errors import InvalidArgument, MessageTooLarge
from instance.links import Links, group_scope_id
from instance.resources import resource_errors
from instance.runtime import Runtime
from instance.storage.validation import as_uuid
from instance.tools import exai_tool, headers_of

LEAVE_DRAIN_SECONDS = 5.0  # link_leave waits this long for the session's spooled events first

Group = Annotated[
    str, Field(min_length=1, max_length=100, description="The link group's name, e.g. the project's.")
]


def register(mcp: MCPServer[Any], runtime: Runtime) -> Links:
    links = Links(runtime)
    runtime.links = links

    async def status_of(group: str, session: str) -> dict[str, Any]:
        async def read(conn: asyncpg.Connection) -> dict[str, Any]:
            me = await db.member(conn, group, session)
            head = await conn.fetchval("SELECT seq FROM link_groups WHERE name = $1", group)
            unread = await conn.fetchval(
                "SELECT count(*) FROM link_events WHERE group_name = $1 AND id > $2 "
                "AND sender IS DISTINCT FROM $3 AND (recipient IS NULL OR recipient = $3)",
                group, me["read_upto"], session,
            )  # fmt: skip
            return {
                "members": await db.members(conn, group),
                "reservations": await db.reservations(conn, group),
                "head": int(head or 0),
                "cursor": int(me["read_upto"]),
                "unread": int(unread or 0),
                "chat_context": bool(me["chat_context"]),
                "handoff": me["handoff"],
                "work": await db.group_work(conn, group),
            }

        state = await links.run(read, what=f"reading link group {group!r}")
        group_work = state.pop("work")
        presence = await links.presence([m["session"] for m in state["members"]])
        storage = runtime.require_storage()
        for m in state["members"]:
            m["state"] = presence[m["session"]]
            m["you"] = m["session"] == session
            working = await storage.tasks.list(session_id=m["session"], scope="session", state="IN_PROGRESS")
            # its own tasks in progress, and the group tasks it moved to IN_PROGRESS
            m["working_on"] = [t.to_dict()["name"] for t in working] + [
                t["name"] for t in group_work.get(m["session"], [])
            ]
        group_tasks = await storage.tasks.list(session_id=group_scope_id(group), scope="session")
        return {"group": group, **state, "group_tasks": [t.to_dict() for t in group_tasks]}

    @exai_tool(
        mcp,
        runtime,
        description=(
            "Join a link group (created on first join, owned by your principal) to share messages, "
            "group tasks and notes, and file reservations with the other sessions in it."
        ),
    )
    async def link_join(
        group: Group,
        ctx: Context,
        chat_context: Annotated[
            bool | None,
            Field(
                description="True: your chat calls include this group's context by default "
                "(chat's include_group_context still overrides per call). Omit to keep as is."
            ),
        ] = None,
    ) -> dict[str, Any]:
        db.check_group(group)
        session, principal, client, crosses = links.caller(headers_of(ctx))

        async def join(
            conn: asyncpg.Connection,
        ) -> tuple[bool, db.LinkEvent | None, list[str], dict[str, Any], list[str]]:
            async with conn.transaction():
                joined, event = await db.join(
                    conn, group, session, principal=principal, client=client, admin=crosses
                )
                prefs = await db.set_prefs(conn, group, session, chat_context=chat_context)
            members = [m["session"] for m in await db.members(conn, group)]
            return joined, event, members, prefs, await db.chat_groups(conn, session)

        joined, event, sessions, prefs, chat_groups = await links.run(
            join, what=f"joining link group {group!r}", write=True
        )
        links.remember_members(group, sessions)
        links.remember_chat_groups(session, chat_groups)
        if event is not None:
            links.announce(event, sessions)
        return {
            "status": "success",
            "group": group,
            "joined": joined,
            "inbox": db.inbox_uri(group),
            "chat_context": prefs["chat_context"],
        }

    @exai_tool(
        mcp,
        runtime,
        description=(
            "Set the handoff note this session leaves for the others in a link group when it ends "
            "or leaves (the automatic handoff adds its in-progress tasks and released reservations); "
            "'' clears it."
        ),
    )
    async def link_handoff(group: Group, note: str, ctx: Context) -> dict[str, Any]:
        _check_body(runtime, note)
        session = runtime.session_for(headers_of(ctx))
        prefs = await links.run(
            lambda conn: db.set_prefs(conn, group, session, handoff=note),
            what=f"setting the handoff note in link group {group!r}",
            write=True,
        )
        return {"status": "success", "group": group, **prefs}

    @exai_tool(
        mcp, runtime, description="Leave a link group, optionally leaving a handoff note for the others."
    )
    async def link_leave(
        group: Group,
        ctx: Context,
        handoff: Annotated[str | None, Field(description="What the others should know or pick up.")] = None,
    ) -> dict[str, Any]:
        session = runtime.session_for(headers_of(ctx))
        _check_body(runtime, handoff or "")
        storage = runtime.require_storage()
        if storage.spool.rows:  # this session's last events go in before its leave
            await storage.flusher.flush(LEAVE_DRAIN_SECONDS)

        async def leave(conn: asyncpg.Connection) -> tuple[db.LinkEvent | None, list[str]]:
            async with conn.transaction():
                note = handoff
                if note is None:  # the note set with link_handoff, if any
                    note = await conn.fetchval(
                        "SELECT handoff FROM link_members WHERE group_name = $1 AND session_id = $2",
                        group, session,
                    )  # fmt: skip
                event = await db.leave(conn, group, session, handoff=note)
            return event, [m["session"] for m in await db.members(conn, group)]

        event, sessions = await links.run(leave, what=f"leaving link group {group!r}", write=True)
        links.remember_members(group, sessions)
        links.forget_chat_groups(session)
        if event is not None:  # the other instances' copies of the group drop it now
            links.members_changed(group)
        if event is not None:
            links.announce(event, sessions)
        return {"status": "success", "group": group, "left": event is not None}

    @exai_tool(
        mcp,
        runtime,
        description=(
            "Without group: the groups this session is in (and what its Exai-Link-Group header did). "
            "With group: its members (client, active or parked, last seen, in-progress tasks), "
            "reservations, group tasks and your unread count."
        ),
    )
    async def link_status(ctx: Context, group: Group | None = None) -> dict[str, Any]:
        session = runtime.session_for(headers_of(ctx))
        if group is None:
            mine = await links.run(lambda conn: db.groups_of(conn, session), what="listing link groups")
            out: dict[str, Any] = {"status": "success", "session": session, "groups": mine}
            header_joins = await links.header_joins(session)
            if header_joins:  # what the Exai-Link-Group header did: joined, or refused and why
                out["header_joins"] = header_joins
            return out
        return {"status": "success", "session": session, **await status_of(group, session)}

    @exai_tool(
        mcp,
        runtime,
        description=(
            "Send a message to one member (to=session id) or all members of a link group, with an "
            "optional subject and thread; they get it live and in link_inbox."
        ),
    )
    async def link_send(
        group: Group,
        body: Annotated[str, Field(min_length=1)],
        ctx: Context,
        to: Annotated[str | None, Field(description="A member's session id; omit for everyone.")] = None,
        subject: Annotated[str | None, Field(max_length=200)] = None,
        thread: Annotated[str | None, Field(max_length=200, description="Groups replies together.")] = None,
        message_id: Annotated[
            str | None,
            Field(
                max_length=64,
                description="A UUID you choose for this message, so a send retried after a lost "
                "answer is delivered once (the same event id is returned).",
            ),
        ] = None,
    ) -> dict[str, Any]:
        _check_body(runtime, body)
        session = runtime.session_for(headers_of(ctx))
        recipient = None if to in (None, "", "all") else to
        if recipient == session:  # the sender never reads its own events: it would be lost
            raise InvalidArgument(
                "to is your own session; a message to yourself is never delivered",
                hint="Send to another member's session id (link_status lists them), or use a note.",
            )
        fields: dict[str, Any] = {"recipient": recipient, "subject": subject, "thread": thread, "body": body}
        if message_id is None:
            event = await links.emit(group, "message", session, **fields)
        else:
            given = as_uuid(message_id, "message_id")
            event, _ = await links.emit_once(given, group, "message", session, **fields)
        # The group id is given when the event reaches Postgres (a moment later, in order);
        # `event` is its uuid, which link_inbox shows the others as "uuid".
        out = {"status": "success", "group": group, "event": event, "to": recipient or "all"}
        if message_id is not None:
            out["message_id"] = message_id
        return out

    @exai_tool(
        mcp,
        runtime,
        description=(
            "Your unread events of a link group (messages, task/note changes, reservations, joins), "
            "oldest first; ack=True (default) marks them read so each arrives exactly once."
        ),
    )
    async def link_inbox(
        group: Group,
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=1000, strict=True)] = 100,
        ack: bool = True,
    ) -> dict[str, Any]:
        session = runtime.session_for(headers_of(ctx))
        events, cursor, more = await links.inbox(group, session, limit=limit, ack=ack)
        return {
            "status": "success",
            "group": group,
            "count": len(events),
            "events": [e.to_dict() for e in events],
            "cursor": cursor,
            "more": more,
        }

    @exai_tool(
        mcp,
        runtime,
        description=(
            "Reserve files (paths or globs such as 'src/**') in a link group for ttl seconds. An "
            "overlap with another member's reservation is refused when either is exclusive (advisory)."
        ),
    )
    async def link_reserve(
        group: Group,
        paths: Annotated[
            list[Annotated[str, Field(min_length=1, max_length=500)]], Field(min_length=1, max_length=100)
        ],
        ctx: Context,
        ttl: Annotated[float, Field(gt=0, description="Seconds until the reservation expires.")] = 3600.0,
        exclusive: bool = True,
    ) -> dict[str, Any]:
        limit = runtime.settings.link_reservation_max_ttl
        if ttl > limit:
            raise InvalidArgument(
                f"ttl is {ttl:g}s; the limit is {limit:g}s",
                hint="Reserve for less and renew (EXAI_LINK_RESERVATION_MAX_TTL sets the limit).",
            )
        session = runtime.session_for(headers_of(ctx))
        patterns = list(dict.fromkeys(paths))

        async def reserve(conn: asyncpg.Connection) -> list[dict[str, Any]]:
            await db.member(conn, group, session)
            return await db.reserve(conn, group, session, patterns, ttl=ttl, exclusive=exclusive)

        held = await links.run(reserve, what=f"reserving files in link group {group!r}", write=True)
        await links.emit(group, "reserve", session, data={"reservations": held})
        return {"status": "success", "group": group, "reserved": held}

    @exai_tool(
        mcp, runtime, description="Release your file reservations in a link group (all, or the given paths)."
    )
    async def link_release(group: Group, ctx: Context, paths: list[str] | None = None) -> dict[str, Any]:
        if paths is not None and not paths:
            raise InvalidArgument(
                "paths is empty, so there is nothing to release",
                hint="Omit paths to release all your reservations in the group, or name the ones to release.",
            )
        session = runtime.session_for(headers_of(ctx))

        async def release(conn: asyncpg.Connection) -> list[str]:
            await db.member(conn, group, session)
            return await db.release(conn, group, session, paths)

        released = await links.run(release, what=f"releasing files in link group {group!r}", write=True)
        if released:
            await links.emit(group, "release", session, data={"patterns": released})
        return {"status": "success", "group": group, "released": released}

    @mcp.resource(
        "exai://link/{group}/inbox",
        name="link-inbox",
        description=(
            "This session's unread events in a link group (JSON, not acknowledged; link_inbox "
            "acknowledges). notifications/resources/updated for this URI says a new one arrived."
        ),
        mime_type="application/json",
    )
    async def link_inbox_resource(group: str) -> str:
        session = runtime.session_for(None)
        with resource_errors():
            events, cursor, more = await links.inbox(group, session, limit=1000, ack=False)
        return json.dumps(
            {"group": group, "cursor": cursor, "events": [e.to_dict() for e in events], "more": more}
        )

    @mcp.resource(
        "exai://link/{group}/status",
        name="link-status",
        description="A link group's members, presence, reservations and group tasks (JSON).",
        mime_type="application/json",
    )
    async def link_status_resource(group: str) -> str:
        with resource_errors():
            return json.dumps(await status_of(group, runtime.session_for(None)), default=str)

    return links


def _check_body(runtime: Runtime, body: str) -> None:
    size = len(body.encode())
    limit = runtime.settings.link_message_max_bytes
    if size > limit:
        raise MessageTooLarge(
            f"the message is {size} bytes; the limit is {limit} bytes",
            hint="Shorten it, or put the details in a group note "
            "(EXAI_LINK_MESSAGE_MAX_BYTES sets the limit).",
            size=size,
            limit=limit,
        )
