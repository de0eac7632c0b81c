"""Conversation threads: appends go to the spool (write-behind) and through to the Redis cache.

Where a thread's turns live, freshest first: this process's spool (not yet flushed), Redis
(the most recent `history_cache_turns` turns, written through on every append), Postgres (all
turns that were flushed, by any process). `load` merges them and dedupes by message id.

Order (docs/ARCHITECTURE.md, "Thread order"): the turns one call appends (chat's question and
answer) are one exchange and share one position `pos` (instance/storage/positions.py: taken from
Redis, usually after the turns' spool commit, which the call does not wait for). A thread is
read back ordered by (pos, created_at, seq); a position that is missing but younger than
GAP_WAIT_S is an exchange still on its way to Postgres, and the history is cut there, so a
prompt is always built from a prefix of the final order. This process's own unflushed turns
are read with their positions (`load` waits for them first).

The Redis lists this process read are kept decoded (instance/storage/held.py), so a read takes
only the turns new since, and none at all while the Redis tracking connection reports no change.

Cache correctness rule: the Redis list of a thread is trusted only if it was created empty by
`new_thread` and every later append extended it (the append script leaves a missing cache
missing, so a lost or expired cache never comes back partial). Two things can still make a live
cache older than Postgres, and each is caught without asking Postgres on every hit:
- appends that could not reach Redis: the writer drops the cache as soon as it reaches Redis
  again, and (durably, through its spool) records a mark in Postgres that every instance polls
  (`sync_marks`, every CACHE_SYNC_S) and applies by dropping the cache, so a writer that died or
  never reconnects still invalidates it;
- Redis losing writes (a restart from its AOF): every cache records the Redis run_id it was
  last checked on; a cache read on another run_id is checked once against Postgres (one indexed
  count), then stamped with the current run_id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
from redis.asyncio import Redis

from common import jsonbytes
from common.errors import InvalidArgument, StorageUnavailable, ThreadNotFound
from common.keys import Keys
from instance.storage.cache import CacheDown, RedisGuard
from instance.storage.held import HeldCopies
from instance.storage.models import ROLES, Message
from instance.storage.pool import Database
from instance.storage.positions import Positions
from instance.storage.spool import Spool, SpoolEntry
from instance.storage.thread_scripts import CACHE_TTL_MS, CREATE_LUA, POS_PLACEHOLDER, READ_LUA, STAMP_LUA
from instance.storage.tracking import Stamp, Tracker, tracked
from instance.storage.validation import (
    as_uuid,
    check_metadata,
    check_optional_int,
    check_text,
    new_id,
)
from instance.storage.writebehind import KIND_CACHE_MARK, KIND_CONVERSATION, KIND_MESSAGE

log = logging.getLogger(__name__)

CONTENT_MAX_CHARS = 4 * 1024 * 1024

GAP_WAIT_S = 10.0
"""A missing position younger than this is an exchange still on its way (cut there); older: lost."""
CACHE_SYNC_S = 0.5
"""How often an instance applies the cache marks other instances left in Postgres."""
MARK_OVERLAP_S = 10.0
"""Marks are re-read this far back, so one committed late (its transaction began earlier) is seen."""
MARK_KEEP = "1 day"


class _NeedsLocal(Exception):
    """Internal: a cache read needs this process's unflushed turns to check the cache."""


class _SeqClock:
    """Message order across processes: microseconds since the epoch, strictly increasing here."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        now = time.time_ns() // 1000
        self._last = now if now > self._last else self._last + 1
        return self._last


def _order(m: Message) -> tuple[int, datetime, int]:
    """Thread order: exchange position, then time (turns written before positions come first)."""
    return (-1 if m.pos is None else m.pos, m.created_at, m.seq)


def _sort_dedupe(messages: list[Message]) -> list[Message]:
    messages.sort(key=_order)
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
        spool_sync: Literal["full", "normal"] = "full",
        tracker: Tracker | None = None,
    ) -> None:
        self._db = db
        self._tracker = tracker  # the thread read goes on its connection when up (tracking.py)
        self._sync: Literal["full", "normal"] = spool_sync  # EXAI_CHAT_SPOOL_SYNC
        self._spool = spool
        self._cache = cache
        self._keys = keys
        self._turns = cache_turns
        self._clock = _SeqClock()
        self._dirty: set[str] = set()  # threads whose cache missed appends (shared with _positions)
        self._owners: dict[str, str | None] = {}  # threads' owners, as recorded at their creation
        self._last_ids: dict[str, set[str]] = {}  # ids of the last exchange appended here, cached
        # Exchanges' positions: the Redis sequencer, and those that come after the spool commit.
        self._positions = Positions(
            db=db,
            spool=spool,
            cache=cache,
            keys=keys,
            cache_turns=cache_turns,
            spool_sync=spool_sync,
            tracker=tracker,
            dirty=self._dirty,
            placed=self._exchange_cached,
        )
        # The decoded cache lists read last, and whether they can be used without asking Redis.
        self._held = HeldCopies(keys, tracker, unanswered=self._positions.unanswered)
        self.cache_tail_reads_total = 0  # cache reads that decoded only the turns new since the last
        self.tracked_hits_total = 0  # cache reads answered from the held copy, no Redis round trip
        self.spool_reads_skipped_total = 0
        self._marks_since: datetime | None = None
        self._marks_seen: dict[str, datetime] = {}
        self._marks_pruned_at = 0.0
        self._syncer: asyncio.Task[None] | None = None
        self.marks_applied_total = 0
        self.cache_checks_total = 0  # caches checked against Postgres (new Redis run, or no stamp)
        cache.on_recover = self._drop_dirty

    @property
    def tracked_confirms_total(self) -> int:
        """Held copies confirmed after an append: by the append's own reply on the tracking
        connection, or by a read sent there after it (the append went on the direct line)."""
        return self._held.confirms_total

    @property
    def tracked_appends_total(self) -> int:
        """Exchanges appended on the tracking connection."""
        return self._positions.tracked_appends_total

    @property
    def positions_after_commit_total(self) -> int:
        """Exchanges whose position came after their spool commit."""
        return self._positions.after_commit_total

    @property
    def positions_recovered_total(self) -> int:
        """Exchanges of a previous run given their position again."""
        return self._positions.recovered_total

    @property
    def _marking(self) -> bool:
        """Whether appends that miss Redis must leave a mark (only if a fleet cache may exist)."""
        return self._positions.marking

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
        payload, fields = self._conversation(cid, session_id, tool_name, model, meta, principal)
        await self._spool.append(KIND_CONVERSATION, payload, thread_id=cid, sync=self._sync)
        if fresh:
            self._positions.note(cid, 0)  # nothing before it: its first exchange is position 1
        # Only a brand-new id can start a complete (empty) cache; a caller-chosen id may name
        # a thread that already has turns elsewhere.
        if fresh and self._turns > 0:
            try:
                await self._cache.call(
                    lambda r: r.eval(
                        CREATE_LUA,
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

    def _conversation(
        self,
        cid: str,
        session_id: str | None,
        tool_name: str,
        model: str | None,
        meta: dict[str, Any],
        principal: str | None,
    ) -> tuple[dict[str, Any], list[str]]:
        """A new thread's spool payload, and the fields of its cache's metadata."""
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
        fields = ["session_id", session_id or "", "tool_name", tool_name, "model", model or ""]
        fields += ["created_at", created, "turns", "0", "principal", principal or ""]
        return payload, fields

    async def start_thread(
        self,
        turns: Sequence[Mapping[str, Any]],
        *,
        session_id: str | None,
        tool_name: str,
        model: str | None,
        principal: str | None = None,
    ) -> tuple[str, list[Message]]:
        """`new_thread` and its first `append_exchange` together: the thread's cache is created and
        extended in one Redis round trip, and the thread and its turns share one spool commit."""
        cid = new_id()
        check_text(tool_name, "tool_name", max_len=200)
        payload, fields = self._conversation(cid, session_id, tool_name, model, {}, principal)
        self._positions.note(cid, 0)
        self._remember_owner(cid, principal or None)
        created, appended = await asyncio.gather(
            self._spool.append(KIND_CONVERSATION, payload, thread_id=cid, sync=self._sync),
            self.append_exchange(cid, turns, create=fields if self._turns > 0 else None),
            return_exceptions=True,
        )
        for result in (created, appended):
            if isinstance(result, BaseException):
                raise result
        assert not isinstance(appended, BaseException)
        return cid, appended

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
        """Add one turn as an exchange of its own (see `append_exchange`)."""
        turn = {
            "role": role,
            "content": content,
            "session_id": session_id,
            "tool_name": tool_name,
            "model": model,
            "files": files,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "metadata": metadata,
            "message_id": message_id,
        }
        (msg,) = await self.append_exchange(continuation_id, [turn])
        return msg

    async def append_exchange(
        self, continuation_id: str, turns: Sequence[Mapping[str, Any]], *, create: list[str] | None = None
    ) -> list[Message]:
        """Add turns that belong together (a question and its answer) as one exchange.

        They take one position in the thread, in the order given, and nothing another session
        appends can come between them. Each turn is a mapping of `append`'s arguments. Returns
        once the spool holds them durably (Postgres gets them in the background).
        """
        cid = as_uuid(continuation_id, "continuation_id")
        if not turns:
            raise InvalidArgument("an exchange needs at least one turn")
        self._held.appending(cid)
        drafts: list[Message] = []
        first: int | None = None
        for t in turns:
            role, content, files = t.get("role"), t.get("content"), t.get("files")
            if role not in ROLES:
                raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, got {role!r}")
            check_text(content, "content", max_len=CONTENT_MAX_CHARS)
            if files is not None and (
                not isinstance(files, list) or not all(isinstance(f, str) for f in files)
            ):
                raise InvalidArgument("files must be a list of path strings")
            seq = self._clock.next()
            first = seq if first is None else first
            message_id = t.get("message_id")
            drafts.append(
                Message(
                    id=new_id() if message_id is None else as_uuid(message_id, "message_id"),
                    continuation_id=cid,
                    seq=seq,
                    role=str(role),
                    content=str(content),
                    created_at=datetime.fromtimestamp(first / 1e6, UTC),  # one time for the exchange
                    session_id=t.get("session_id"),
                    tool_name=t.get("tool_name"),
                    model=t.get("model"),
                    files=list(files or []),
                    tokens_in=check_optional_int(t.get("tokens_in"), "tokens_in"),
                    tokens_out=check_optional_int(t.get("tokens_out"), "tokens_out"),
                    metadata=check_metadata(t.get("metadata")),
                )
            )
        # Each turn is encoded once: the cache's copy carries a placeholder the append script
        # fills with the position, and the spool's copy is the same bytes with the position.
        blobs = []
        for m in drafts:
            blob = jsonbytes.dumps(m.to_dict()).decode()
            assert blob.startswith(POS_PLACEHOLDER)
            blobs.append(blob)
        if self._positions.can_send():
            try:
                return await self._positions.commit_unplaced(cid, drafts, blobs, create)
            except Exception:
                # Not durable, so it must not stay visible in the cache either.
                self._last_ids.pop(cid, None)
                self._held.drop(cid)
                self._dirty.add(cid)
                with contextlib.suppress(CacheDown):
                    await self._cache.call(self._drop_dirty_now)
                raise
        # The direct line is down (or Redis is): the position first, then the commit, as before.
        # This process's earlier exchanges of the thread still waiting for theirs are placed
        # first (the line lost with their replies): a local position must come after theirs.
        await self._positions.settle_earlier(cid)
        pos, cached, listed = await self._positions.position(cid, blobs, create)
        head = '{"pos":' + str(pos)
        entries: list[tuple[str, dict[str, Any] | bytes]] = [
            (KIND_MESSAGE, (head + blob[len(POS_PLACEHOLDER) :]).encode()) for blob in blobs
        ]
        for m in drafts:  # not shared with anyone yet: the position is set in place
            object.__setattr__(m, "pos", pos)
        messages = drafts
        if not cached and self._marking:  # a cache elsewhere may now be older than Postgres
            entries.insert(0, (KIND_CACHE_MARK, {"id": new_id(), "conversation_id": cid}))
        try:
            # One transaction for the exchange; straight to the spool's thread when it is idle
            # (one session per instance: usually there is no group to wait for).
            await self._spool.append_many(entries, thread_id=cid, eager=True, sync=self._sync)
        except Exception:
            # Not durable, so it must not stay visible in the cache either.
            self._dirty.add(cid)
            with contextlib.suppress(CacheDown):
                await self._cache.call(self._drop_dirty_now)
            raise
        self._positions.note(cid, pos)
        self._exchange_cached(cid, messages, cached, listed)
        return messages

    def _exchange_cached(
        self, cid: str, messages: list[Message], cached: bool, listed: int, stamp: Stamp | None = None
    ) -> None:
        """An exchange of this process has its position: if the cache saw it, its ids are the
        thread's last (a load need not read the spool for them) and its turns extend the held
        copy (held.py, `HeldCopies.hold_appended`; `stamp`: the append's reply on the tracking
        connection); else the cache is dropped (dirty) and loads read the spool."""
        if cached:
            if len(self._last_ids) > 50_000:
                self._last_ids.clear()  # forgetting only costs a spool read on the next load
            self._last_ids[cid] = {m.id for m in messages}
            self._held.hold_appended(cid, messages, listed, stamp)
        else:
            self._last_ids.pop(cid, None)

    async def _drop_dirty_now(self, _: Redis) -> None:
        await self._drop_dirty()

    async def _drop_dirty(self) -> None:
        """Redis is back: drop the caches that missed appends while it was away."""
        if not self._dirty or self._cache.redis is None:
            return
        dirty = list(self._dirty)
        for cid in dirty:
            self._held.drop(cid)
        keys = [k for cid in dirty for k in (self._keys.thread(cid), self._keys.thread_meta(cid))]
        await self._cache.redis.delete(*keys)
        self._dirty.difference_update(dirty)
        log.info("dropped the Redis cache of %d threads that missed appends during the outage", len(dirty))

    # --- the flusher's side of positions that came after the commit -------------------------
    async def place_batch(self, batch: list[SpoolEntry]) -> list[SpoolEntry]:
        """`batch` as the flusher must store it: every turn with its exchange's position
        (positions.py, `Positions.place_batch`)."""
        return await self._positions.place_batch(batch)

    def flushed(self, batch: list[SpoolEntry]) -> None:
        """Postgres holds `batch`: its turns' positions are forgotten soon (`Positions.flushed`)."""
        self._positions.flushed(batch)

    # --- other instances' marks --------------------------------------------------------------
    def start(self) -> None:
        """Start applying other instances' cache marks (only where a Redis cache is used), and
        give the turns a previous run left without a position theirs (positions.py, `recover`)."""
        if self._marking and self._syncer is None:
            self._syncer = asyncio.create_task(self._sync_loop(), name="exai-thread-marks")
        self._positions.start()

    async def stop(self) -> None:
        await self._positions.stop()
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
            self._syncer = None

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(CACHE_SYNC_S)
            if self._db.last_error is not None and not self._db.connected:
                continue  # Postgres is known down: the flusher's reconnects will tell
            try:
                await self.sync_marks()
            except (StorageUnavailable, CacheDown):
                pass
            except Exception as exc:
                log.warning("applying thread cache marks failed: %s: %s", type(exc).__name__, exc)

    async def sync_marks(self) -> int:
        """Drop the Redis cache of threads whose turns some instance wrote without reaching Redis.

        Reads the marks committed since the last call (with an overlap, so a mark whose
        transaction began earlier than it committed is not skipped); returns how many threads'
        caches it dropped. Raises StorageUnavailable or CacheDown when a side is unreachable
        (the marks are read again next time).
        """
        since = self._marks_since
        prune = time.monotonic() - self._marks_pruned_at > 3600

        async def op(conn: asyncpg.Connection) -> tuple[datetime, list[asyncpg.Record]]:
            if prune:
                await conn.execute(
                    f"DELETE FROM thread_cache_marks WHERE created_at < now() - interval '{MARK_KEEP}'"
                )
            # One round trip: the clock and the marks (a row with only the clock when none).
            found = await conn.fetch(
                "SELECT now() AS now, m.id::text AS id, m.conversation_id::text AS cid, m.created_at"
                " FROM (SELECT 1) AS one LEFT JOIN thread_cache_marks AS m"
                " ON m.created_at > coalesce($1::timestamptz, now() - interval '1 hour') - $2::interval",
                since,
                timedelta(seconds=MARK_OVERLAP_S),
            )
            return found[0]["now"], [r for r in found if r["id"] is not None]

        now, rows = await self._db.run(op, what="reading thread cache marks")
        if prune:
            self._marks_pruned_at = time.monotonic()
        fresh = [r for r in rows if r["id"] not in self._marks_seen]
        cids = sorted({r["cid"] for r in fresh})
        for cid in cids:
            self._held.drop(cid)  # the invalidation of the delete below would say so too
        if cids:
            keys = [k for cid in cids for k in (self._keys.thread(cid), self._keys.thread_meta(cid))]
            await self._cache.call(lambda r: r.delete(*keys))  # type: ignore[no-any-return]
            log.info("dropped the Redis cache of %d threads written without it elsewhere", len(cids))
            self.marks_applied_total += len(cids)
        horizon = now - timedelta(seconds=2 * MARK_OVERLAP_S)
        for r in fresh:
            self._marks_seen[r["id"]] = r["created_at"]
        self._marks_seen = {k: v for k, v in self._marks_seen.items() if v > horizon}
        self._marks_since = now
        return len(cids)

    # --- reading ---------------------------------------------------------------------------
    async def load(self, continuation_id: str, *, limit: int | None = None) -> list[Message]:
        """The thread's turns oldest first (the last `limit` if given); ThreadNotFound if none exist.

        Always a prefix of the thread's final order (see the module docstring).
        """
        cid = as_uuid(continuation_id, "continuation_id")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise InvalidArgument(f"limit must be a non-negative integer, got {limit!r}")
        if self._positions.needs_placing(cid):  # this process's turns get their position first
            await self._positions.placed(cid)
        if limit is None and self._spool.has_pending(cid) and cid in self._last_ids:
            # This process's unflushed turns of the thread are in a complete cache (its last
            # exchange is, and Redis loses only a suffix of writes): no spool read needed.
            with contextlib.suppress(_NeedsLocal):
                cached, complete = await self._read_cache(cid, None, None)
                if cached is not None and complete and self._last_ids[cid] <= {m.id for m in cached}:
                    self.spool_reads_skipped_total += 1
                    return self._finish(cid, cached, None, whole=True)
        pending = await self._spool.pending_for_thread(cid)
        with_pos = self._positions.with_pos
        local = [with_pos(Message.from_dict(e.payload)) for e in pending if e.kind == KIND_MESSAGE]
        cached, complete = await self._read_cache(cid, local, limit)
        if cached is not None and (complete or (limit is not None and len(cached) >= limit)):
            return self._finish(cid, cached + local, limit, whole=complete)
        try:
            found, rows = await self._db.run(lambda c: self._fetch(c, cid, limit), what="reading the thread")
        except StorageUnavailable:
            if _has_conversation(pending):
                return self._finish(cid, local, limit, whole=True)  # created here, nothing flushed yet
            if cached is not None:
                log.warning(
                    "Postgres is down: thread %s served from its %d cached recent turns", cid, len(cached)
                )
                return self._finish(cid, cached + local, limit, whole=False)
            raise
        if not found and not pending and cached is None:
            raise ThreadNotFound(f"no conversation thread has continuation_id {cid}")
        # A partial cache still covers exchanges other instances have not flushed yet.
        return self._finish(cid, rows + (cached or []) + local, limit, whole=limit is None)

    def _finish(self, cid: str, messages: list[Message], limit: int | None, *, whole: bool) -> list[Message]:
        ordered = _sort_dedupe(messages)
        top = max((m.pos for m in ordered if m.pos is not None), default=None)
        if top is not None:
            self._positions.note(cid, top)
        return _cut(_until_gap(ordered, whole=whole), limit)

    async def check_access(
        self, continuation_id: str, owner: str | None, *, session: str | None = None
    ) -> str:
        """The thread's id if it exists and `owner` may use it (None: anyone); ThreadNotFound otherwise.

        A thread belongs to the principal that started it; one started before owners were
        recorded belongs to nobody and stays visible to all. Another principal may use it only
        when its calling `session` shares a link group with a session of the thread's owner:
        only the admin can put sessions of two principals in one group, so that is the admin's
        explicit consent (docs/LINKED_SESSIONS.md, "Sharing threads across principals"). A
        thread of another principal is otherwise reported exactly like one that does not
        exist, so ids cannot be probed.
        """
        cid = as_uuid(continuation_id, "continuation_id")
        found, recorded = await self._owner(cid)
        if not found:
            raise ThreadNotFound(f"no conversation thread has continuation_id {cid}")
        if owner is not None and recorded is not None and recorded != owner:
            if session is None or not await self._shared_with(session, recorded):
                raise ThreadNotFound(f"no conversation thread has continuation_id {cid}")
        return cid

    async def _shared_with(self, session: str, principal: str) -> bool:
        """Whether `session` is in a link group with a session of `principal`."""
        return bool(
            await self._db.run(
                lambda c: c.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM link_members me JOIN link_members other"
                    " ON other.group_name = me.group_name"
                    " WHERE me.session_id = $1 AND other.principal = $2)",
                    session,
                    principal,
                ),
                what="checking the link groups that share this thread",
            )
        )

    async def _owner(self, cid: str) -> tuple[bool, str | None]:
        """(whether the thread exists, the principal recorded as its owner)."""
        # A thread's owner is recorded once, when it is created, and never changes: once read
        # from its record here, a later call asks nobody.
        if cid in self._owners:
            return True, self._owners[cid]
        # The cache's metadata next (written with the thread, from the same record): a hit
        # costs no spool read.
        try:
            meta = await self._cache.command("HGET", self._keys.thread_meta(cid), "principal", batched=True)
            if meta is not None:
                return True, self._remember_owner(cid, str(meta) or None)
        except CacheDown:
            pass
        for entry in await self._spool.pending_for_thread(cid):
            if entry.kind == KIND_CONVERSATION:
                return True, self._remember_owner(cid, entry.payload.get("principal") or None)

        async def op(conn: asyncpg.Connection) -> tuple[bool, bool, str | None]:
            row = await conn.fetchrow("SELECT principal FROM conversations WHERE id = $1", cid)
            if row is not None:
                return True, True, row["principal"]
            has_turns = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE conversation_id = $1)", cid
            )
            return bool(has_turns), False, None  # turns whose thread record is not stored (yet)

        found, recorded, principal = await self._db.run(op, what="looking up the thread")
        return found, self._remember_owner(cid, principal) if recorded else principal

    def _remember_owner(self, cid: str, principal: str | None) -> str | None:
        if len(self._owners) > 50_000:
            self._owners.clear()  # forgetting only costs the next check a read
        self._owners[cid] = principal
        return principal

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

    async def _read_cache(
        self, cid: str, local: list[Message] | None, limit: int | None
    ) -> tuple[list[Message] | None, bool]:
        """(cached recent turns, whether they are the whole thread), or (None, False) on a miss.

        A cache last checked on another Redis run (Redis restarted, perhaps from an AOF without
        its latest writes) is checked against Postgres once before it is used on its own, then
        stamped; every later hit on this run costs no Postgres query. That check needs this
        process's unflushed turns: with `local` None it raises _NeedsLocal instead.
        """
        if self._turns <= 0 or cid in self._dirty:
            self._held.drop(cid)
            return None, False
        meta_key = self._keys.thread_meta(cid)
        held = self._held.get(cid)
        if held is not None and self._held.trusted(cid, held):
            # Nothing changed the thread's cache since the held copy was confirmed (the tracking
            # connection would have said): Redis would answer "no new turns".
            self.tracked_hits_total += 1
            return list(held.messages), True
        since = (held.run, len(held.messages)) if held is not None else ("", 0)
        writes = self._held.writes
        try:  # on the tracking connection when it is up (its reply's stamp), written at once
            found, stamp = await tracked(
                self._tracker, self._cache, "EVAL", READ_LUA, 2, meta_key, self._keys.thread(cid), *since
            )
        except CacheDown:
            return None, False
        if not found:
            self._held.drop(cid)
            return None, False
        try:
            flat, items, run, start = found
            meta = dict(zip(flat[::2], flat[1::2], strict=True))
            tail = [Message.from_dict(json.loads(item)) for item in items]
            if int(start) == 0:
                messages = tail
            elif held is not None and int(start) == len(held.messages) and held.run == run:
                messages = [*held.messages, *tail]
                self.cache_tail_reads_total += 1
            else:
                raise ValueError(f"the cache answered from turn {start}, past what this process holds")
            turns = int(meta.get("turns", 0))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed cache entry for thread %s: %s", cid, exc)
            self._held.drop(cid)
            return None, False
        complete = len(messages) >= turns
        if self._held.appended_since(cid, writes):
            stamp = None  # an append of this process began meanwhile: the reply may lack it
        checked = meta.get("run") == run
        self._held.hold(cid, run, messages, whole=len(messages) == turns, stamp=stamp, checked=checked)
        if meta.get("run") == run:
            return messages, complete
        if not (complete or (limit is not None and len(messages) >= limit)):
            return messages, complete  # merged with Postgres's rows anyway: it can hide nothing
        if local is None:
            raise _NeedsLocal
        self.cache_checks_total += 1
        try:
            stale = await self._db.run(
                lambda c: self._missing_from_cache(c, cid, messages + local, complete),
                what="checking the thread cache",
            )
        except StorageUnavailable:
            log.warning("Postgres is down: thread %s served from its %d cached turns", cid, len(messages))
            return messages, complete
        if stale:
            # Redis lost writes that Postgres holds: Postgres is the truth, this cache is done.
            log.warning("thread %s: the Redis cache misses %d turns Postgres holds; dropping it", cid, stale)
            self._held.drop(cid)
            with contextlib.suppress(CacheDown):
                await self._cache.call(
                    lambda r: r.delete(self._keys.thread(cid), meta_key)  # type: ignore[no-any-return]
                )
            return None, False
        with contextlib.suppress(CacheDown):
            await self._cache.call(lambda r: r.eval(STAMP_LUA, 1, meta_key, run))  # type: ignore[no-any-return]
        return messages, complete

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
            " tokens_out, created_at, metadata, pos"
        )
        if limit is None:
            rows = await conn.fetch(
                f"SELECT {cols} FROM messages WHERE conversation_id = $1"
                " ORDER BY pos NULLS FIRST, created_at, seq",
                cid,
            )
        else:
            rows = await conn.fetch(
                f"SELECT * FROM (SELECT {cols} FROM messages WHERE conversation_id = $1"
                " ORDER BY pos DESC NULLS LAST, created_at DESC, seq DESC LIMIT $2) t"
                " ORDER BY pos NULLS FIRST, created_at, seq",
                cid,
                limit,
            )
        messages = [Message.from_row(r) for r in rows]
        found = bool(messages) or bool(
            await conn.fetchval("SELECT EXISTS (SELECT 1 FROM conversations WHERE id = $1)", cid)
        )
        return found, messages


def _until_gap(messages: list[Message], *, whole: bool) -> list[Message]:
    """`messages` (in thread order) up to the first missing position younger than GAP_WAIT_S.

    A young gap is an exchange another instance has taken a position for but not flushed yet
    (and no cache covers): what follows it is left out, so the caller sees a prefix of the
    thread's order. An old gap is an exchange that was lost (its writer died between Redis and
    its spool) and is skipped. `whole`: the list starts at the thread's beginning (position 1).
    """
    expected = 1 if whole else None
    now = datetime.now(UTC)
    for i, m in enumerate(messages):
        if m.pos is None:
            continue
        if expected is not None and m.pos > expected:
            if (now - m.created_at).total_seconds() < GAP_WAIT_S:
                log.info(
                    "thread %s: position %d is not stored yet; reading up to it", m.continuation_id, expected
                )
                return messages[:i]
        expected = m.pos + 1 if expected is None else max(expected, m.pos + 1)
    return messages


def _cut(messages: list[Message], limit: int | None) -> list[Message]:
    if limit is None:
        return messages
    return messages[-limit:] if limit else []


def _has_conversation(entries: list[SpoolEntry]) -> bool:
    return any(e.kind == KIND_CONVERSATION for e in entries)
