"""The session table: the router's memory as the fast path, Redis as the record.

A session outlives its instance: a parked session has no instance (`instance_id` is "") and
keeps everything else, so its next request binds it anywhere (router/binding.py). The
record's Redis keys expire after EXAI_SESSION_IDLE_TIMEOUT without requests, even if no
router is left to sweep them.

Structural changes (create, rebind, end) are written through to Redis before the client sees
their effect (a new 2026-07-28 session, and a rebind without an initialize to replay, in one
round trip with the instance's lease: router/opening.py), so a restarted router (or a second
one) finds every session. Per-request bookkeeping (last seen, counters) stays in memory and
is flushed in the background, keeping Redis off the proxy path.

Several routers share the table, and Redis is the truth: every structural write bumps the
record's `ver`, and every change of an existing record is announced on the sessions channel,
so the other routers re-read (or drop) their cached copy (a new record is not announced: no
router caches a session before its record exists); since pub/sub can miss, the flush and the
lease renewal rounds (router/app.py) compare versions too. Writes never re-create a record
another router deleted: an update (`save(create=False)`) and a counter flush only apply while
the record exists, in one script each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis.asyncio import Redis

from common.keys import Keys
from common.protocol import Era
from common.redis import REDIS_DOWN_ERRORS

log = logging.getLogger(__name__)


def new_session_id() -> str:
    """About 192 random bits, URL-safe, visible ASCII (a valid Mcp-Session-Id).

    Never starts with "-": people paste session ids into `exai sessions end ID` and
    `exai links add GROUP ID`, where a leading dash reads as an option.
    """
    sid = secrets.token_urlsafe(24)
    return sid if sid[0] != "-" else "_" + sid[1:]


@dataclass(eq=False)
class Session:
    id: str
    era: Era
    principal: str
    client: str = ""
    key: str = ""  # stateless-era session key ("" for handshake sessions)
    instance_id: str = ""
    upstream_sid: str = ""  # the instance's own Mcp-Session-Id (handshake era)
    init_body: str = ""  # the client's initialize request, replayed on another instance
    protocol_version: str = ""
    client_addr: str = ""
    created: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    total: int = 0
    inflight: int = 0  # requests in flight (POST/DELETE: work); GET streams are not work
    generation: int = 0  # bumped on every rebind so concurrent failures rebind once
    fence: int = 0  # fencing token of the current lease (router/leases.py)
    parked_at: float = 0.0  # when the session last gave its instance back (0: never)
    parks: int = 0
    resumes: int = 0
    calls: dict[int, Call] = field(default_factory=dict, repr=False)  # in flight on this router
    routed_here: bool = False  # this router has proxied a request of it since it loaded it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    ended: bool = False
    ver: int = 0  # the record's version in Redis as this router last saw it
    stored: bool = False  # the record exists in Redis (loaded from it, or saved by this router)
    flushed_total: int = 0  # the part of `total` already counted in Redis

    _FIELDS = (
        "id", "era", "principal", "client", "key", "instance_id", "upstream_sid", "init_body",
        "protocol_version", "client_addr", "created", "last_seen", "total", "generation",
        "fence", "parked_at", "parks", "resumes",
    )  # fmt: skip
    # What a structural write sets; last_seen and total are merged (max, sum) instead.
    _STRUCTURAL = (
        "id", "era", "principal", "client", "key", "instance_id", "upstream_sid", "init_body",
        "protocol_version", "client_addr", "created", "generation", "fence", "parked_at", "parks",
        "resumes",
    )  # fmt: skip
    # What a re-read from Redis updates in a cached copy (the rest cannot change).
    _MUTABLE = ("instance_id", "upstream_sid", "protocol_version", "generation", "fence", "parked_at",
                "parks", "resumes")  # fmt: skip

    @property
    def state(self) -> str:
        """working (a request in flight), idle (bound, nothing in flight) or parked."""
        if self.inflight:
            return "working"
        return "idle" if self.instance_id else "parked"

    def to_hash(self) -> dict[str, str]:
        return {f: str(getattr(self, f)) for f in self._FIELDS}

    def structural(self, **changes: Any) -> list[str]:
        """The structural fields as a flat field/value list; `changes` override values."""
        values = {f: getattr(self, f) for f in self._STRUCTURAL} | changes
        return [x for f in self._STRUCTURAL for x in (f, str(values[f]))]

    def update_from(self, other: Session) -> None:
        """Take the record's view of what another router may have changed."""
        for f in self._MUTABLE:
            setattr(self, f, getattr(other, f))
        self.ver = other.ver
        if other.last_seen > self.last_seen:
            self.last_seen = other.last_seen
            self.routed_here = False  # served elsewhere since: only Redis knows when it was last used
        self.total = other.total + (self.total - self.flushed_total)
        self.flushed_total = other.total

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> Session:
        return cls(
            id=data["id"],
            era="stateless" if data.get("era") == "stateless" else "handshake",
            principal=data.get("principal", ""),
            client=data.get("client", ""),
            key=data.get("key", ""),
            instance_id=data.get("instance_id", ""),
            upstream_sid=data.get("upstream_sid", ""),
            init_body=data.get("init_body", ""),
            protocol_version=data.get("protocol_version", ""),
            client_addr=data.get("client_addr", ""),
            created=float(data.get("created") or 0),
            last_seen=float(data.get("last_seen") or 0),
            total=int(data.get("total") or 0),
            generation=int(data.get("generation") or 0),
            fence=int(data.get("fence") or 0),
            parked_at=float(data.get("parked_at") or 0),
            parks=int(data.get("parks") or 0),
            resumes=int(data.get("resumes") or 0),
            ver=int(data.get("ver") or 0),
            stored=True,
            flushed_total=int(data.get("total") or 0),
        )

    def public(self) -> dict[str, Any]:
        """The admin API's view (no replay body, no upstream id)."""
        return {
            "id": self.id,
            "instance": self.instance_id or None,
            "client": self.client or None,
            "principal": self.principal,
            "era": self.era,
            "key": self.key or None,
            "created": self.created,
            "last_seen": self.last_seen,
            "inflight": self.inflight,
            "total": self.total,
            "state": self.state,
            "parked_at": self.parked_at or None,
            "parks": self.parks,
            "resumes": self.resumes,
        }


@dataclass(eq=False)
class Call:
    """A request in flight, so that a scale-down can say which calls it cut, and cut them."""

    method: str
    name: str  # the tool's name for tools/call, else ""
    task: asyncio.Task[Any] | None
    started: float = field(default_factory=time.monotonic)
    response: Any = None  # the client's StreamResponse once its headers went out
    cut: bool = False

    def describe(self) -> str:
        return f"{self.method} {self.name}".strip()


# A structural write. KEYS: record, sessions zset, channel [, stateless key mapping]. ARGV:
# create ("1"/"0"), expiry ms, last_seen, session id, total, router id, the binding the record
# must still name ('' for no check, else '=' and its `binding_of`), then field/value pairs.
# The record's `router` becomes this router (router/routers.py: the one that served it last).
# Returns the new version, -1 when the record is gone and this is not a create (another
# router ended the session), or -2 when it names another binding than expected (another router
# moved, resumed or parked the session meanwhile; nothing written). Only a change is
# announced: no other router caches a new record.
FLUSH_SECONDS = 1.0
"""How often a router writes the last-seen times of the sessions it served into their records
(`SessionTable.flush`, router/app.py): another router sees a call that much later at most."""


def binding_of(instance_id: str, fence: int) -> str:
    """A binding as the record scripts compare it with the record's (the save's `expect`, the
    opening's `found`): '' when parked. The fence is part of it: a session resumed on the
    instance it had before has a new one."""
    return f"{instance_id}:{fence}" if instance_id else ""


_SAVE = """
local exists = redis.call('exists', KEYS[1]) == 1
if not exists and ARGV[1] ~= '1' then return -1 end
if exists and ARGV[7] ~= '' then
  local row = redis.call('hmget', KEYS[1], 'instance_id', 'fence')
  local bound = row[1] or ''
  if bound ~= '' then bound = bound .. ':' .. (row[2] or '0') end
  if '=' .. bound ~= ARGV[7] then return -2 end
end
if not exists then redis.call('hset', KEYS[1], 'total', ARGV[5], 'last_seen', ARGV[3]) end
redis.call('hset', KEYS[1], 'router', ARGV[6], unpack(ARGV, 8))
local seen = redis.call('hget', KEYS[1], 'last_seen')
if tonumber(ARGV[3]) > tonumber(seen or '0') then
  redis.call('hset', KEYS[1], 'last_seen', ARGV[3])
  seen = ARGV[3]
end
local ver = redis.call('hincrby', KEYS[1], 'ver', 1)
redis.call('pexpire', KEYS[1], ARGV[2])
redis.call('zadd', KEYS[2], seen, ARGV[4])
if #KEYS > 3 then redis.call('set', KEYS[4], ARGV[4], 'PX', ARGV[2]) end
if exists then redis.call('publish', KEYS[3], ARGV[4] .. ' ' .. ver .. ' ' .. ARGV[6]) end
return ver
"""

# A counter flush. KEYS: record, sessions zset [, stateless key mapping]. ARGV: last_seen,
# total delta, expiry ms, session id, router id (the record's `router`: it served the session).
# Returns {version, total, last_seen}, or {-1} if the record is gone: a flush never re-creates
# a session.
_FLUSH = """
if redis.call('exists', KEYS[1]) == 0 then return {-1} end
redis.call('hset', KEYS[1], 'router', ARGV[5])
local seen = redis.call('hget', KEYS[1], 'last_seen')
if tonumber(ARGV[1]) > tonumber(seen or '0') then
  redis.call('hset', KEYS[1], 'last_seen', ARGV[1])
  seen = ARGV[1]
end
local total = redis.call('hincrby', KEYS[1], 'total', ARGV[2])
redis.call('pexpire', KEYS[1], ARGV[3])
redis.call('zadd', KEYS[2], 'XX', seen, ARGV[4])
if #KEYS > 2 then redis.call('pexpire', KEYS[3], ARGV[3]) end
return {tonumber(redis.call('hget', KEYS[1], 'ver') or '0'), total, seen}
"""

# An end. KEYS: record, sessions zset, channel [, stateless key mapping, dropped only while it
# still names this session]. ARGV: session id, router id.
_REMOVE = """
redis.call('del', KEYS[1])
redis.call('zrem', KEYS[2], ARGV[1])
if #KEYS > 3 and redis.call('get', KEYS[4]) == ARGV[1] then redis.call('del', KEYS[4]) end
redis.call('publish', KEYS[3], ARGV[1] .. ' -1 ' .. ARGV[2])
return 1
"""


class SessionTable:
    def __init__(self, redis: Redis, keys: Keys, expire_after: float = 7 * 86400.0) -> None:
        self.redis = redis
        self.keys = keys
        self.expire_ms = int(expire_after * 1000)
        self.by_id: dict[str, Session] = {}
        self.by_key: dict[str, Session] = {}
        self._dirty: set[str] = set()
        self._removing: set[str] = set()  # ended here, record not yet deleted from Redis
        self.origin = secrets.token_hex(6)  # this router process, in change notices
        self.on_drop: list[Callable[[Session], None]] = []  # told when another router ended one
        self.on_pressure: list[Callable[[], None]] = []  # told when another router's session waits
        self._save = redis.register_script(_SAVE)
        self._flush = redis.register_script(_FLUSH)
        self._remove = redis.register_script(_REMOVE)
        self._refreshing: set[asyncio.Task[None]] = set()
        self._fetching: dict[str, asyncio.Future[Session | None]] = {}  # Redis reads in flight

    async def load(self) -> int:
        """Pull every session from Redis into memory (router start)."""
        ids = await self.redis.zrange(self.keys.sessions(), 0, -1)
        for sid in ids:
            await self.fetch(str(sid))
        return len(self.by_id)

    async def fetch(self, sid: str) -> Session | None:
        """Memory first, then Redis (another router may have created it). Concurrent fetches of
        one session share one Redis read: a client retrying a burst of calls, or a router taking
        over many sessions at once, costs one round trip per session, not one per call."""
        sess = self.by_id.get(sid)
        if sess is not None:
            return sess
        if sid in self._removing:
            return None
        pending = self._fetching.get(sid)
        if pending is None:
            pending = self._fetching[sid] = asyncio.ensure_future(self._fetch(sid))
            pending.add_done_callback(partial(self._fetched, sid))
        # shielded: one caller going away (its client disconnected) does not cancel the others' read
        return await asyncio.shield(pending)

    def _fetched(self, sid: str, done: asyncio.Future[Session | None]) -> None:
        if self._fetching.get(sid) is done:
            del self._fetching[sid]
        if not done.cancelled():
            done.exception()  # retrieved: every waiter may have gone before it came

    async def _fetch(self, sid: str) -> Session | None:
        data: dict[str, str] = await self.redis.hgetall(self.keys.session(sid))  # type: ignore[assignment]
        if not data or "id" not in data:
            return None
        sess = self.by_id.get(sid)  # a concurrent fetch may have won
        if sess is None:
            sess = Session.from_hash(data)
            self.by_id[sid] = sess
            if sess.key:
                self.by_key[sess.key] = sess
        return sess

    async def fetch_by_key(self, key: str) -> Session | None:
        sess = self.by_key.get(key)
        if sess is not None:
            return sess
        sid = await self.redis.get(self.keys.session_key(key))
        return await self.fetch(str(sid)) if sid else None

    def record_keys(self, sess: Session) -> list[str]:
        """A structural write's KEYS: record, sessions zset, channel [, stateless key mapping]."""
        keys = [self.keys.session(sess.id), self.keys.sessions(), self.keys.sessions_channel()]
        if sess.key:
            keys.append(self.keys.session_key(sess.key))
        return keys

    def adopt(self, sess: Session, ver: int) -> None:
        """`sess` was just written to Redis at version `ver` (router/opening.py): cache it."""
        self.by_id[sess.id] = sess
        if sess.key:
            self.by_key[sess.key] = sess
        sess.ver, sess.stored = ver, True

    async def save(
        self, sess: Session, *, create: bool = True, expect: tuple[str, int] | None = None
    ) -> bool:
        """Write the record (and a stateless session's key mapping) through to Redis in one
        round trip; False (and the session dropped here) when it is an update (`create=False`)
        of a record another router has deleted meanwhile. With `expect` (instance id, fence),
        only while the record still names that binding: False otherwise, with the record's
        view taken into `sess` (another router moved, resumed or parked it meanwhile)."""
        if sess.ended:
            return False
        self.by_id[sess.id] = sess
        if sess.key:
            self.by_key[sess.key] = sess
        args: list[str | int] = ["1" if create else "0", self.expire_ms, repr(sess.last_seen), sess.id]
        args += [sess.total, self.origin, "" if expect is None else "=" + binding_of(*expect)]
        ver = int(await self._save(keys=self.record_keys(sess), args=[*args, *sess.structural()]))
        if ver == -2:
            log.info("session %s was moved by another router meanwhile: not written", sess.id[:8])
            await self.refresh(sess)
            return False
        if ver < 0:
            log.info("session %s was ended by another router", sess.id[:8])
            self.drop(sess)
            return False
        sess.ver, sess.stored = ver, True
        return True

    async def claim_key(self, key: str, sid: str) -> str:
        """Bind a stateless key to `sid` unless another router did first; returns the winner."""
        name = self.keys.session_key(key)
        async with self.redis.pipeline(transaction=False) as pipe:  # one round trip either way
            pipe.set(name, sid, nx=True, px=self.expire_ms)
            pipe.get(name)
            claimed, winner = await pipe.execute()
        if claimed:
            return sid
        return str(winner or sid)

    def touch(self, sess: Session) -> None:
        sess.last_seen = time.time()
        self._dirty.add(sess.id)

    async def flush(self) -> None:
        """Persist last-seen times and counters of sessions used since the last flush.

        A session with a call in flight counts as seen now, so that other routers (which
        cannot see this router's calls) do not take it for idle."""
        now = time.time()
        for busy in self.by_id.values():
            if busy.inflight and not busy.ended:
                busy.last_seen = now
                self._dirty.add(busy.id)
        dirty, self._dirty = self._dirty, set()
        cached = [c for sid in dirty if (c := self.by_id.get(sid)) is not None and not c.ended]
        live = [c for c in cached if c.stored]
        self._dirty.update(c.id for c in cached if not c.stored)  # not saved yet: next round
        if not live:
            return
        sent = [s.total for s in live]
        async with self.redis.pipeline(transaction=False) as pipe:
            for s, total in zip(live, sent, strict=True):
                keys = [self.keys.session(s.id), self.keys.sessions()]
                if s.key:
                    keys.append(self.keys.session_key(s.key))
                args: list[str | int] = [repr(s.last_seen), total - s.flushed_total, self.expire_ms, s.id]
                await self._flush(keys=keys, args=[*args, self.origin], client=pipe)
            results = await pipe.execute()
        for s, total, res in zip(live, sent, results, strict=True):
            if int(res[0]) < 0:
                log.info("session %s was ended by another router", s.id[:8])
                self.drop(s)
                continue
            ver, stored_total, seen = int(res[0]), int(res[1]), float(res[2])
            s.total = stored_total + (s.total - total)
            s.flushed_total = stored_total
            if seen > s.last_seen:
                s.last_seen = seen
                s.routed_here = False
            if ver > s.ver:
                self.refresh_soon(s)

    async def remove(self, sess: Session) -> None:
        sess.ended = True
        self._removing.add(sess.id)
        self.by_id.pop(sess.id, None)
        if sess.key and self.by_key.get(sess.key) is sess:
            del self.by_key[sess.key]
        await self._remove(keys=self.record_keys(sess), args=[sess.id, self.origin])
        self._removing.discard(sess.id)

    async def idle_ids(self, older_than: float) -> list[str]:
        return [str(s) for s in await self.redis.zrangebyscore(self.keys.sessions(), "-inf", older_than)]

    # --- agreeing with the other routers ------------------------------------------------------
    def drop(self, sess: Session) -> None:
        """Forget a session another router ended (its record is gone from Redis)."""
        if sess.ended and self.by_id.get(sess.id) is not sess:
            return
        sess.ended = True
        if self.by_id.get(sess.id) is sess:
            del self.by_id[sess.id]
        if sess.key and self.by_key.get(sess.key) is sess:
            del self.by_key[sess.key]
        for hook in self.on_drop:
            hook(sess)

    async def refresh(self, sess: Session) -> bool:
        """Re-read the record of a cached session; False (and dropped) if it is gone."""
        data: dict[str, str] = await self.redis.hgetall(self.keys.session(sess.id))  # type: ignore[assignment]
        if sess.ended:
            return False
        if not data or "id" not in data:
            if sess.stored:
                self.drop(sess)
            return False
        fresh = Session.from_hash(data)
        if fresh.ver > sess.ver or not sess.stored:
            sess.update_from(fresh)
            sess.stored = True
        return True

    def refresh_soon(self, sess: Session) -> None:
        task = asyncio.create_task(self._refresh_quietly(sess))
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def _refresh_quietly(self, sess: Session) -> None:
        with contextlib.suppress(*REDIS_DOWN_ERRORS):
            await self.refresh(sess)

    async def versions(self, sessions: list[Session]) -> list[int]:
        """The records' versions in one round trip (-1: gone)."""
        if not sessions:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for s in sessions:
                pipe.hget(self.keys.session(s.id), "ver")
            values = await pipe.execute()
        return [int(v) if v is not None else -1 for v in values]

    def noticed(self, message: str) -> None:
        """A change notice from the sessions channel: "{sid} {ver} {router}"."""
        parts = message.split(" ")
        if len(parts) != 3 or parts[2] == self.origin:
            return
        sess = self.by_id.get(parts[0])
        if sess is None or sess.ended:
            return
        ver = int(parts[1])
        if ver < 0:
            self.drop(sess)
        elif ver > sess.ver:
            self.refresh_soon(sess)

    async def ask_for_instance(self) -> None:
        """Tell the other routers that a session here waits for an instance (`on_pressure`)."""
        await self.redis.publish(self.keys.pressure_channel(), self.origin)

    def pressed(self, origin: str) -> None:
        if origin == self.origin:
            return
        for hook in self.on_pressure:
            hook()

    async def watch(self) -> None:
        """Follow the sessions and pressure channels until cancelled (the renewal round covers
        the change notices it misses; a waiting router asks again)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        pressure = self.keys.pressure_channel()
        try:
            await pubsub.subscribe(self.keys.sessions_channel(), pressure)
            async for msg in pubsub.listen():
                if msg.get("type") == "message":
                    data, channel = msg["data"], msg["channel"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    if (channel.decode() if isinstance(channel, bytes) else str(channel)) == pressure:
                        self.pressed(text)
                    else:
                        self.noticed(text)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
