"""The admin API of link groups: list groups, members and cursors; link or unlink any session.

Group state lives in Postgres (common/links.py), so these handlers open one short asyncpg
connection per call (admin calls are rare; the proxy path never touches Postgres). The admin
may link sessions of any principal. Members hear about an admin join or removal like any
other group event: `notifications/resources/updated` for the group's inbox URI, appended to
each member's notification log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from aiohttp import web

from common import links as db
from common.errors import InvalidArgument, NotFound, StorageUnavailable
from common.keys import Keys
from common.link_members import members_changed
from common.notifications import notification
from common.redis import REDIS_DOWN_ERRORS
from common.settings import Settings

UPDATED = "notifications/resources/updated"
log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _connect(request: web.Request) -> AsyncIterator[asyncpg.Connection]:
    from router.app import SETTINGS_KEY

    settings: Settings = request.app[SETTINGS_KEY]
    if not settings.database_url:
        raise StorageUnavailable("DATABASE_URL is not set; link groups live in Postgres.")
    try:
        conn = await asyncpg.connect(settings.database_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageUnavailable(f"Postgres is unreachable ({exc}).", hint="Retry once it is up.") from None
    try:
        yield conn
    finally:
        await conn.close()


async def _announce(request: web.Request, event: db.LinkEvent | None, sessions: list[str]) -> None:
    from router.admin import PROXY_KEY

    if event is not None:
        await _members_changed(request, event.group)
        await _notify(request.app[PROXY_KEY].notifications, event, sessions)


async def _members_changed(request: web.Request, group: str) -> None:
    """Every instance drops its copy of the group's members now (common/link_members.py), so a
    removed session's next group write is refused in its answer, not seconds later."""
    from router.admin import PROXY_KEY

    table = request.app[PROXY_KEY].table
    await members_changed(table.redis, table.keys, group)


async def list_groups(request: web.Request) -> web.Response:
    async with _connect(request) as conn:
        return web.json_response({"groups": await db.groups(conn)})


async def get_group(request: web.Request) -> web.Response:
    group = db.check_group(request.match_info["group"])
    async with _connect(request) as conn:
        for g in await db.groups(conn):
            if g["group"] == group:
                g["reservations"] = await db.reservations(conn, group)
                return web.json_response(g)
    raise NotFound(f"No link group {group!r}.")


async def add_member(request: web.Request) -> web.Response:
    from router.admin import PROXY_KEY

    group = db.check_group(request.match_info["group"])
    try:
        body: Any = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("session"), str):
        raise InvalidArgument('The body must be JSON: {"session": "<session id>"}.')
    sess = await request.app[PROXY_KEY].table.fetch(body["session"])
    if sess is None or sess.ended:
        raise NotFound(f"No session {body['session']!r}.")
    async with _connect(request) as conn:
        joined, event = await db.join(
            conn, group, sess.id, principal=sess.principal or None, client=sess.client or None, admin=True
        )
        sessions = [m["session"] for m in await db.members(conn, group)]
    await _announce(request, event, sessions)
    return web.json_response({"group": group, "session": sess.id, "joined": joined})


async def remove_member(request: web.Request) -> web.Response:
    group = db.check_group(request.match_info["group"])
    async with _connect(request) as conn:
        event = await db.leave(conn, group, request.match_info["session"], handoff="removed by the admin")
        sessions = [m["session"] for m in await db.members(conn, group)]
    if event is None:
        raise NotFound(f"Session {request.match_info['session']!r} is not in link group {group!r}.")
    await _announce(request, event, sessions)
    return web.json_response({"group": group, "session": request.match_info["session"], "removed": True})


async def delete_group(request: web.Request) -> web.Response:
    group = db.check_group(request.match_info["group"])
    async with _connect(request) as conn:
        if not await db.delete_group(conn, group):
            raise NotFound(f"No link group {group!r}.")
    from router.admin import PROXY_KEY

    table = request.app[PROXY_KEY].table  # the group's Redis tail goes with its log
    await members_changed(table.redis, table.keys, group)
    with contextlib.suppress(*REDIS_DOWN_ERRORS):
        await table.redis.delete(table.keys.link_stream(group), table.keys.link_inflight(group))
    return web.json_response({"group": group, "deleted": True})


_STATS = {
    "events": ("exai_links_events_total", "Link-group events stored (messages, tasks, notes, joins, ...)."),
    "notified": ("exai_links_notifications_total", "Inbox notifications queued for group members."),
    "catchups": ("exai_links_catchups_total", "link_inbox reads that returned (caught up) events."),
    "caught_up_events": ("exai_links_catchup_events_total", "Events returned by those reads."),
}
# Summaries: (their _sum field, their _count field) in the Redis hash.
_LAGS = {
    "exai_links_delivery_lag_seconds": (
        ("lag_seconds_sum", "lag_count"),
        "Time from an event sent to its member reading it (link_inbox), over the events read.",
    ),
    "exai_links_publish_lag_seconds": (
        ("publish_lag_seconds_sum", "publish_lag_count"),
        "Time from the sender's call to the members' notification (write-behind), per event.",
    ),
}
_snapshot: dict[str, float] = {}


def _read(field: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {(): _snapshot.get(field, 0.0)}


def _read_pair(fields: tuple[str, str]) -> tuple[float, float]:
    return _snapshot.get(fields[0], 0.0), _snapshot.get(fields[1], 0.0)


async def refresh_metrics(request: web.Request) -> None:
    """Read the fleet-wide link counters (instances add to them in Redis) before /metrics renders."""
    from router.admin import PROXY_KEY

    table = request.app[PROXY_KEY].table
    with contextlib.suppress(*REDIS_DOWN_ERRORS):
        raw = await table.redis.hgetall(table.keys.link_stats())
        _snapshot.clear()
        for name, value in (raw or {}).items():
            with contextlib.suppress(ValueError):
                _snapshot[str(name)] = float(value)


def add_routes(app: web.Application) -> None:
    from router.admin import METRICS_KEY

    metrics = app[METRICS_KEY]
    for field, (name, doc) in _STATS.items():  # counts kept in Redis by the instances
        metrics.gauge(name, doc, functools.partial(_read, field), kind="counter")
    for name, (fields, doc) in _LAGS.items():
        metrics.summary(name, doc, functools.partial(_read_pair, fields))
    app.router.add_get("/admin/links", list_groups)
    app.router.add_get("/admin/links/{group}", get_group)
    app.router.add_delete("/admin/links/{group}", delete_group)
    app.router.add_post("/admin/links/{group}/members", add_member)
    app.router.add_delete("/admin/links/{group}/members/{session}", remove_member)


class EndHandoffs:
    """A session that ends (client DELETE, admin end, idle expiry) leaves its link groups.

    The router does it, from Postgres, so it works when the session's instance is gone: each
    group gets a `leave` event whose body is the member's handoff note (link_handoff) and whose
    data lists its in-progress tasks and the reservations it held (released now); the other
    members get the inbox notification. Ends are done in the background and retried while
    Postgres is down. They are also written to a Redis hash (`link-ends`) until done, so an end
    survives a router restart and any router finishes it; an end made while Redis was down too
    is written there as soon as Redis answers. Doing one twice is harmless (a session that is
    no longer a member leaves nothing).
    """

    def __init__(self, settings: Settings, hub: Any, redis: Any = None, keys: Keys | None = None) -> None:
        self.settings = settings
        self.hub = hub
        self.redis = redis
        self.keys = keys
        self.key = keys.link_ends() if keys is not None else None
        self.pending: dict[str, str] = {}  # session id -> why it ended
        self._unsaved: set[str] = set()  # pending, not yet in the Redis hash
        self._saving: set[asyncio.Task[None]] = set()
        self._pg_warned = self._redis_warned = False
        self.done = 0
        self._conn: asyncpg.Connection | None = None
        self.woken = asyncio.Event()  # an end to hand off now (the router's round waits on it)

    def ended(self, sess: Any, reason: str) -> None:
        if self.settings.database_url:
            self.pending[sess.id] = reason
            self._unsaved.add(sess.id)
            self.woken.set()
            if self.redis is not None:  # saved at once: the router may be stopped right after
                task = asyncio.create_task(self._save())
                self._saving.add(task)
                task.add_done_callback(self._saving.discard)

    async def _save(self) -> None:
        if self.redis is None or self.key is None:
            return
        unsaved = {sid: self.pending[sid] for sid in list(self._unsaved) if sid in self.pending}
        if not unsaved:
            return
        try:
            await self.redis.hset(self.key, mapping=unsaved)
        except REDIS_DOWN_ERRORS:
            return  # the next round tries again
        self._unsaved.difference_update(unsaved)

    async def _sync(self) -> None:
        """Save new ends to Redis and take the ones other routers (or this one before a
        restart) left there."""
        if self.redis is None or self.key is None:
            return
        await self._save()
        try:
            for sid, reason in (await self.redis.hgetall(self.key)).items():
                self.pending.setdefault(str(sid), str(reason))
            self._redis_warned = False
        except REDIS_DOWN_ERRORS as exc:
            if self.pending and not self._redis_warned:  # once per outage, not every round
                self._redis_warned = True
                log.warning(
                    "%d session end(s) kept in memory until Redis answers (%s)", len(self.pending), exc
                )

    async def _forget(self, sid: str) -> None:
        del self.pending[sid]
        self._unsaved.discard(sid)
        if self.redis is not None and self.key is not None:
            try:
                await self.redis.hdel(self.key, sid)
            except REDIS_DOWN_ERRORS:
                pass  # done; a later round may do it again, which leaves nothing

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.settings.database_url, timeout=10)
        return self._conn

    async def run_pending(self) -> None:
        """One round: hand off every queued end (a failure keeps it for the next round)."""
        await self._sync()
        for sid, reason in list(self.pending.items()):
            try:
                conn = await self._connection()
                left = await db.end_session(conn, sid, reason=reason)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                if not self._pg_warned:  # once per outage, not every round
                    self._pg_warned = True
                    log.warning("handoff of ended session %s waits for Postgres (%s)", sid[:8], exc)
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        self._conn.terminate()
                    self._conn = None
                return
            self._pg_warned = False
            await self._forget(sid)
            for event, sessions in left:
                self.done += 1
                log.info("session %s left link group %r (%s)", sid[:8], event.group, reason)
                if self.keys is not None:
                    await members_changed(self.redis, self.keys, event.group)
                await _notify(self.hub, event, sessions)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # ends not yet saved: one last try, bounded
            async with asyncio.timeout(2.0):
                await asyncio.gather(*self._saving, return_exceptions=True)
                await self._save()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


async def _notify(hub: Any, event: db.LinkEvent, sessions: list[str]) -> None:
    if hub is None:
        return
    message = notification(UPDATED, {"uri": db.inbox_uri(event.group)})
    for sid in sessions:
        if sid != event.sender:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):  # the durable log has it; link_inbox catches up
                await hub.events.append(sid, message)
