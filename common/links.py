"""Link groups in Postgres: membership, the durable per-group event log, cursors, reservations.

Shared by instances (the link_* tools) and the router (the /admin/links API), so both apply
the same rules. Every function takes an open asyncpg connection.

Event ids are per group and gapless (1, 2, 3, ...): `append` takes the next one from
`link_groups.seq` in the same transaction that stores the event, so the group row lock makes
ids commit in id order and a reader that saw id N has seen every id below it. A member's
cursor (`read_upto`) only moves forward (GREATEST), which makes catch-up exactly once: a
reader asks for ids above its cursor, in order, and acknowledging twice changes nothing.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from common.errors import InvalidArgument, LinkForbidden, NotLinked, ReservationConflict

log = logging.getLogger(__name__)

GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
KINDS = ("join", "leave", "message", "task", "note", "reserve", "release")


def check_group(name: Any) -> str:
    if not isinstance(name, str) or not GROUP_RE.match(name):
        raise InvalidArgument(
            "group must be 1-100 letters, digits, '.', '_' or '-' (starting with a letter or digit), "
            f"got {name!r}"
        )
    return name


def inbox_uri(group: str) -> str:
    """The MCP resource whose `notifications/resources/updated` announces the group's events."""
    return f"exai://link/{group}/inbox"


def status_uri(group: str) -> str:
    return f"exai://link/{group}/status"


@dataclass(frozen=True, slots=True)
class LinkEvent:
    group: str
    id: int
    kind: str
    sender: str | None
    recipient: str | None
    subject: str | None
    thread: str | None
    body: str
    data: dict[str, Any]
    created_at: datetime
    uuid: str | None = None

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> LinkEvent:
        data = row["data"]
        return cls(
            group=row["group_name"],
            id=int(row["id"]),
            kind=row["kind"],
            sender=row["sender"],
            recipient=row["recipient"],
            subject=row["subject"],
            thread=row["thread"],
            body=row["body"],
            data=json.loads(data) if isinstance(data, str) else dict(data or {}),
            created_at=row["created_at"],
            uuid=str(row["uuid"]) if row["uuid"] is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "from": self.sender,
            "to": self.recipient or "all",
            "created_at": self.created_at.isoformat(),
        }
        if self.uuid:
            out["uuid"] = self.uuid
        for name in ("subject", "thread"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        if self.body:
            out["body"] = self.body
        if self.data:
            out["data"] = self.data
        return out


_EVENT_COLS = "group_name, id, kind, sender, recipient, subject, thread, body, data, created_at, uuid"


async def append(
    conn: asyncpg.Connection,
    group: str,
    kind: str,
    *,
    sender: str | None,
    recipient: str | None = None,
    subject: str | None = None,
    thread: str | None = None,
    body: str = "",
    data: dict[str, Any] | None = None,
) -> LinkEvent:
    """Store one event with the group's next id (call inside a transaction or alone)."""
    async with conn.transaction():
        seq = await conn.fetchval("UPDATE link_groups SET seq = seq + 1 WHERE name = $1 RETURNING seq", group)
        if seq is None:
            raise NotLinked(f"no link group {group!r}")
        row = await conn.fetchrow(
            f"INSERT INTO link_events ({_EVENT_COLS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, now(), NULL) "
            f"RETURNING {_EVENT_COLS}",
            group, seq, kind, sender, recipient, subject, thread, body,
            json.dumps(data or {}, separators=(",", ":")),
        )  # fmt: skip
    return LinkEvent.from_row(row)


async def join(
    conn: asyncpg.Connection,
    group: str,
    session: str,
    *,
    principal: str | None,
    client: str | None,
    admin: bool = False,
) -> tuple[bool, LinkEvent | None]:
    """Add `session` to `group` (creating the group, owned by `principal`).

    Refused with LinkForbidden when the group belongs to another principal, unless `admin`.
    Returns (joined now, the join event); joining twice is a no-op (False, None).
    """
    check_group(group)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO link_groups (name, principal) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            group, principal,
        )  # fmt: skip
        row = await conn.fetchrow("SELECT principal, seq FROM link_groups WHERE name = $1 FOR UPDATE", group)
        owner = row["principal"]
        if not admin and owner is not None and owner != principal:
            raise LinkForbidden(f"link group {group!r} belongs to another principal")
        inserted = await conn.fetchval(
            "INSERT INTO link_members (group_name, session_id, principal, client_name, read_upto) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (group_name, session_id) DO NOTHING RETURNING 1",
            group, session, principal, client, row["seq"],
        )  # fmt: skip
        if not inserted:
            await touch(conn, group, session)
            return False, None
        event = await append(conn, group, "join", sender=session, data={"client": client})
        # The joiner's own join event is not news to it.
        await conn.execute(
            "UPDATE link_members SET read_upto = $3 WHERE group_name = $1 AND session_id = $2",
            group, session, event.id,
        )  # fmt: skip
    return True, event


async def leave(
    conn: asyncpg.Connection,
    group: str,
    session: str,
    *,
    handoff: str | None = None,
    data: dict[str, Any] | None = None,
) -> LinkEvent | None:
    """Remove `session` from `group`, leaving an optional handoff note in the log."""
    async with conn.transaction():
        deleted = await conn.fetchval(
            "DELETE FROM link_members WHERE group_name = $1 AND session_id = $2 RETURNING 1", group, session
        )
        if not deleted:
            return None
        await conn.execute(
            "DELETE FROM link_reservations WHERE group_name = $1 AND session_id = $2", group, session
        )
        return await append(conn, group, "leave", sender=session, body=handoff or "", data=data)


async def member(conn: asyncpg.Connection, group: str, session: str, *, lock: bool = False) -> asyncpg.Record:
    """The member row of `session` in `group`, or NotLinked (outsiders see nothing); `lock`
    holds it until the transaction ends (one inbox read and acknowledgement at a time)."""
    row = await conn.fetchrow(
        "SELECT * FROM link_members WHERE group_name = $1 AND session_id = $2"
        + (" FOR UPDATE" if lock else ""),
        group,
        session,
    )
    if row is None:
        raise NotLinked(f"this session is not a member of link group {group!r}")
    return row


async def touch(conn: asyncpg.Connection, group: str, session: str) -> None:
    await conn.execute(
        "UPDATE link_members SET last_seen_at = now() WHERE group_name = $1 AND session_id = $2",
        group, session,
    )  # fmt: skip


async def members(conn: asyncpg.Connection, group: str) -> list[dict[str, Any]]:
    head = await conn.fetchval("SELECT seq FROM link_groups WHERE name = $1", group)
    # Last seen: the member's last link activity or its last tool call of any kind, whichever
    # is later (tool_calls arrive written behind, a moment after each call; one index probe).
    rows = await conn.fetch(
        "SELECT session_id, principal, client_name, read_upto, joined_at, chat_context, "
        "handoff IS NOT NULL AS has_handoff, GREATEST(last_seen_at, ("
        "  SELECT max(created_at) FROM tool_calls c WHERE c.session_id = m.session_id"
        ")) AS last_seen_at "
        "FROM link_members m WHERE group_name = $1 ORDER BY joined_at, session_id",
        group,
    )
    return [
        {
            "session": r["session_id"],
            "principal": r["principal"],
            "client": r["client_name"],
            "cursor": int(r["read_upto"]),
            "behind": max(0, int(head or 0) - int(r["read_upto"])),
            "joined_at": r["joined_at"].isoformat(),
            "last_seen": r["last_seen_at"].isoformat(),
            "chat_context": bool(r["chat_context"]),
            "handoff_set": bool(r["has_handoff"]),
        }
        for r in rows
    ]


async def groups_of(conn: asyncpg.Connection, session: str) -> list[str]:
    rows = await conn.fetch(
        "SELECT group_name FROM link_members WHERE session_id = $1 ORDER BY group_name", session
    )
    return [r["group_name"] for r in rows]


async def groups(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT name, principal, seq, created_at FROM link_groups ORDER BY name")
    out = []
    for r in rows:
        out.append(
            {
                "group": r["name"],
                "principal": r["principal"],
                "events": int(r["seq"]),
                "created_at": r["created_at"].isoformat(),
                "members": await members(conn, r["name"]),
            }
        )
    return out


async def delete_group(conn: asyncpg.Connection, group: str) -> bool:
    async with conn.transaction():
        await conn.execute("DELETE FROM link_events WHERE group_name = $1", group)
        return bool(await conn.fetchval("DELETE FROM link_groups WHERE name = $1 RETURNING 1", group))


async def unread(conn: asyncpg.Connection, group: str, session: str, *, limit: int) -> list[LinkEvent]:
    """Events after the member's cursor that are for it (to all or to it), oldest first."""
    row = await member(conn, group, session)
    rows = await conn.fetch(
        f"SELECT {_EVENT_COLS} FROM link_events WHERE group_name = $1 AND id > $2 "
        "AND (sender IS DISTINCT FROM $3) AND (recipient IS NULL OR recipient = $3) "
        "ORDER BY id LIMIT $4",
        group, row["read_upto"], session, limit,
    )  # fmt: skip
    return [LinkEvent.from_row(r) for r in rows]


async def recent(conn: asyncpg.Connection, group: str, session: str, *, limit: int) -> list[LinkEvent]:
    """The newest events this member may see (read or not), oldest first."""
    rows = await conn.fetch(
        f"SELECT {_EVENT_COLS} FROM link_events WHERE group_name = $1 "
        "AND (recipient IS NULL OR recipient = $2 OR sender = $2) ORDER BY id DESC LIMIT $3",
        group, session, limit,
    )  # fmt: skip
    return [LinkEvent.from_row(r) for r in reversed(rows)]


async def ack(conn: asyncpg.Connection, group: str, session: str, upto: int) -> int:
    """Move the member's cursor forward to `upto` (never back); returns the cursor."""
    head = await conn.fetchval("SELECT seq FROM link_groups WHERE name = $1", group)
    cursor = await conn.fetchval(
        "UPDATE link_members SET read_upto = GREATEST(read_upto, LEAST($3::bigint, $4::bigint)), "
        "last_seen_at = now() WHERE group_name = $1 AND session_id = $2 RETURNING read_upto",
        group, session, upto, int(head or 0),
    )  # fmt: skip
    if cursor is None:
        raise NotLinked(f"this session is not a member of link group {group!r}")
    return int(cursor)


# --- advisory file reservations -------------------------------------------------------------
def _literal_prefix(pattern: str) -> str:
    cut = len(pattern)
    for ch in "*?[":
        i = pattern.find(ch)
        if i != -1:
            cut = min(cut, i)
    return pattern[:cut]


def overlaps(a: str, b: str) -> bool:
    """Whether two path globs may name a common file (conservative: when unsure, yes)."""
    if a == b or fnmatch.fnmatchcase(a, b) or fnmatch.fnmatchcase(b, a):
        return True
    pa, pb = _literal_prefix(a), _literal_prefix(b)
    wild_a, wild_b = pa != a, pb != b
    if wild_a and wild_b:
        return pa.startswith(pb) or pb.startswith(pa)
    if wild_a:
        return b.startswith(pa) and fnmatch.fnmatchcase(b, a)
    if wild_b:
        return a.startswith(pb) and fnmatch.fnmatchcase(a, b)
    return False


async def reserve(
    conn: asyncpg.Connection, group: str, session: str, patterns: list[str], *, ttl: float, exclusive: bool
) -> list[dict[str, Any]]:
    """Reserve `patterns` for `ttl` seconds; refuse (all of them) if one overlaps another
    session's reservation where either side is exclusive."""
    async with conn.transaction():
        await conn.execute("SELECT 1 FROM link_groups WHERE name = $1 FOR UPDATE", group)
        await conn.execute("DELETE FROM link_reservations WHERE expires_at <= now()")
        held = await conn.fetch(
            "SELECT pattern, session_id, exclusive, expires_at FROM link_reservations "
            "WHERE group_name = $1 AND session_id <> $2",
            group, session,
        )  # fmt: skip
        for pattern in patterns:
            for h in held:
                if (exclusive or h["exclusive"]) and overlaps(pattern, h["pattern"]):
                    client = await conn.fetchval(
                        "SELECT client_name FROM link_members WHERE group_name = $1 AND session_id = $2",
                        group, h["session_id"],
                    )  # fmt: skip
                    raise ReservationConflict(
                        f"{pattern!r} overlaps {h['pattern']!r}, reserved "
                        f"{'exclusively ' if h['exclusive'] else ''}by session {h['session_id']}"
                        f" ({client or 'unknown client'}) until {h['expires_at'].isoformat()}",
                        holder=h["session_id"],
                        holder_client=client,
                        pattern=h["pattern"],
                        expires_at=h["expires_at"].isoformat(),
                    )
        rows = []
        for pattern in patterns:
            row = await conn.fetchrow(
                "INSERT INTO link_reservations (group_name, pattern, session_id, exclusive, expires_at) "
                "VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5)) "
                "ON CONFLICT (group_name, pattern, session_id) DO UPDATE "
                "SET exclusive = EXCLUDED.exclusive, expires_at = EXCLUDED.expires_at "
                "RETURNING pattern, exclusive, expires_at",
                group, pattern, session, exclusive, float(ttl),
            )  # fmt: skip
            rows.append(
                {
                    "pattern": row["pattern"],
                    "exclusive": row["exclusive"],
                    "expires_at": row["expires_at"].isoformat(),
                }
            )
        return rows


async def release(
    conn: asyncpg.Connection, group: str, session: str, patterns: list[str] | None
) -> list[str]:
    if patterns:
        rows = await conn.fetch(
            "DELETE FROM link_reservations WHERE group_name = $1 AND session_id = $2 AND pattern = ANY($3) "
            "RETURNING pattern",
            group, session, patterns,
        )  # fmt: skip
    else:
        rows = await conn.fetch(
            "DELETE FROM link_reservations WHERE group_name = $1 AND session_id = $2 RETURNING pattern",
            group, session,
        )  # fmt: skip
    return [r["pattern"] for r in rows]


async def reservations(conn: asyncpg.Connection, group: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT pattern, session_id, exclusive, expires_at FROM link_reservations "
        "WHERE group_name = $1 AND expires_at > now() ORDER BY pattern, session_id",
        group,
    )
    return [
        {
            "pattern": r["pattern"],
            "session": r["session_id"],
            "exclusive": r["exclusive"],
            "expires_at": r["expires_at"].isoformat(),
        }
        for r in rows
    ]


# --- a group task's event: its audit row is the outbox ---------------------------------------
@dataclass(slots=True)
class TaskEventWrite:
    """The link-group event of a group task write (instance/tools/tasks.py). The write's own
    statement records the group and the sender in the change's audit row (`task_events`:
    `link_group`, `link_sender`), so the change and the fact that the group must hear of it
    commit together; the event itself (its uuid is the audit row's id) is stored afterwards,
    off the sender's call: spooled once the call has answered, or, if that never happens (the
    instance died, the write's reply was lost), by the outbox relay (`outbox_relay`).
    In: the group, the audit row's id (`uuid`) and the sender. Out: `written`, True once this
    call's audit row is known to be committed (not for a refused write, nor for a replay of
    another call's create)."""

    group: str
    uuid: str
    sender: str
    written: bool = False


def task_event_data(task: Any) -> dict[str, Any]:
    """A task event's `data`: the task's id, name, state and version as written."""
    return {"task_id": str(task.id), "name": task.name, "state": task.state, "version": int(task.version)}


def task_event_payload(event: TaskEventWrite, task: Any) -> dict[str, Any]:
    """The spooled form of a group task's event (as `store_spooled` takes it)."""
    return {
        "uuid": event.uuid,
        "group": event.group,
        "kind": "task",
        "sender": event.sender,
        "data": task_event_data(task),
        "created_at": time.time(),
    }


# The group task changes whose event is not stored yet, oldest first: their audit rows name a
# group (the partial index task_events_link_outbox_idx holds only those rows) and no link event
# has their id. Only rows older than the grace period (the usual path stores an event within
# milliseconds of the call's answer) and newer than the horizon (the scan stays short). And only
# those the store would take (_SPOOLED_SQL's rule): the group exists and the sender is a member,
# or was one when it made the change; the others (their event refused by a flusher already, or
# it would be) are never stored, so they are not looked at again and again.
_OUTBOX_SQL = """
SELECT e.id::text AS uuid, e.link_group AS group_name, e.link_sender AS sender, e.task_id::text AS task_id,
       t.name, e.to_state AS state, e.version, e.created_at
FROM task_events e JOIN tasks t ON t.id = e.task_id
WHERE e.link_group IS NOT NULL
  AND e.created_at < now() - make_interval(secs => $1)
  AND e.created_at > now() - make_interval(secs => $2)
  AND NOT EXISTS (SELECT 1 FROM link_events l WHERE l.uuid = e.id)
  AND EXISTS (SELECT 1 FROM link_groups g WHERE g.name = e.link_group)
  AND (EXISTS (SELECT 1 FROM link_members m
               WHERE m.group_name = e.link_group AND m.session_id = e.link_sender)
       OR EXISTS (SELECT 1 FROM link_events l WHERE l.group_name = e.link_group AND l.kind = 'leave'
                  AND l.sender = e.link_sender AND l.created_at >= e.created_at))
ORDER BY e.created_at, e.version
LIMIT $3
"""
_OUTBOX_LOCK = 0x6578_6169_6C6E_6B6F  # pg advisory lock key: one relay at a time in the fleet


async def outbox_relay(
    conn: asyncpg.Connection, *, grace_s: float, horizon_s: float, limit: int = 500
) -> list[StoredOrRefused]:
    """Store the events of group task changes that committed but whose event was never stored
    (their instance was killed between the write and the spool, or the write's reply was lost),
    exactly once each (by uuid, the audit row's id), in the order the changes were made; as
    `store_spooled` returns them, for the announcement. One relay at a time in the fleet (an
    advisory lock; another instance's relay running now returns [] here)."""
    # Usually there are none: one round trip, no transaction, to find that out.
    if not await conn.fetch(_OUTBOX_SQL, grace_s, horizon_s, 1):
        return []
    async with conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _OUTBOX_LOCK):
            return []
        rows = await conn.fetch(_OUTBOX_SQL, grace_s, horizon_s, limit)
        if not rows:
            return []
        payloads = [
            {
                "uuid": r["uuid"],
                "group": r["group_name"],
                "kind": "task",
                "sender": r["sender"],
                "data": {
                    "task_id": r["task_id"],
                    "name": r["name"],
                    "state": r["state"],
                    "version": r["version"],
                },
                "created_at": r["created_at"].timestamp(),
            }
            for r in rows
        ]
        return await store_spooled(conn, payloads)


# --- events written behind (instance spool -> flusher) ---------------------------------------
# One statement per group, one round trip: skip the events already stored (a replay after a
# crash: found by uuid; besides this instance's flusher only the outbox relay writes these uuids,
# for a group task change a while old, and a store racing with it inserts nothing for that uuid:
# ON CONFLICT, its id left unused), take as many ids as
# are left (the UPDATE holds the group row's lock until the statement commits, so ids commit in
# order; a concurrent flusher waits and then sees the new seq), store the events with them in
# spool order, mark the senders seen, and return the members for the notifications. It always
# returns one row at least: `found` = 0 says the group does not exist (deleted meanwhile).
# Membership is checked here, where it is authoritative (the instance let the event through on
# its cached member list): an event is taken if its sender is a member, or was one when it made
# the event (its latest `leave` is not older than the event: a session's last events that were
# still in the spool when it ended or left). The others are `refused` (their uuids): the sender
# was removed (or left) before it made them, with a copy that had not heard of it yet. A direct
# message whose recipient is no longer a member (nobody could ever read it) is refused too
# (`unreachable`).
_SPOOLED_SQL = f"""
WITH given AS (
    SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::timestamptz[], $10::uuid[]) WITH ORDINALITY
            AS u(kind, sender, recipient, subject, thread, body, data, created_at, uuid, ord)
    WHERE NOT EXISTS (SELECT 1 FROM link_events e WHERE e.uuid = u.uuid)
), judged AS (
    SELECT given.*, (
        given.sender IS NULL
        OR EXISTS (SELECT 1 FROM link_members m WHERE m.group_name = $1 AND m.session_id = given.sender)
        OR EXISTS (SELECT 1 FROM link_events l WHERE l.group_name = $1 AND l.kind = 'leave'
                   AND l.sender = given.sender AND l.created_at >= given.created_at)
    ) AS allowed, (
        given.recipient IS NULL
        OR EXISTS (SELECT 1 FROM link_members m WHERE m.group_name = $1 AND m.session_id = given.recipient)
    ) AS reachable
    FROM given
), fresh AS (
    SELECT * FROM judged WHERE allowed AND reachable
), numbered AS (
    SELECT fresh.*, row_number() OVER (ORDER BY fresh.ord) AS k, count(*) OVER () AS n FROM fresh
), g AS (
    UPDATE link_groups SET seq = seq + (SELECT count(*) FROM fresh) WHERE name = $1 RETURNING seq
), ins AS (
    INSERT INTO link_events ({_EVENT_COLS})
    SELECT $1, g.seq - n.n + n.k, n.kind, n.sender, n.recipient, n.subject, n.thread, n.body,
           n.data::jsonb, n.created_at, n.uuid
    FROM g, numbered n
    ON CONFLICT (uuid) DO NOTHING
    RETURNING {_EVENT_COLS}
), seen AS (
    UPDATE link_members SET last_seen_at = now()
    WHERE group_name = $1 AND session_id IN (SELECT sender FROM fresh) RETURNING 1
)
SELECT (SELECT count(*) FROM g) AS found, ins.*,
       ARRAY(SELECT session_id FROM link_members WHERE group_name = $1) AS members,
       ARRAY(SELECT uuid::text FROM judged WHERE NOT allowed) AS refused,
       ARRAY(SELECT uuid::text FROM judged WHERE allowed AND NOT reachable) AS unreachable
FROM (SELECT 1) AS one LEFT JOIN ins ON true
ORDER BY ins.id
"""


def _when(value: Any) -> datetime:
    from datetime import UTC

    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(str(value))


@dataclass(frozen=True, slots=True)
class RefusedEvent:
    """A spooled event the store refused: its group is gone, or its sender was no longer a
    member when it made it. The sender's call was answered already; its instance tells it
    (instance/link_notices.py)."""

    uuid: str
    group: str
    kind: str
    sender: str | None
    reason: str  # "group_deleted", "not_member" (the sender) or "recipient_gone"
    recipient: str | None = None

    def words(self) -> str:
        if self.kind in ("task", "note"):  # the group task or note itself was written directly
            what = (
                f"Your change to a group {self.kind} of link group {self.group!r} was stored, but "
                f"its event {self.uuid} was not delivered to the group"
            )
        else:
            what = f"Your link event {self.uuid} ({self.kind}) in link group {self.group!r} was not delivered"
        if self.reason == "group_deleted":
            return (
                f"{what}: the group was deleted before the event was stored. Nobody received it; "
                "join or create a group (link_join) and send it again if it still matters."
            )
        if self.reason == "recipient_gone":
            return (
                f"{what}: session {self.recipient} you sent it to was no longer a member of the "
                "group when it was stored (it left, ended, or the admin removed it), so nobody "
                "could read it. See link_status() for the members, and send it to another one "
                "or to all."
            )
        return (
            f"{what}: this session was no longer a member of the group when it sent it (it left, "
            "or the admin removed it). Nobody received it; check link_status(), and rejoin "
            "(link_join, or ask the admin) before sending again."
        )


StoredOrRefused = tuple[LinkEvent, list[str]] | RefusedEvent


async def store_spooled(conn: asyncpg.Connection, payloads: list[dict[str, Any]]) -> list[StoredOrRefused]:
    """Give spooled events their group ids and store them, idempotently (alone, or in a
    transaction: each group is one statement, so one round trip for a batch of one group).

    Each payload is one event as the instance spooled it (`uuid`, `group`, `kind`, `sender`, ...,
    `created_at` in epoch seconds), in the order the calls made them. Per group, under the group
    row's lock: the uuids already stored (a replay after a crash) are skipped and take no id, the
    others get the next ids in order. Returns each new event with the group's members then, for
    the notifications, and a `RefusedEvent` for each event not stored because its group was
    deleted or its sender was not a member when it made it (see _SPOOLED_SQL), for its sender.
    Spools written by an earlier version of the instance may hold two older forms of a group
    task's event, still read here: `recheck` (only looked up, never stored: `_rechecked`) and
    one naming its write's audit row (`task_event`: `_resolve_task_events`).
    """
    out: list[StoredOrRefused] = []
    if any(p.get("recheck") for p in payloads):
        out.extend(await _rechecked(conn, [p for p in payloads if p.get("recheck")]))
        payloads = [p for p in payloads if not p.get("recheck")]
    payloads = await _resolve_task_events(conn, payloads)
    by_group: dict[str, dict[str, dict[str, Any]]] = {}
    for p in payloads:
        by_group.setdefault(str(p["group"]), {}).setdefault(str(p["uuid"]), p)
    for group in sorted(by_group):  # one lock order for every flusher: no deadlocks
        new = list(by_group[group].values())
        rows = await conn.fetch(
            _SPOOLED_SQL,
            group,
            [p["kind"] for p in new],
            [p.get("sender") for p in new],
            [p.get("recipient") for p in new],
            [p.get("subject") for p in new],
            [p.get("thread") for p in new],
            [p.get("body") or "" for p in new],
            [json.dumps(p.get("data") or {}, separators=(",", ":")) for p in new],
            [_when(p["created_at"]) for p in new],
            [p["uuid"] for p in new],
        )
        if not rows[0]["found"]:
            log.warning("refusing %d event(s) of link group %r: the group was deleted", len(new), group)
            out.extend(_refused(p, "group_deleted") for p in new)
            continue
        out.extend((LinkEvent.from_row(r), list(r["members"])) for r in rows if r["id"] is not None)
        refused = set(rows[0]["refused"] or ())
        unreachable = set(rows[0]["unreachable"] or ())
        if refused or unreachable:
            log.warning(
                "refusing %d event(s) of link group %r: their sender, or the one member they were "
                "for, was not a member",
                len(refused) + len(unreachable),
                group,
            )
            out.extend(_refused(p, "not_member") for p in new if str(p["uuid"]) in refused)
            out.extend(_refused(p, "recipient_gone") for p in new if str(p["uuid"]) in unreachable)
    return out


def _refused(payload: dict[str, Any], reason: str) -> RefusedEvent:
    return RefusedEvent(
        uuid=str(payload["uuid"]),
        group=str(payload["group"]),
        kind=str(payload.get("kind") or "event"),
        sender=payload.get("sender"),
        reason=reason,
        recipient=payload.get("recipient"),
    )


async def _rechecked(
    conn: asyncpg.Connection, payloads: list[dict[str, Any]]
) -> list[tuple[LinkEvent, list[str]]]:
    """Payloads marked `recheck` (spooled by an earlier version, whose group task write stored
    its event in its own statement, for a write that failed as its caller saw it but may have
    committed): never stored from here, only looked up by uuid; the events found are returned
    for the announcement nobody made."""
    rows = await conn.fetch(
        f"SELECT {_EVENT_COLS}, ARRAY(SELECT session_id FROM link_members m"
        " WHERE m.group_name = e.group_name) AS members"
        " FROM link_events e WHERE e.uuid = ANY($1::uuid[]) ORDER BY e.group_name, e.id",
        [str(p["uuid"]) for p in payloads],
    )
    return [(LinkEvent.from_row(r), list(r["members"])) for r in rows]


async def _resolve_task_events(
    conn: asyncpg.Connection, payloads: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Events that name a task write's audit row (`task_event`, spooled by an earlier version
    beside its write) get the task's id, name, state and version from it; those whose row does
    not exist (the write was refused) are dropped."""
    wanted = [str(p["task_event"]) for p in payloads if p.get("task_event")]
    if not wanted:
        return payloads
    rows = await conn.fetch(
        "SELECT e.id, e.task_id, e.to_state, e.version, t.name FROM task_events e "
        "JOIN tasks t ON t.id = e.task_id WHERE e.id = ANY($1::uuid[])",
        wanted,
    )
    found = {str(r["id"]): r for r in rows}
    out = []
    for p in payloads:
        if p.get("task_event"):
            r = found.get(str(p["task_event"]))
            if r is None:
                continue  # the task write did not happen: no event
            data = {
                "task_id": str(r["task_id"]),
                "name": r["name"],
                "state": r["to_state"],
                "version": r["version"],
            }
            p = {**p, "data": data}
        out.append(p)
    return out


# --- per-member settings: chat context opt-in, the handoff note -------------------------------
async def set_prefs(
    conn: asyncpg.Connection,
    group: str,
    session: str,
    *,
    chat_context: bool | None = None,
    handoff: str | None = None,
) -> dict[str, Any]:
    """Change what is given (None: unchanged; handoff '' clears it); returns both settings."""
    row = await conn.fetchrow(
        "UPDATE link_members SET chat_context = COALESCE($3, chat_context), "
        "handoff = CASE WHEN $4::text IS NULL THEN handoff ELSE NULLIF($4::text, '') END "
        "WHERE group_name = $1 AND session_id = $2 RETURNING chat_context, handoff",
        group, session, chat_context, handoff,
    )  # fmt: skip
    if row is None:
        raise NotLinked(f"this session is not a member of link group {group!r}")
    return {"chat_context": bool(row["chat_context"]), "handoff": row["handoff"]}


async def chat_groups(conn: asyncpg.Connection, session: str) -> list[str]:
    """The groups whose context this session's chats include by default (opted in)."""
    rows = await conn.fetch(
        "SELECT group_name FROM link_members WHERE session_id = $1 AND chat_context ORDER BY group_name",
        session,
    )
    return [r["group_name"] for r in rows]


async def group_work(conn: asyncpg.Connection, group: str) -> dict[str, list[dict[str, Any]]]:
    """The group's tasks in progress, by the member whose change was the last (the one that
    moved it to IN_PROGRESS, unless another changed it since): session -> [{id, name}]."""
    rows = await conn.fetch(
        "SELECT last.sender, t.id, t.name FROM tasks t JOIN ("
        "  SELECT DISTINCT ON (data->>'task_id') data->>'task_id' AS task_id, sender "
        "  FROM link_events WHERE group_name = $1 AND kind = 'task' "
        "  ORDER BY data->>'task_id', id DESC"
        ") last ON last.task_id = t.id::text "
        "WHERE t.session_id = $2 AND t.state = 'IN_PROGRESS' "
        "ORDER BY t.updated_at",
        group, "link:" + group,
    )  # fmt: skip
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r["sender"], []).append({"id": r["id"], "name": r["name"]})
    return out


async def end_session(
    conn: asyncpg.Connection, session: str, *, reason: str
) -> list[tuple[LinkEvent, list[str]]]:
    """A session ended: it leaves every group with an automatic handoff.

    The `leave` event carries the member's own handoff note (set with link_handoff, if any) as
    its body, and in `data`: why the session ended, its in-progress tasks (its own, and the
    group tasks it last moved to IN_PROGRESS) and the reservations it held (released now).
    Returns each leave event with the members left, for the notifications.
    """
    out: list[tuple[LinkEvent, list[str]]] = []
    own = await conn.fetch(
        "SELECT id, name FROM tasks WHERE session_id = $1 AND state = 'IN_PROGRESS' ORDER BY updated_at",
        session,
    )
    for group in await groups_of(conn, session):
        async with conn.transaction():
            me = await conn.fetchrow(
                "SELECT handoff FROM link_members WHERE group_name = $1 AND session_id = $2 FOR UPDATE",
                group, session,
            )  # fmt: skip
            if me is None:
                continue
            held = await conn.fetch(
                "SELECT pattern, exclusive FROM link_reservations "
                "WHERE group_name = $1 AND session_id = $2 AND expires_at > now() ORDER BY pattern",
                group, session,
            )  # fmt: skip
            group_tasks = (await group_work(conn, group)).get(session, [])
            data = {
                "reason": reason,
                "in_progress": [{"task_id": str(t["id"]), "name": t["name"]} for t in [*own, *group_tasks]],
                "released": [{"pattern": r["pattern"], "exclusive": r["exclusive"]} for r in held],
            }
            event = await leave(conn, group, session, handoff=me["handoff"] or "", data=data)
            if event is None:
                continue
            rest = await conn.fetch("SELECT session_id FROM link_members WHERE group_name = $1", group)
            out.append((event, [r["session_id"] for r in rest]))
    return out
