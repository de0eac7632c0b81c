"""The session table: the router's memory as the fast path, Redis as the record.

A session outlives its instance: a parked session has no instance (`instance_id` is "") and
keeps everything else, so its next request binds it anywhere (router/binding.py). The
record's Redis keys expire after EXAI_SESSION_IDLE_TIMEOUT without requests, even if no
router is left to sweep them.

Structural changes (create, rebind, end) are written through to Redis before the client sees
their effect, so a restarted router (or a second one) finds every session. Per-request
bookkeeping (last seen, counters) stays in memory and is flushed in the background, keeping
Redis off the proxy path.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from common.keys import Keys
from common.protocol import Era


def new_session_id() -> str:
    """192 random bits, URL-safe, visible ASCII (a valid Mcp-Session-Id)."""
    return secrets.token_urlsafe(24)


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

    _FIELDS = (
        "id", "era", "principal", "client", "key", "instance_id", "upstream_sid", "init_body",
        "protocol_version", "client_addr", "created", "last_seen", "total", "generation",
        "fence", "parked_at", "parks", "resumes",
    )  # fmt: skip

    @property
    def state(self) -> str:
        """working (a request in flight), idle (bound, nothing in flight) or parked."""
        if self.inflight:
            return "working"
        return "idle" if self.instance_id else "parked"

    def to_hash(self) -> dict[str, str]:
        return {f: str(getattr(self, f)) for f in self._FIELDS}

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


class SessionTable:
    def __init__(self, redis: Redis, keys: Keys, expire_after: float = 7 * 86400.0) -> None:
        self.redis = redis
        self.keys = keys
        self.expire_ms = int(expire_after * 1000)
        self.by_id: dict[str, Session] = {}
        self.by_key: dict[str, Session] = {}
        self._dirty: set[str] = set()
        self._removing: set[str] = set()  # ended here, record not yet deleted from Redis

    async def load(self) -> int:
        """Pull every session from Redis into memory (router start)."""
        ids = await self.redis.zrange(self.keys.sessions(), 0, -1)
        for sid in ids:
            await self.fetch(str(sid))
        return len(self.by_id)

    async def fetch(self, sid: str) -> Session | None:
        """Memory first, then Redis (another router may have created it)."""
        sess = self.by_id.get(sid)
        if sess is not None:
            return sess
        if sid in self._removing:
            return None
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

    async def save(self, sess: Session) -> None:
        """Write the whole record through to Redis."""
        self.by_id[sess.id] = sess
        if sess.key:
            self.by_key[sess.key] = sess
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.session(sess.id), mapping=sess.to_hash())  # type: ignore[arg-type]
            pipe.pexpire(self.keys.session(sess.id), self.expire_ms)
            pipe.zadd(self.keys.sessions(), {sess.id: sess.last_seen})
            if sess.key:
                pipe.set(self.keys.session_key(sess.key), sess.id, px=self.expire_ms)
            await pipe.execute()

    async def claim_key(self, key: str, sid: str) -> str:
        """Bind a stateless key to `sid` unless another router did first; returns the winner."""
        if await self.redis.set(self.keys.session_key(key), sid, nx=True):
            return sid
        return str(await self.redis.get(self.keys.session_key(key)) or sid)

    def touch(self, sess: Session) -> None:
        sess.last_seen = time.time()
        self._dirty.add(sess.id)

    async def flush(self) -> None:
        """Persist last-seen times and counters of sessions used since the last flush."""
        dirty, self._dirty = self._dirty, set()
        live = [s for sid in dirty if (s := self.by_id.get(sid)) is not None and not s.ended]
        if not live:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for s in live:
                fields = {"last_seen": str(s.last_seen), "total": str(s.total)}
                pipe.hset(self.keys.session(s.id), mapping=fields)  # type: ignore[arg-type]
                pipe.pexpire(self.keys.session(s.id), self.expire_ms)
                if s.key:
                    pipe.pexpire(self.keys.session_key(s.key), self.expire_ms)
                pipe.zadd(self.keys.sessions(), {s.id: s.last_seen}, xx=True)
            await pipe.execute()

    async def remove(self, sess: Session) -> None:
        sess.ended = True
        self._removing.add(sess.id)
        self.by_id.pop(sess.id, None)
        if sess.key and self.by_key.get(sess.key) is sess:
            del self.by_key[sess.key]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.session(sess.id))
            pipe.zrem(self.keys.sessions(), sess.id)
            await pipe.execute()
        if sess.key:
            # Only drop the key mapping if it still points at this session.
            current = await self.redis.get(self.keys.session_key(sess.key))
            if current == sess.id:
                await self.redis.delete(self.keys.session_key(sess.key))
        self._removing.discard(sess.id)

    async def idle_ids(self, older_than: float) -> list[str]:
        return [str(s) for s in await self.redis.zrangebyscore(self.keys.sessions(), "-inf", older_than)]
