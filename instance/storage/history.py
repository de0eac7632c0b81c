"""Conversation threads: appends go to the spool (write-behind) and through to the Redis cache.

Where a thread's turns live, freshest first: this process's spool (not yet flushed), Redis
(the most recent `history_cache_turns` turns, written through on every append), Postgres (all
turns that were flushed, by any process). `load` merges them and dedupes by message id.

Cache correctness rule: the Redis list of a thread is trusted only if it was created empty by
`new_thread` and every later append extended it (the append script does nothing when the
thread's meta hash is missing, so a lost or expired cache never comes back partial). When an
append could not reach Redis, the thread's cache is dropped as soon as Redis returns; until
then this process reads that thread from Postgres. That alone is not enough: the process that
missed the appends may never call Redis again, and a Redis restored from its AOF brings back a
cache that claims to be whole. So every cache hit is checked against Postgres (one indexed
count of the turns the cache lacks); Postgres is the truth, the cache only saves the read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from common.errors import InvalidArgument, StorageUnavailable, ThreadNotFound
from common.keys import Keys
from instance.storage.cache import CacheDown, RedisGuard
from instance.storage.models import ROLES, Message
from instance.storage.pool import Database
from instance.storage.spool import Spool, SpoolEntry
from instance.storage.validation import (
    as_uuid,
    check_metadata,
    check_optional_int,
    check_text,
    new_id,
)
from instance.storage.writebehind import KIND_CONVERSATION, KIND_MESSAGE

log = logging.getLogger(__name__)

CACHE_TTL_MS = 7 * 24 * 3600 * 1000
CONTENT_MAX_CHARS = 4 * 1024 * 1024

# KEYS: list, meta. ARGV: message json, max turns, ttl ms. Extends only a cache that exists.
_APPEND_LUA = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('HINCRBY', KEYS[2], 'turns', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""

# KEYS: list, meta. ARGV: ttl ms, then field/value pairs. Creates the cache of a new thread once.
_CREATE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""


class _SeqClock:
    """Message order across processes: microseconds since the epoch, strictly increasing here."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        now = time.time_ns() // 1000
        self._last = now if now > self._last else self._last + 1
        return self._last


def _sort_dedupe(messages: list[Message]) -> list[Message]:
    messages.sort(key=lambda m: (m.created_at, m.seq))
    seen: set[str] = set()
    out: list[Message] = []
    for m in messages:  # the first copy of an id wins: that is the one Postgres kept
        if m.id not in seen:
            seen.add(m.id)
            out.append(m)
    return out


class HistoryStore:
    """Threads of messages, readable and continuable by any instance."""

    def __init__(
        self,
        *,
        db: Database,
        spool: Spool,
        cache: RedisGuard,
        keys: Keys,
        cache_turns: int,
    ) -> None:
        self._db = db
        self._spool = spool
        self._cache = cache
        self._keys = keys
        self._turns = cache_turns
        self._clock = _SeqClock()
        self._dirty: set[str] = set()
        self._cache_queue: list[tuple[str, str, asyncio.Future[None]]] = []
        self._cache_sender: asyncio.Task[None] | None = None
        cache.on_recover = self._drop_dirty

    # --- writing ---------------------------------------------------------------------------
    async def new_thread(
        self,
        *,
        session_id: str | None,
        tool_name: str,
        model: str | None,
        thread_id: str | None = None,
        metadata: dict[str, Any] | None = None,
        principal: str | None = None,
    ) -> str:
        """Start a thread and return its continuation_id (write-behind, durable on return)."""
        fresh = thread_id is None
        cid = new_id() if thread_id is None else as_uuid(thread_id, "thread_id")
        check_text(tool_name, "tool_name", max_len=200)
        meta = check_metadata(metadata)
        created = datetime.fromtimestamp(self._clock.next() / 1e6, UTC).isoformat()
        payload = {
            "id": cid,
            "session_id": session_id,
            "tool_name": tool_name,
            "model": model,
            "created_at": created,
            "metadata": meta,
            "principal": principal,
        }
        await self._spool.append(KIND_CONVERSATION, payload, thread_id=cid)
        # Only a brand-new id can start a complete (empty) cache; a caller-chosen id may name
        # a thread that already has turns elsewhere.
        if fresh and self._turns > 0:
            fields = ["session_id", session_id or "", "tool_name", tool_name, "model", model or ""]
            fields += ["created_at", created, "turns", "0", "principal", principal or ""]
            try:
                await self._cache.call(
                    lambda r: r.eval(
                        _CREATE_LUA,
                        2,
                        self._keys.thread(cid),
                        self._keys.thread_meta(cid),
                        CACHE_TTL_MS,
                        *fields,
                    )  # type: ignore[no-any-return]
                )
            except CacheDown:
                pass
        return cid

    async def append(
        self,
        continuation_id: str,
        role: str,
        content: str,
        *,
        session_id: str | None = None,
        tool_name: str | None = None,
        model: str | None = None,
        files: list[str] | None = None,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        metadata: dict[str, Any] | None = None,
        message_id: str | None = None,
    ) -> Message:
        """Add a turn; returns once the spool holds it durably (Postgres gets it in the background)."""
        cid = as_uuid(continuation_id, "continuation_id")
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        check_text(content, "content", max_len=CONTENT_MAX_CHARS)
        if files is not None and (not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
            raise InvalidArgument("files must be a list of path strings")
        seq = self._clock.next()
        msg = Message(
            id=new_id() if message_id is None else as_uuid(message_id, "message_id"),
            continuation_id=cid,
            seq=seq,
            role=role,
            content=content,
            created_at=datetime.fromtimestamp(seq / 1e6, UTC),
            session_id=session_id,
            tool_name=tool_name,
            model=model,
            files=list(files or []),
            tokens_in=check_optional_int(tokens_in, "tokens_in"),
            tokens_out=check_optional_int(tokens_out, "tokens_out"),
            metadata=check_metadata(metadata),
        )
        data = msg.to_dict()
        if self._turns <= 0:
            await self._spool.append(KIND_MESSAGE, data, thread_id=cid)
            return msg
        # The local fsync and the Redis round trip overlap: the caller waits for the slower one.
        spooled, _ = await asyncio.gather(
            self._spool.append(KIND_MESSAGE, data, thread_id=cid),
            self._cache_append(cid, json.dumps(data, separators=(",", ":"), ensure_ascii=False)),
            return_exceptions=True,
        )
        if isinstance(spooled, BaseException):
            # Not durable, so it must not stay visible in the cache either.
            self._dirty.add(cid)
            with contextlib.suppress(CacheDown):
                await self._cache.call(self._drop_dirty_now)
            raise spooled
        return msg

    async def _cache_append(self, cid: str, blob: str) -> None:
        """Write the turn through to Redis; concurrent appends share one pipelined round trip.

        Like the spool's group commit: the first caller sends, callers arriving meanwhile join
        the next pipeline. Each caller returns only after its own turn reached Redis (or Redis
        was found down and the thread marked for invalidation).
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._cache_queue.append((cid, blob, fut))
        if self._cache_sender is None or self._cache_sender.done():
            self._cache_sender = asyncio.create_task(self._send_cache_appends())
        await fut

    async def _send_cache_appends(self) -> None:
        while self._cache_queue:
            await asyncio.sleep(0)
            group, self._cache_queue = self._cache_queue, []

            async def send(r: Redis, group: list[tuple[str, str, asyncio.Future[None]]] = group) -> None:
                async with r.pipeline(transaction=False) as pipe:
                    for cid, blob, _ in group:
                        pipe.eval(
                            _APPEND_LUA, 2, self._keys.thread(cid), self._keys.thread_meta(cid), blob,
                            self._turns, CACHE_TTL_MS,
                        )  # fmt: skip
                    await pipe.execute()

            try:
                await self._cache.call(send)
            except CacheDown:
                self._dirty.update(cid for cid, _, _ in group)
            except Exception as exc:  # a cache bug must not fail a write that is already durable
                log.warning(
                    "Redis cache write failed (%s: %s); dropping those threads' cache",
                    type(exc).__name__,
                    exc,
                )
                self._dirty.update(cid for cid, _, _ in group)
            for _, _, fut in group:
                if not fut.done():
                    fut.set_result(None)

    async def _drop_dirty_now(self, _: Redis) -> None:
        await self._drop_dirty()

    async def _drop_dirty(self) -> None:
        """Redis is back: drop the caches that missed appends while it was away."""
        if not self._dirty or self._cache.redis is None:
            return
        dirty = list(self._dirty)
        keys = [k for cid in dirty for k in (self._keys.thread(cid), self._keys.thread_meta(cid))]
        await self._cache.redis.delete(*keys)
        self._dirty.difference_update(dirty)
        log.info("dropped the Redis cache of %d threads that missed appends during the outage", len(dirty))

    # --- reading ---------------------------------------------------------------------------
    async def load(self, continuation_id: str, *, limit: int | None = None) -> list[Message]:
        """The thread's turns oldest first (the last `limit` if given); ThreadNotFound if none exist."""
        cid = as_uuid(continuation_id, "continuation_id")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise InvalidArgument(f"limit must be a non-negative integer, got {limit!r}")
        pending = await self._spool.pending_for_thread(cid)
        local = [Message.from_dict(e.payload) for e in pending if e.kind == KIND_MESSAGE]
        cached, complete = await self._read_cache(cid)
        if cached is not None and (complete or (limit is not None and len(cached) >= limit)):
            known = cached + local
            try:
                stale = await self._db.run(
                    lambda c: self._missing_from_cache(c, cid, known, complete),
                    what="checking the thread cache",
                )
            except StorageUnavailable:
                log.warning("Postgres is down: thread %s served from its %d cached turns", cid, len(cached))
                return _cut(_sort_dedupe(cached + local), limit)
            if not stale:
                return _cut(_sort_dedupe(cached + local), limit)
            # Turns were written while Redis was away (by a process that never saw it return):
            # Postgres is the truth, and this cache can never be trusted again.
            log.warning("thread %s: the Redis cache misses %d turns Postgres holds; dropping it", cid, stale)
            with contextlib.suppress(CacheDown):
                await self._cache.call(
                    lambda r: r.delete(self._keys.thread(cid), self._keys.thread_meta(cid))  # type: ignore[no-any-return]
                )
            cached = None
        try:
            found, rows = await self._db.run(lambda c: self._fetch(c, cid, limit), what="reading the thread")
        except StorageUnavailable:
            if _has_conversation(pending):
                return _cut(_sort_dedupe(local), limit)  # created here, nothing of it flushed yet
            if cached is not None:
                log.warning(
                    "Postgres is down: thread %s served from its %d cached recent turns", cid, len(cached)
                )
                return _cut(_sort_dedupe(cached + local), limit)
            raise
        if not found and not pending and cached is None:
            raise ThreadNotFound(f"no conversation thread has continuation_id {cid}")
        return _cut(_sort_dedupe(rows + local), limit)

    async def check_access(self, continuation_id: str, owner: str | None) -> str:
        """The thread's id if it exists and `owner` may use it (None: anyone); ThreadNotFound otherwise.

        A thread belongs to the principal that started it; one started before owners were
        recorded belongs to nobody and stays visible to all. A thread of another principal is
        reported exactly like one that does not exist, so ids cannot be probed.
        """
        cid = as_uuid(continuation_id, "continuation_id")
        found, recorded = await self._owner(cid)
        if not found or (owner is not None and recorded is not None and recorded != owner):
            raise ThreadNotFound(f"no conversation thread has continuation_id {cid}")
        return cid

    async def _owner(self, cid: str) -> tuple[bool, str | None]:
        """(whether the thread exists, the principal recorded as its owner)."""
        for entry in await self._spool.pending_for_thread(cid):
            if entry.kind == KIND_CONVERSATION:
                return True, entry.payload.get("principal") or None
        try:
            meta = await self._cache.call(lambda r: r.hget(self._keys.thread_meta(cid), "principal"))  # type: ignore[arg-type,return-value]
            if meta is not None:
                return True, str(meta) or None
        except CacheDown:
            pass

        async def op(conn: asyncpg.Connection) -> tuple[bool, str | None]:
            row = await conn.fetchrow("SELECT principal FROM conversations WHERE id = $1", cid)
            if row is not None:
                return True, row["principal"]
            has_turns = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE conversation_id = $1)", cid
            )
            return bool(has_turns), None

        return await self._db.run(op, what="looking up the thread")

    async def exists(self, continuation_id: str) -> bool:
        cid = as_uuid(continuation_id, "continuation_id")
        if await self._spool.pending_for_thread(cid):
            return True
        try:
            if await self._cache.call(lambda r: r.exists(self._keys.thread_meta(cid))):
                return True
        except CacheDown:
            pass
        found, _ = await self._db.run(lambda c: self._fetch(c, cid, 0), what="looking up the thread")
        return found

    async def _read_cache(self, cid: str) -> tuple[list[Message] | None, bool]:
        """(cached recent turns, whether they are the whole thread), or (None, False) on a miss."""
        if self._turns <= 0 or cid in self._dirty:
            return None, False

        async def read(r: Redis) -> list[Any]:
            async with r.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._keys.thread_meta(cid))
                pipe.lrange(self._keys.thread(cid), 0, -1)
                return await pipe.execute()  # type: ignore[no-any-return]

        try:
            meta, items = await self._cache.call(read)
        except CacheDown:
            return None, False
        if not meta:
            return None, False
        try:
            messages = [Message.from_dict(json.loads(item)) for item in items]
            turns = int(meta.get("turns", 0))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed cache entry for thread %s: %s", cid, exc)
            return None, False
        return messages, len(messages) >= turns

    @staticmethod
    async def _missing_from_cache(
        conn: asyncpg.Connection, cid: str, known: list[Message], whole: bool
    ) -> int:
        """How many turns Postgres holds that `known` lacks (within `known`'s time window unless `whole`).

        One indexed count, so a cache hit still costs one small query, never a wrong history.
        """
        oldest = min(((m.created_at, m.seq) for m in known), default=None)
        since = None if whole or oldest is None else oldest[0]
        count = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE conversation_id = $1 AND NOT (id = ANY($2::uuid[]))"
            " AND ($3::timestamptz IS NULL OR created_at >= $3)",
            cid,
            [m.id for m in known],
            since,
        )
        return int(count or 0)

    @staticmethod
    async def _fetch(conn: asyncpg.Connection, cid: str, limit: int | None) -> tuple[bool, list[Message]]:
        if limit == 0:
            found = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM conversations WHERE id = $1)"
                " OR EXISTS (SELECT 1 FROM messages WHERE conversation_id = $1)",
                cid,
            )
            return bool(found), []
        cols = (
            "id, conversation_id, seq, role, content, session_id, tool_name, model, files, tokens_in,"
            " tokens_out, created_at, metadata"
        )
        if limit is None:
            rows = await conn.fetch(
                f"SELECT {cols} FROM messages WHERE conversation_id = $1 ORDER BY created_at, seq", cid
            )
        else:
            rows = await conn.fetch(
                f"SELECT * FROM (SELECT {cols} FROM messages WHERE conversation_id = $1"
                " ORDER BY created_at DESC, seq DESC LIMIT $2) t ORDER BY created_at, seq",
                cid,
                limit,
            )
        messages = [Message.from_row(r) for r in rows]
        found = bool(messages) or bool(
            await conn.fetchval("SELECT EXISTS (SELECT 1 FROM conversations WHERE id = $1)", cid)
        )
        return found, messages


def _cut(messages: list[Message], limit: int | None) -> list[Message]:
    if limit is None:
        return messages
    return messages[-limit:] if limit else []


def _has_conversation(entries: list[SpoolEntry]) -> bool:
    return any(e.kind == KIND_CONVERSATION for e in entries)
