"""Notification streams held by the router, not by an instance.

A client's standalone notification stream costs no process and outlives every instance:

- handshake era: the `GET /mcp` SSE stream of a session (`Mcp-Session-Id`);
- 2026-07-28: the long-lived `subscriptions/listen` request, answered here with the SDK's
  wire format (the `notifications/subscriptions/acknowledged` frame first, every frame
  stamped with the subscription id in `_meta`, only the kinds the client asked for, and a
  `SubscriptionsListenResult` when the stream ends on purpose).

Instances append a session's notifications to its event log in Redis (common/notifications.py);
this hub holds one Redis pub/sub connection for the whole router, subscribed to the channels of
the sessions that have a stream open here, and wakes those streams, which write the event the
publish carried when it follows on from the last id they wrote, else read the log after it.
Frames carry the log's ids as SSE `id:` fields, so a client that reconnects with
`Last-Event-ID` gets every later event, in order, once, and then live ones (the stream is
subscribed before it reads the log, so nothing falls between the two). When Redis goes away
the streams stay open on keep-alive comments and the hub reconnects with backoff, then wakes
every stream to catch up from the log.

A listen stream's ids name a small record (Keys.listen) with its session, request id and
filter, so the SDK client's automatic resume (a GET with Last-Event-ID) continues it too.
Parking, failover and instance restarts change the session's instance, never the stream:
nothing here looks at instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from mcp_types import (
    NotificationParams,
    PromptListChangedNotification,
    ResourceListChangedNotification,
    ResourceUpdatedNotification,
    ResourceUpdatedNotificationParams,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
    SubscriptionsAcknowledgedNotificationParams,
    SubscriptionsListenResult,
    ToolListChangedNotification,
)
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError

from common import protocol as p
from common.errors import BadRequest, InvalidArgument, SessionNotFound, TooManyStreams
from common.keys import Keys
from common.notifications import END, Event, EventLog, carried, newer, parse_id
from common.redis import REDIS_DOWN_ERRORS
from common.redis_line import PubSubLine
from router.jsonrpc import Message, error_response
from router.metrics import Counter, Labels, Metrics
from router.sessions import Session, SessionTable, new_session_id

log = logging.getLogger(__name__)

LISTEN_METHOD = "subscriptions/listen"
SUBSCRIPTION_ID_META_KEY = "io.modelcontextprotocol/subscriptionId"
UPDATED = "notifications/resources/updated"
# The notifications a listen stream carries (the SDK's vocabulary) and the filter flag of each.
# Only mcp_types here: importing the `mcp` package would add seconds to the router's start.
_LIST_CHANGED = {
    "notifications/tools/list_changed": "tools_list_changed",
    "notifications/prompts/list_changed": "prompts_list_changed",
    "notifications/resources/list_changed": "resources_list_changed",
}
_LIST_CHANGED_MODELS: dict[str, Any] = {
    "notifications/tools/list_changed": ToolListChangedNotification,
    "notifications/prompts/list_changed": PromptListChangedNotification,
    "notifications/resources/list_changed": ResourceListChangedNotification,
}
EXAI_EVENTS_FILTER = "exaiEvents"
"""Listen-filter extension key: also deliver notifications outside the SDK's change
vocabulary (linked-session events), which GET streams always carry."""

BATCH = 200
LIVE_MAX = 200  # carried events a stream holds before it reads the log instead
MAX_BACKOFF = 5.0
SUBSCRIBE_WAIT = 2.0
POLL = 0.5  # how often the pub/sub reader looks up from Redis (resubscribing late streams)
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}
KEEPALIVE_FRAME = b": keep-alive\r\n\r\n"
LISTEN_FRAME_CACHE = 64  # change kinds (method, uri) whose frame a listen stream keeps rendered


def sse_frame(message: dict[str, Any], event_id: str | None = None) -> bytes:
    """One `event: message` SSE frame, as the SDK writes them."""
    data = json.dumps(message, separators=(",", ":"))
    head = f"id: {event_id}\r\n" if event_id else ""
    return f"{head}event: message\r\ndata: {data}\r\n\r\n".encode()


@dataclass(eq=False)
class Watch:
    """One open stream's link to the hub: woken when its session's log grows."""

    sid: str
    kind: str  # "get" | "listen"
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False  # the session ended: finish the stream gracefully
    # Events the publishes carried, with the id before each (written at once if they follow on
    # from the stream's cursor), and whether a wake-up needs a read of the log.
    live: deque[tuple[str, Event]] = field(default_factory=deque)
    read: bool = False


@dataclass(frozen=True)
class Listen:
    """What a listen stream needs to write (and resume) itself."""

    token: str
    sid: str
    request_id: Any
    honored: SubscriptionFilter
    # The `data:` line of each change kind this stream writes, by (method, uri): a frame of the
    # SDK's vocabulary depends only on them and the subscription id, so its models are built and
    # dumped once per stream, not per event (about 85 µs a frame on the development machine).
    _data: dict[tuple[str, str | None], str | None] = field(default_factory=dict, compare=False, repr=False)

    @property
    def meta(self) -> dict[str, Any]:
        return {SUBSCRIPTION_ID_META_KEY: self.request_id}

    def to_json(self) -> str:
        honored = self.honored.model_dump(by_alias=True, exclude_none=True, mode="json")
        return json.dumps({"sid": self.sid, "id": self.request_id, "filter": honored})

    @classmethod
    def from_json(cls, token: str, text: str) -> Listen:
        data = json.loads(text)
        return cls(token, str(data["sid"]), data["id"], SubscriptionFilter.model_validate(data["filter"]))

    def frame(self, ev: Event) -> bytes | None:
        """The event as this subscription's frame, or None if the client did not ask for it.

        The change vocabulary is the SDK's (mcp.shared.subscriptions), matched the same way:
        a list change if its flag was honoured, a resource update if its URI was subscribed.
        """
        event_id = f"{self.token}.{ev.id}"
        if ev.method in _LIST_CHANGED or ev.method == UPDATED:
            uri = (ev.params or {}).get("uri") if ev.method == UPDATED else None
            key = (ev.method, uri if isinstance(uri, str) else None)
            if key in self._data:
                data = self._data[key]
            else:
                data = self._change_data(ev.method, key[1])
                if len(self._data) < LISTEN_FRAME_CACHE:
                    self._data[key] = data
            return (
                None if data is None else f"id: {event_id}\r\nevent: message\r\ndata: {data}\r\n\r\n".encode()
            )
        if (self.honored.model_extra or {}).get(EXAI_EVENTS_FILTER) is not True:
            return None
        params = {**(ev.params or {}), "_meta": {**((ev.params or {}).get("_meta") or {}), **self.meta}}
        return sse_frame({**ev.message, "params": params}, event_id)

    def _change_data(self, method: str, uri: str | None) -> str | None:
        """The JSON of a change notification as this stream writes it (None: not asked for)."""
        flag = _LIST_CHANGED.get(method)
        if flag is not None:
            if getattr(self.honored, flag) is not True:
                return None
            note: Any = _LIST_CHANGED_MODELS[method](params=NotificationParams(_meta=self.meta))
        else:
            if uri is None or uri not in (self.honored.resource_subscriptions or ()):
                return None
            note = ResourceUpdatedNotification(
                params=ResourceUpdatedNotificationParams(uri=uri, _meta=self.meta)
            )
        body = note.model_dump(by_alias=True, mode="json", exclude_none=True)
        return json.dumps({"jsonrpc": "2.0", **body}, separators=(",", ":"))

    def ack(self, cursor: str) -> bytes:
        params = SubscriptionsAcknowledgedNotificationParams(notifications=self.honored, _meta=self.meta)
        note = SubscriptionsAcknowledgedNotification(params=params)
        body = note.model_dump(by_alias=True, mode="json", exclude_none=True)
        return sse_frame({"jsonrpc": "2.0", **body}, f"{self.token}.{cursor}")

    def result(self) -> bytes:
        result = SubscriptionsListenResult(_meta=self.meta).model_dump(
            by_alias=True, mode="json", exclude_none=True
        )
        return sse_frame({"jsonrpc": "2.0", "id": self.request_id, "result": result})


def honored_subset(requested: SubscriptionFilter) -> SubscriptionFilter:
    """Every requested kind is honoured (as the SDK does); falsy flags are dropped, not echoed."""
    extra: dict[str, Any] = {}
    if (requested.model_extra or {}).get(EXAI_EVENTS_FILTER) is True:
        extra[EXAI_EVENTS_FILTER] = True
    return SubscriptionFilter(
        tools_list_changed=True if requested.tools_list_changed else None,
        prompts_list_changed=True if requested.prompts_list_changed else None,
        resources_list_changed=True if requested.resources_list_changed else None,
        resource_subscriptions=list(requested.resource_subscriptions)
        if requested.resource_subscriptions
        else None,
        **extra,
    )


class StreamMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.delivered = Counter(
            "exai_router_notify_events_delivered_total", "Events written to streams, by kind."
        )
        self.catchups = Counter(
            "exai_router_notify_catchups_total", "Streams resumed with Last-Event-ID, by kind."
        )
        self.catchup_events = Counter(
            "exai_router_notify_catchup_events_total", "Events replayed from the log to resumed streams."
        )
        self.truncated = Counter(
            "exai_router_notify_catchup_truncated_total",
            "Resumes whose Last-Event-ID was older than the log still holds (EXAI_NOTIFY_LOG_MAXLEN).",
        )
        self.refused = Counter(
            "exai_router_notify_streams_refused_total", "Streams refused: EXAI_STREAMS_PER_SESSION reached."
        )
        self.reconnects = Counter(
            "exai_router_notify_pubsub_reconnects_total",
            "Times the pub/sub connection to Redis was re-opened.",
        )
        for m in (
            self.delivered,
            self.catchups,
            self.catchup_events,
            self.truncated,
            self.refused,
            self.reconnects,
        ):
            metrics.add(m)


class Hub:
    """Every notification stream this router holds, fed by one Redis pub/sub connection."""

    def __init__(
        self,
        *,
        redis: Redis,
        keys: Keys,
        events: EventLog,
        table: SessionTable,
        metrics: Metrics,
        keepalive: float,
        per_session: int,
        retry_ms: int,
        session_ttl: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.events = events
        self.table = table
        self.keepalive = keepalive
        self.per_session = per_session
        self.retry_ms = retry_ms
        self.session_ttl = max(1, int(session_ttl))
        self.stats = StreamMetrics(metrics)
        self.watchers: dict[str, set[Watch]] = {}
        self.connected = False
        self.closing = False
        self._pubsub: PubSub | PubSubLine | None = None
        self._confirm: dict[str, asyncio.Future[None]] = {}
        self._channels: set[str] = set()  # session channels asked for on the current connection
        self._resync = False
        self._creating: dict[str, asyncio.Lock] = {}
        self._prefix = keys.session_channel("")
        self._hub_channel = keys.fleet_channel()
        metrics.gauge(
            "exai_router_notify_streams", "Notification streams open on this router, by kind.", self._open
        )
        metrics.gauge(
            "exai_router_notify_pubsub_up", "1 while the router's pub/sub connection to Redis is up.",
            lambda: {(): 1.0 if self.connected else 0.0},
        )  # fmt: skip

    def _open(self) -> dict[Labels, float]:
        out: dict[Labels, float] = {(("kind", "get"),): 0.0, (("kind", "listen"),): 0.0}
        for watches in self.watchers.values():
            for w in watches:
                out[(("kind", w.kind),)] += 1
        return out

    def streams_of(self, sid: str) -> int:
        return len(self.watchers.get(sid, ()))

    # --- pub/sub ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Keep the pub/sub connection up for as long as the router runs.

        Over plain TCP the connection is a `PubSubLine` (common/redis_line.py): each message is
        handed to `_on_message` from the connection's read callback, so a woken stream's task is
        the only hop between Redis and the stream's write. Otherwise (TLS, a Unix socket),
        redis-py's PubSub, read here."""
        backoff = 0.1
        first = True
        direct = PubSubLine.usable(self.redis)
        while True:
            line = PubSubLine(self.redis, self._on_message) if direct else None
            pubsub = self.redis.pubsub() if line is None else None
            try:
                # The hub's own channel last: once it is confirmed, every channel before it is live.
                self._channels = {self.keys.session_channel(sid) for sid in self.watchers}
                self._resync = False
                if line is not None:
                    await line.open()
                    self._pubsub = line
                    await line.subscribe(*self._channels, self._hub_channel)
                else:
                    assert pubsub is not None
                    await pubsub.subscribe(*self._channels, self._hub_channel)
                    self._pubsub = pubsub
                if not first:
                    self.stats.reconnects.inc()
                first = False
                while True:
                    if line is not None:
                        if await line.wait_lost(POLL):
                            raise RedisConnectionError("the pub/sub connection to Redis closed")
                        if self.connected:
                            backoff = 0.1
                    else:
                        assert pubsub is not None
                        msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=POLL)
                        if msg is not None:
                            self._on_message(msg)
                            backoff = 0.1
                    if self._resync and self.connected:
                        # Streams that opened while we were (re)connecting: subscribe them now;
                        # each confirmation wakes its streams to read what they missed.
                        self._resync = False
                        missing = {self.keys.session_channel(sid) for sid in self.watchers} - self._channels
                        if missing:
                            self._channels |= missing
                            await self._pubsub.subscribe(*missing)
            except asyncio.CancelledError:
                raise
            except REDIS_DOWN_ERRORS as exc:  # (TimeoutError is an OSError)
                if self.connected:
                    log.warning("pub/sub connection to Redis lost (%s); streams stay open, reconnecting", exc)
            except Exception:
                log.exception("pub/sub listener failed; reconnecting")
            finally:
                self._pubsub = None
                self.connected = False
                for fut in self._confirm.values():
                    if not fut.done():
                        fut.set_result(None)
                self._confirm.clear()
                with contextlib.suppress(Exception):
                    await (line or pubsub).aclose()  # type: ignore[union-attr,no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _on_message(self, msg: dict[str, Any]) -> None:
        channel = str(msg.get("channel", ""))
        kind = msg.get("type")
        if kind == "subscribe":
            fut = self._confirm.pop(channel, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            if channel == self._hub_channel:
                if not self.connected:
                    log.info("pub/sub connected; %d sessions with open streams catch up", len(self.watchers))
                self.connected = True
                self._resync = True
                self._wake_all()  # whatever was published while we were away is in the logs
            elif channel.startswith(self._prefix):
                self._wake(channel[len(self._prefix) :], ended=False)
            return
        if kind != "message" or not channel.startswith(self._prefix):
            return
        data = msg.get("data")
        sid = channel[len(self._prefix) :]
        if data == END:
            self._wake(sid, ended=True)
        else:
            self._wake(sid, ended=False, event=carried(str(data)) if data else None)

    def _wake(self, sid: str, *, ended: bool, event: tuple[str, Event] | None = None) -> None:
        for w in self.watchers.get(sid, ()):
            w.ended = w.ended or ended
            if event is not None and len(w.live) < LIVE_MAX:
                w.live.append(event)
            else:
                w.read = True
            w.wake.set()

    def _wake_all(self) -> None:
        for watches in self.watchers.values():
            for w in watches:
                w.read = True
                w.wake.set()

    async def _subscribe(self, sid: str) -> None:
        """Subscribe to the session's channel and wait until Redis confirms it (bounded)."""
        pubsub = self._pubsub
        if pubsub is None or not self.connected:
            self._resync = True  # run() subscribes it once connected (and that wakes the stream)
            return
        channel = self.keys.session_channel(sid)
        fut = self._confirm.get(channel)
        if fut is None:
            fut = self._confirm[channel] = asyncio.get_running_loop().create_future()
            self._channels.add(channel)
            try:
                await pubsub.subscribe(channel)
            except REDIS_DOWN_ERRORS:
                return  # the listener notices, reconnects and resubscribes
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(fut), SUBSCRIBE_WAIT)

    async def _unsubscribe(self, sid: str) -> None:
        pubsub = self._pubsub
        channel = self.keys.session_channel(sid)
        self._channels.discard(channel)
        if pubsub is not None and self.connected:
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await pubsub.unsubscribe(channel)

    @contextlib.asynccontextmanager
    async def watch(self, sid: str, kind: str) -> AsyncIterator[Watch]:
        """Register a stream for `sid` (refusing one over the cap) and subscribe before it reads."""
        if self.streams_of(sid) >= self.per_session:
            self.stats.refused.inc(kind=kind)
            raise TooManyStreams(
                f"This session already has {self.per_session} notification streams open on this router."
            )
        w = Watch(sid, kind)
        self.watchers.setdefault(sid, set()).add(w)
        try:
            if len(self.watchers[sid]) == 1:
                await self._subscribe(sid)
            yield w
        finally:
            watches = self.watchers.get(sid)
            if watches is not None:
                watches.discard(w)
                if not watches:
                    del self.watchers[sid]
                    await asyncio.shield(self._unsubscribe(sid))

    # --- writing a stream ------------------------------------------------------------------
    async def _start(self, request: web.Request, headers: dict[str, str] | None = None) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **(headers or {})})
        await resp.prepare(request)
        if self.retry_ms:
            await resp.write(f"retry: {self.retry_ms}\r\n\r\n".encode())
        return resp

    async def _cursor(self, sid: str, last_event_id: str | None, kind: str) -> tuple[str, bool]:
        """Where a stream starts: after Last-Event-ID (a resume), else after the newest event."""
        if last_event_id is not None and parse_id(last_event_id) is not None:
            self.stats.catchups.inc(kind=kind)
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                if await self.events.trimmed_after(sid, last_event_id):
                    self.stats.truncated.inc(kind=kind)
                    log.warning(
                        "session %s resumed after %s: older events were trimmed", sid[:8], last_event_id
                    )
            return last_event_id, True
        try:
            return await self.events.tail(sid), False
        except REDIS_DOWN_ERRORS:
            # Redis is away: start from now by the stream-id clock (ids are milliseconds).
            return f"{int(time.time() * 1000)}-0", False

    async def _pump(
        self,
        resp: web.StreamResponse,
        w: Watch,
        cursor: str,
        frame: Callable[[Event], bytes | None],
        *,
        catching_up: bool,
    ) -> None:
        """Write the session's events after `cursor` until the session ends or the hub closes.

        A client that goes away surfaces as a ConnectionError from a write (or as the
        handler's cancellation); either way the caller's `watch` unregisters the stream.
        """
        loop = asyncio.get_running_loop()
        pending = True
        retry = 0.1
        next_ping = loop.time() + self.keepalive
        while not (w.ended or self.closing):
            if w.wake.is_set():
                w.wake.clear()
                # The events the publishes carried that follow on from the cursor are written
                # as they are; a gap, an overflow or a bare wake-up reads the log instead.
                while w.live and not w.read and w.live[0][0] == cursor:
                    ev = w.live.popleft()[1]
                    if (data := frame(ev)) is not None:
                        await resp.write(data)
                        self.stats.delivered.inc(kind=w.kind)
                        next_ping = loop.time() + self.keepalive
                    cursor = ev.id
                while w.live and not newer(w.live[0][1].id, cursor):
                    w.live.popleft()  # written already (read from the log)
                if w.live or w.read:
                    w.read = False
                    w.live.clear()  # the read below covers them
                    pending = True
            wait = self.keepalive
            if pending:
                try:
                    batch = await self.events.after(w.sid, cursor, count=BATCH)
                except REDIS_DOWN_ERRORS:
                    wait, retry = retry, min(retry * 2, self.keepalive)
                else:
                    retry = 0.1
                    for ev in batch:
                        data = frame(ev)
                        if data is not None:
                            await resp.write(data)
                            self.stats.delivered.inc(kind=w.kind)
                            if catching_up:
                                self.stats.catchup_events.inc(kind=w.kind)
                            next_ping = loop.time() + self.keepalive
                        cursor = ev.id
                    pending = len(batch) == BATCH
                    catching_up = catching_up and pending
                    if pending:
                        continue
            wait = min(wait, max(0.0, next_ping - loop.time()))
            if not w.wake.is_set():
                # A timeout scope, not wait_for: on Python 3.11 wait_for runs the wait in a task
                # of its own, and a wake-up then takes three loop turns to reach this one.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await w.wake.wait()
            if loop.time() >= next_ping:
                await resp.write(KEEPALIVE_FRAME)
                next_ping = loop.time() + self.keepalive
        if w.ended:
            # Deliver what the session published before it ended (its log outlives it briefly).
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                for ev in await self.events.after(w.sid, cursor, count=BATCH):
                    if (data := frame(ev)) is not None:
                        await resp.write(data)
                        self.stats.delivered.inc(kind=w.kind)

    # --- handshake era: GET /mcp -----------------------------------------------------------
    async def serve_get(self, request: web.Request, sess: Session) -> web.StreamResponse:
        """The session's standalone SSE stream, served here; no instance is involved."""
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return error_response(
                BadRequest("Not Acceptable: Client must accept text/event-stream."), status=406
            )
        async with self.watch(sess.id, "get") as w:
            cursor, resumed = await self._cursor(sess.id, request.headers.get(p.LAST_EVENT_ID), "get")
            resp = await self._start(request, {p.MCP_SESSION_ID: sess.id})
            with contextlib.suppress(ConnectionError):
                await self._pump(
                    resp, w, cursor, lambda ev: sse_frame(ev.message, ev.id), catching_up=resumed
                )
                if w.ended:
                    await resp.write_eof()
            return resp

    # --- 2026-07-28: subscriptions/listen --------------------------------------------------
    async def serve_listen(
        self, request: web.Request, principal: str, key: str, client: str, msg: Message
    ) -> web.StreamResponse:
        """Answer a `subscriptions/listen` request with a stream held here (no instance)."""
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return web.Response(status=406)  # a listen answer is always a stream (as in the SDK)
        if msg.id is None:
            raise BadRequest("subscriptions/listen requires a request id.")
        try:
            requested = SubscriptionFilter.model_validate((msg.params or {}).get("notifications") or {})
        except ValidationError as exc:
            raise InvalidArgument(f"Invalid subscriptions/listen filter: {exc.errors()[0]['msg']}.") from None
        sess = await self.stateless_session(request, principal, key, client)
        listen = Listen(secrets.token_urlsafe(16), sess.id, msg.id, honored_subset(requested))
        async with self.watch(sess.id, "listen") as w:
            cursor, _ = await self._cursor(sess.id, None, "listen")
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self.redis.set(self.keys.listen(listen.token), listen.to_json(), ex=self.session_ttl)
            resp = await self._start(request)
            with contextlib.suppress(ConnectionError):
                await resp.write(listen.ack(cursor))
                await self._listen_pump(resp, w, listen, cursor, catching_up=False)
            return resp

    async def _listen_pump(
        self, resp: web.StreamResponse, w: Watch, listen: Listen, cursor: str, *, catching_up: bool
    ) -> None:
        await self._pump(resp, w, cursor, listen.frame, catching_up=catching_up)
        if w.ended:  # the spec's graceful close: the listen request's result ends the stream
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                await self.redis.delete(self.keys.listen(listen.token))
            await resp.write(listen.result())
            await resp.write_eof()

    def listen_resume(self, request: web.Request) -> tuple[str, str] | None:
        """(token, cursor) if this GET resumes one of our listen streams (SDK auto-reconnect)."""
        last = request.headers.get(p.LAST_EVENT_ID) or ""
        token, dot, cursor = last.rpartition(".")
        if not dot or not token or parse_id(cursor) is None:
            return None
        return token, cursor

    async def resume_listen(
        self, request: web.Request, principal: str, token: str, cursor: str
    ) -> web.StreamResponse:
        """Continue a listen stream after a drop: every event after `cursor`, then live ones."""
        text = await self.redis.get(self.keys.listen(token))
        if not text:
            raise SessionNotFound("That subscription has ended or expired; send subscriptions/listen again.")
        listen = Listen.from_json(token, str(text))
        sess = await self.table.fetch(listen.sid)
        if sess is None or sess.ended or sess.principal != principal:
            raise SessionNotFound("That subscription's session has ended; send subscriptions/listen again.")
        async with self.watch(sess.id, "listen") as w:
            self.stats.catchups.inc(kind="listen")
            with contextlib.suppress(*REDIS_DOWN_ERRORS):
                if await self.events.trimmed_after(sess.id, cursor):
                    self.stats.truncated.inc(kind="listen")
            resp = await self._start(request)
            with contextlib.suppress(ConnectionError):
                await self._listen_pump(resp, w, listen, cursor, catching_up=True)
            return resp

    async def stateless_session(self, request: web.Request, principal: str, key: str, client: str) -> Session:
        """The 2026-07-28 session a listen belongs to; a new one is opened without an instance
        (its first call binds one, as after a failover)."""
        sess = await self.table.fetch_by_key(key)
        if sess is not None and not sess.ended:
            return sess
        lock = self._creating.setdefault(key, asyncio.Lock())
        async with lock:
            try:
                sess = await self.table.fetch_by_key(key)
                if sess is not None and not sess.ended:
                    return sess
                sess = Session(
                    id=new_session_id(), era="stateless", principal=principal, client=client, key=key,
                    client_addr=request.remote or "",
                )  # fmt: skip
                winner = await self.table.claim_key(key, sess.id)
                if winner != sess.id:
                    other = await self.table.fetch(winner)
                    if other is None:
                        raise SessionNotFound("Session is being opened elsewhere; retry.")
                    return other
                await self.table.save(sess)
                return sess
            finally:
                if self._creating.get(key) is lock and not getattr(lock, "_waiters", None):
                    del self._creating[key]

    # --- session end, shutdown -------------------------------------------------------------
    async def session_ended(self, sid: str) -> None:
        """Close the session's streams here and on every other router; drop its log."""
        for w in self.watchers.get(sid, ()):
            w.ended = True
            w.wake.set()
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await self.events.end(sid)

    async def keep_sessions(self) -> None:
        """A session with a stream open here is in use: keep it from expiring while it listens
        (touched at most once per half expiry period, so parking is not held up)."""
        cutoff = time.time() - self.session_ttl / 2
        for sid in list(self.watchers):
            sess = self.table.by_id.get(sid)
            if sess is not None and not sess.ended and sess.last_seen < cutoff:
                self.table.touch(sess)

    async def close(self) -> None:
        """Router shutdown: drop every stream at once, without a graceful end, so that clients
        reconnect (with Last-Event-ID) to the next router rather than give up."""
        self.closing = True
        self._wake_all()
