"""Conversation threads: appends go to the spool (write-behind) and through to the Redis cache.

Where a thread's turns live, freshest first: this process's spool (not yet flushed), Redis
(the most recent `history_cache_turns` turns, written through on every append), Postgres (all
turns that were flushed, by any process). `load` merges them and dedupes by message id.

Order (docs/ARCHITECTURE.md, "Thread order"): the turns one call appends (chat's question and
answer) are one exchange and share one position `pos`, taken from the thread's counter in Redis
by the same script that extends the cache, so positions and the cache never disagree and two
sessions continuing one thread get positions 1, 2, 3, ... in the order their appends reached
Redis. A thread is read back ordered by (pos, created_at, seq); a position that is missing but
younger than GAP_WAIT_S is an exchange still on its way to Postgres, and the history is cut
there, so a prompt is always built from a prefix of the final order. Without Redis, a process
continues after the highest position it has seen (ties are kept together and broken by time).
The call does not wait for its position: the script goes out on the Redis tracking connection
(its reply then confirms the held copy it extends, `_hold_appended`) or else the direct line, the
turns are committed to the spool with the position a placeholder, and the reply fills it in
memory; the flusher writes it into the turns before storing them, this process's reads wait
for it, and a restarted process sends the script of turns left without one again
(`_append_unplaced`, `place_batch`, `_recover`).

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
import dataclasses
import functools
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import asyncpg
from redis.asyncio import Redis

from common import jsonbytes
from common.errors import InvalidArgument, StorageUnavailable, ThreadNotFound
from common.keys import Keys
from instance.storage.cache import CacheDown, RedisGuard
from instance.storage.models import ROLES, Message
from instance.storage.pool import Database
from instance.storage.spool import Spool, SpoolEntry
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

CACHE_TTL_MS = 7 * 24 * 3600 * 1000
CONTENT_MAX_CHARS = 4 * 1024 * 1024

GAP_WAIT_S = 10.0
"""A missing position younger than this is an exchange still on its way (cut there); older: lost."""
CACHE_SYNC_S = 0.5
"""How often an instance applies the cache marks other instances left in Postgres."""
MARK_OVERLAP_S = 10.0
"""Marks are re-read this far back, so one committed late (its transaction began earlier) is seen."""
MARK_KEEP = "1 day"
_POS_PLACEHOLDER = '{"pos":null'
_UNPLACED = b'{"pos":null,"id":"'  # the head of a spooled turn whose exchange has no position yet
PLACE_WAIT_S = 8.0
"""Longest a reader or the flusher waits for an exchange's position from Redis (the direct line
gives up after 5 s and redis-py's retry after its own socket timeout); then the local fallback."""
FLUSHED_KEEP_S = 5.0
"""How long the position of a turn stays in memory once the flusher stored it (for a read that
took the spool's rows just before)."""

# KEYS: list, meta, pos counter, recent exchange ids. ARGV: floor, cached turns, ttl ms, then one
# JSON turn each starting with '{"pos":null,"id":"<its id>"'. Takes the thread's next position
# (past `floor`, the highest the caller has seen: a lost counter restarts from there) and extends
# the cache, if it exists, with the turns carrying it, in one atomic step. Returns {position,
# the list's length once extended if it still holds every turn ever pushed (never trimmed),
# else -1}; the position is -1 if the counter is missing and the caller knows no floor
# (floor = -1). Idempotent as long as the counter lives (both expire CACHE_TTL_MS after the
# thread's last append): the same exchange (its first turn's id) sent again, by a client
# library retrying after a connection was lost with the reply or by an instance recovering
# turns it spooled before their position came back, gets the position it got, and nothing is
# appended twice. The list and its metadata are read after they are last written: sent on a
# tracking connection (instance/storage/tracking.py), the script leaves that connection tracking
# both keys, so any later change by another client is reported to it (a key's write ends its
# tracking, for the writer too, and only a read starts it again).
_APPEND_LUA = """
local xid = string.match(ARGV[4] or '', '^{"pos":null,"id":"([^"]+)"')
if xid then
  local given = redis.call('HGET', KEYS[4], xid)
  if given then return {tonumber(given), -1} end
end
local cur = tonumber(redis.call('GET', KEYS[3]) or '-1')
local floor = tonumber(ARGV[1])
if cur < 0 and floor < 0 then return {-1, -1} end
if floor > cur then cur = floor end
local pos = cur + 1
local listed = -1
redis.call('SET', KEYS[3], pos, 'PX', ARGV[3])
if tonumber(ARGV[2]) > 0 and redis.call('EXISTS', KEYS[2]) == 1 then
  for i = 4, #ARGV do
    redis.call('RPUSH', KEYS[1], '{"pos":' .. pos .. string.sub(ARGV[i], 12))
  end
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
  redis.call('HINCRBY', KEYS[2], 'turns', #ARGV - 3)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  local turns = tonumber(redis.call('HGET', KEYS[2], 'turns'))
  local len = redis.call('LLEN', KEYS[1])
  if len == turns then listed = len end
end
if xid then
  redis.call('HSET', KEYS[4], xid, pos)
  redis.call('PEXPIRE', KEYS[4], ARGV[3])
end
return {pos, listed}
"""

_RUN_ID_LUA = "string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')"

# KEYS: list, meta. ARGV: ttl ms, then field/value pairs. Creates the cache of a new thread once,
# stamped with the run_id of the Redis process that holds it.
_CREATE_LUA = f"""
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], 'run', {_RUN_ID_LUA}, unpack(ARGV, 2))
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

# KEYS: meta, list. ARGV: the run_id the caller's decoded copy of the list was read on ('' for
# none), and that copy's length. Returns {} on a miss, else {meta as field/value list, turns,
# current run_id, index of the first turn returned}. The turns start past the caller's copy
# only when that copy is still a prefix of the list: read on this same Redis run (a restart may
# have lost a suffix that later appends replaced), and the list never trimmed (its length is
# still the count of turns ever pushed, so index i is still the i-th turn pushed). A dropped
# cache is a miss, and a dropped cache is never recreated (only a brand-new id gets one).
_READ_LUA = f"""
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return {{}} end
local run = {_RUN_ID_LUA}
local from = 0
if ARGV[1] == run then
  local held = tonumber(ARGV[2])
  local turns = tonumber(redis.call('HGET', KEYS[1], 'turns') or '-1')
  if turns == redis.call('LLEN', KEYS[2]) and turns >= held then from = held end
end
return {{meta, redis.call('LRANGE', KEYS[2], from, -1), run, from}}
"""

HELD_THREADS = 64
"""Threads whose cached turns this process keeps decoded (one session per instance: a few)."""
HELD_CHARS = 1_000_000
"""A thread with more content than this is decoded on every read instead of kept."""

# KEYS: meta. ARGV: run_id. Records that the cache was checked against Postgres on this run.
_STAMP_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'run', ARGV[1]) end
return 1
"""


@dataclasses.dataclass(frozen=True)
class _Held:
    """The Redis list of a thread as this process last read it, decoded (and extended with the
    turns it appended right after, `_hold_appended`): the next read asks Redis only for the
    turns after it (see _READ_LUA)."""

    run: str  # the Redis run_id it was read on
    messages: tuple[Message, ...]  # the whole list, in list order
    # When it was last confirmed against Redis (tracking.Stamp): while nothing has invalidated the
    # thread's keys since, it is used without asking Redis (`_trusted`). None: ask Redis.
    stamp: Stamp | None = None
    checked: bool = False  # the cache was stamped with `run` (no Postgres check needed on it)


@dataclasses.dataclass(eq=False)
class _Exchange:
    """An exchange committed to the spool while its position is on its way from Redis (its
    append script written on the direct line, not waited for: `append_exchange`)."""

    cid: str
    messages: list[Message]  # handed to the caller; their `pos` is set when the position comes
    blobs: list[str]  # the turns as sent, their position a placeholder
    floor: int
    create: list[str] | None  # a new thread's cache fields (its create script went first)
    created: asyncio.Future[Any] | None  # the create script's reply
    sent: asyncio.Future[Any]  # the append script's reply
    placed: asyncio.Future[int]  # set with the position once it is known
    # Sent on the tracking connection: the stamp taken when the append's reply was processed
    # (filled in before `sent` is done). None: sent on the direct line.
    stamps: list[Stamp] | None = None
    marked: bool = False  # a cache mark is (being) spooled for it
    abandoned: bool = False  # its spool commit failed: positioned only to consume the reply
    pos: int | None = None


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
        self._tracker = tracker  # Redis-assisted client-side caching of `_held` (tracking.py)
        self._sync: Literal["full", "normal"] = spool_sync  # EXAI_CHAT_SPOOL_SYNC
        self._spool = spool
        self._cache = cache
        self._keys = keys
        self._turns = cache_turns
        self._clock = _SeqClock()
        self._dirty: set[str] = set()
        self._known: dict[str, int] = {}  # the highest exchange position seen per thread
        self._owners: dict[str, str | None] = {}  # threads' owners, as recorded at their creation
        self._last_ids: dict[str, set[str]] = {}  # ids of the last exchange appended here, cached
        self._held: OrderedDict[str, _Held] = OrderedDict()  # decoded cache lists, least recent first
        self.cache_tail_reads_total = 0  # cache reads that decoded only the turns new since the last
        self.tracked_hits_total = 0  # cache reads answered from the held copy, no Redis round trip
        # Held copies confirmed after an append: by the append's own reply on the tracking
        # connection, or by a read sent there after it (the append went on the direct line).
        self.tracked_confirms_total = 0
        self.tracked_appends_total = 0  # exchanges appended on the tracking connection
        # Appends this process started, counted; per thread, the count when its latest began: a
        # read sent before that append cannot be trusted to hold it (see `_hold`).
        self._append_seq = 0
        self._appended_at: dict[str, int] = {}
        self.spool_reads_skipped_total = 0
        # (thread, turns, floor, create: the new thread's cache fields or None, answer)
        self._cache_queue: list[
            tuple[str, list[str], int, list[str] | None, asyncio.Future[tuple[int, int]]]
        ] = []
        self._cache_sender: asyncio.Task[None] | None = None
        self._marks_since: datetime | None = None
        self._marks_seen: dict[str, datetime] = {}
        self._marks_pruned_at = 0.0
        self._syncer: asyncio.Task[None] | None = None
        # Positions that came after their turns were spooled (see `append_exchange`): by turn id,
        # the exchanges still waiting for theirs, and the positions of turns not stored yet.
        self._unplaced: dict[str, _Exchange] = {}
        self._open: dict[str, list[_Exchange]] = {}  # per thread, the exchanges in `_unplaced`
        self._positions: dict[str, int] = {}
        self._flushed: deque[tuple[float, list[str]]] = deque()  # turn ids stored, forgotten later
        self._background: set[asyncio.Task[Any]] = set()
        # Turns a previous run spooled without their position (it died before they were
        # stored): given theirs again before they are read or stored (`_recover`).
        self._unrecovered = spool.rows > 0
        self._recover_lock = asyncio.Lock()
        self._recovery: asyncio.Task[None] | None = None
        self.positions_after_commit_total = 0  # exchanges whose position came after their commit
        self.positions_recovered_total = 0  # exchanges of a previous run given their position again
        self.marks_applied_total = 0
        self.cache_checks_total = 0  # caches checked against Postgres (new Redis run, or no stamp)
        cache.on_recover = self._drop_dirty

    @property
    def _marking(self) -> bool:
        """Whether appends that miss Redis must leave a mark (only if a fleet cache may exist)."""
        return self._cache.redis is not None and self._turns > 0

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
            self._note_pos(cid, 0)  # nothing before it: its first exchange is position 1
        # Only a brand-new id can start a complete (empty) cache; a caller-chosen id may name
        # a thread that already has turns elsewhere.
        if fresh and self._turns > 0:
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
        self._note_pos(cid, 0)
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
        self._appending(cid)
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
            assert blob.startswith(_POS_PLACEHOLDER)
            blobs.append(blob)
        sent = self._send_append(cid, blobs, create)
        if sent is not None:
            return await self._append_unplaced(cid, drafts, blobs, create, *sent)
        # The direct line is down (or Redis is): the position first, then the commit, as before.
        # This process's earlier exchanges of the thread still waiting for theirs are placed
        # first (the line lost with their replies): a local position must come after theirs.
        for earlier in list(self._open.get(cid, ())):
            await self._settle(earlier)
        pos, cached, listed = await self._position(cid, blobs, create)
        head = '{"pos":' + str(pos)
        entries: list[tuple[str, dict[str, Any] | bytes]] = [
            (KIND_MESSAGE, (head + blob[len(_POS_PLACEHOLDER) :]).encode()) for blob in blobs
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
        self._note_pos(cid, pos)
        if cached:
            if len(self._last_ids) > 50_000:
                self._last_ids.clear()  # forgetting only costs a spool read on the next load
            self._last_ids[cid] = {m.id for m in messages}
            self._hold_appended(cid, messages, listed)
        else:  # the cache is dropped (dirty): loads read the spool
            self._last_ids.pop(cid, None)
        return messages

    def _send_append(
        self, cid: str, blobs: list[str], create: list[str] | None
    ) -> tuple[asyncio.Future[Any] | None, asyncio.Future[Any], int, list[Stamp] | None] | None:
        """Write the exchange's append script (after a new thread's create script) now, without
        waiting for the reply: (the create's reply, the append's, the floor sent, the box its
        reply's stamp goes in if sent on the tracking connection), or None if no connection can
        take them now (nothing sent but a create, which is idempotent).

        On the tracking connection when it is up (docs/ARCHITECTURE.md, "Own appends on the
        tracking connection"): it tracks with NOLOOP, so the append invalidates nothing here,
        and its reply, stamped, confirms the held copy it extends (`_hold_appended`). Else on
        the direct line."""
        if self._cache.redis is None:
            return None
        floor = self._known.get(cid, -1)
        tracking = self._send_tracked(cid, floor, blobs, create)
        if tracking is not None:
            return tracking
        if self._cache.line is None:
            return None
        created = None
        if create is not None:
            created = self._cache.send_now(*self._create_args(cid, create))
            if created is None:
                return None
        sent = self._cache.send_now("EVAL", _APPEND_LUA, *self._append_args(cid, floor, blobs))
        if sent is None:
            if created is not None:
                created.add_done_callback(_seen)  # sent again with the append, the usual way
            return None
        return created, sent, floor, None

    def _send_tracked(
        self, cid: str, floor: int, blobs: list[str], create: list[str] | None
    ) -> tuple[asyncio.Future[Any] | None, asyncio.Future[Any], int, list[Stamp]] | None:
        """`_send_append` on the tracking connection: its replies unwrapped from their stamps
        (the append's stamp put in the box returned), so a lost one is sent again the usual way
        (`RedisGuard.reply`, through redis-py)."""
        tracker = self._tracker
        if tracker is None or self._turns <= 0:
            return None
        loop = asyncio.get_running_loop()
        created: asyncio.Future[Any] | None = None
        if create is not None:
            made = tracker.send(*self._create_args(cid, create))
            if made is None:
                return None
            created = loop.create_future()
            made.add_done_callback(functools.partial(_unstamp, created, None))
        appended = tracker.send("EVAL", _APPEND_LUA, *self._append_args(cid, floor, blobs))
        if appended is None:
            if created is not None:
                created.add_done_callback(_seen)  # sent again with the append, the usual way
            return None
        box: list[Stamp] = []
        sent: asyncio.Future[Any] = loop.create_future()
        appended.add_done_callback(functools.partial(_unstamp, sent, box))
        return created, sent, floor, box

    async def _append_unplaced(
        self,
        cid: str,
        drafts: list[Message],
        blobs: list[str],
        create: list[str] | None,
        created: asyncio.Future[Any] | None,
        sent: asyncio.Future[Any],
        floor: int,
        stamps: list[Stamp] | None,
    ) -> list[Message]:
        """The exchange's append script is on its way to Redis: commit its turns to the spool
        with their position still the placeholder, and return without waiting for the reply.

        Redis runs one connection's commands in order, so this process's next read of the
        thread on the same line sees the append. The reply (usually back before the commit
        ends) gives the position (`_replied`): kept in memory by turn id until the flusher has
        stored the turns, which it fills in first (`place_batch`); reads of this process's
        unflushed turns wait for it (`_placed`). A lost reply is taken again as `_position`
        does (re-sent through redis-py: the script is idempotent per exchange), else the local
        fallback (the highest position seen, plus one, and the cache marked dirty)."""
        loop = asyncio.get_running_loop()
        ex = _Exchange(cid, drafts, blobs, floor, create, created, sent, loop.create_future(), stamps)
        for m in drafts:
            self._unplaced[m.id] = ex
        self._open.setdefault(cid, []).append(ex)
        entries: list[tuple[str, dict[str, Any] | bytes]] = [(KIND_MESSAGE, b.encode()) for b in blobs]
        if cid in self._dirty and self._marking:  # the cache will not see it: mark it now
            entries.insert(0, (KIND_CACHE_MARK, {"id": new_id(), "conversation_id": cid}))
            ex.marked = True
        sent.add_done_callback(functools.partial(self._replied, ex))
        try:
            await self._spool.append_many(entries, thread_id=cid, eager=True, sync=self._sync)
        except Exception:
            # Not durable, so it must not stay visible in the cache either; its position, when
            # it comes, is only consumed (a gap in the thread, skipped once old).
            ex.abandoned = True
            for m in drafts:
                self._positions.pop(m.id, None)
            self._last_ids.pop(cid, None)
            self._held.pop(cid, None)
            self._dirty.add(cid)
            with contextlib.suppress(CacheDown):
                await self._cache.call(self._drop_dirty_now)
            raise
        if ex.pos is None:
            self.positions_after_commit_total += 1
        return drafts

    def _replied(self, ex: _Exchange, sent: asyncio.Future[Any]) -> None:
        """The append script's reply came (from the line's read callback, on the loop): the
        exchange's position, or, on anything but a plain answer, the slow path."""
        if ex.pos is not None:
            return  # placed by the fallback already
        made = ex.created
        if (
            not sent.cancelled()
            and sent.exception() is None
            and (made is None or (made.done() and not made.cancelled() and made.exception() is None))
        ):
            try:
                pos, listed = _appended(sent.result())
            except (TypeError, ValueError):
                pos, listed = -1, -1
            if pos >= 0:
                if ex.stamps is None:
                    self._cache.line_commands_total += 1 if made is None else 2
                else:
                    self.tracked_appends_total += 1
                stamp = ex.stamps[0] if ex.stamps else None
                self._place(ex, pos, ex.cid not in self._dirty, listed, stamp)
                return
        self._spawn(self._place_slowly(ex), "taking an exchange's position")

    async def _place_slowly(self, ex: _Exchange) -> None:
        """The reply was lost, an error, or no position: `_position`'s way (re-sent through
        redis-py, the counter restarted past storage, or the local fallback).

        This process's earlier exchanges of the thread are placed first: their replies may
        have been lost with this one's, and a local position must come after theirs (the
        floor `ex` was sent with predates them)."""
        for earlier in list(self._open.get(ex.cid, ())):
            if earlier is ex:
                break
            await self._settle(earlier)
        floor = max(ex.floor, self._known.get(ex.cid, -1))
        try:
            pos, cached, listed = await self._position(
                ex.cid, ex.blobs, ex.create, sent=(ex.created, ex.sent), floor=floor
            )
        except Exception as exc:  # _position falls back on its own; only storage reads raise here
            log.warning("thread %s: position by the fallback (%s: %s)", ex.cid, type(exc).__name__, exc)
            await self._place_fallback(ex)
            return
        self._place(ex, pos, cached, listed)

    async def _place_fallback(self, ex: _Exchange) -> None:
        """Position `ex` without Redis: past the highest position seen, the cache marked dirty."""
        floor = self._known.get(ex.cid, -1)
        if floor < 0:
            with contextlib.suppress(Exception):
                floor = await self._floor_from_storage(ex.cid)
        if ex.pos is None:
            self._dirty.add(ex.cid)
            self._place(ex, max(floor, 0) + 1, False, -1)

    def _place(self, ex: _Exchange, pos: int, cached: bool, listed: int, stamp: Stamp | None = None) -> None:
        """`ex` has its position: set it on its turns and keep it for the flusher and for reads
        of the spool; then what `append_exchange` does after the commit when the cache saw the
        exchange (its ids as the thread's last, its turns held: `_hold_appended`), or when it
        did not (a cache mark spooled, if none went with the turns)."""
        if ex.pos is not None:
            return
        ex.pos = pos
        cid = ex.cid
        for m in ex.messages:
            object.__setattr__(m, "pos", pos)
            self._unplaced.pop(m.id, None)
        waiting = self._open.get(cid)
        if waiting is not None:
            with contextlib.suppress(ValueError):
                waiting.remove(ex)
            if not waiting:
                del self._open[cid]
        self._note_pos(cid, pos)
        if not ex.abandoned:
            for m in ex.messages:
                self._positions[m.id] = pos
            if cached:
                if len(self._last_ids) > 50_000:
                    self._last_ids.clear()
                self._last_ids[cid] = {m.id for m in ex.messages}
                self._hold_appended(cid, ex.messages, listed, stamp)
            else:
                self._last_ids.pop(cid, None)
                if self._marking and not ex.marked:
                    ex.marked = True
                    self._spawn(self._spool_mark(cid), "spooling a thread cache mark")
        if not ex.placed.done():
            ex.placed.set_result(pos)

    async def _spool_mark(self, cid: str) -> None:
        """A cache mark for turns already spooled that the cache did not get (docs/ARCHITECTURE.md,
        "The thread cache never hides turns Postgres holds")."""
        await self._spool.append(
            KIND_CACHE_MARK, {"id": new_id(), "conversation_id": cid}, thread_id=cid, sync=self._sync
        )

    def _spawn(self, coro: Any, what: str) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(functools.partial(self._finished, what))

    def _finished(self, what: str, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s failed: %s: %s", what, type(exc).__name__, exc)

    async def _settle(self, ex: _Exchange) -> int:
        """`ex`'s position, waiting for it at most PLACE_WAIT_S (then the local fallback)."""
        if ex.pos is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PLACE_WAIT_S):
                    await asyncio.shield(ex.placed)
        if ex.pos is None:
            log.warning(
                "thread %s: no position from Redis in %.0fs; taking the local one",
                ex.cid,
                PLACE_WAIT_S,
            )
            await self._place_fallback(ex)
        assert ex.pos is not None
        return ex.pos

    async def _placed(self, cid: str) -> None:
        """Every exchange of the thread this process spooled has its position (in memory)."""
        if self._unrecovered and self._spool.has_pending(cid):
            await self._recover_now()
        while waiting := self._open.get(cid):
            await self._settle(waiting[0])

    def _with_pos(self, m: Message) -> Message:
        """A turn read from this process's spool, with its position if it came after the commit."""
        if m.pos is None:
            pos = self._positions.get(m.id)
            if pos is not None:
                object.__setattr__(m, "pos", pos)  # a fresh copy, decoded from the spool
        return m

    # --- the flusher's side of positions that came after the commit -------------------------
    async def place_batch(self, batch: list[SpoolEntry]) -> list[SpoolEntry]:
        """`batch` as the flusher must store it: every turn with its exchange's position (filled
        into the JSON's head, `{"pos":null` -> `{"pos":N`), waiting for one still on its way
        (at most PLACE_WAIT_S), and a previous run's turns given theirs again (`_recover`)."""
        out: list[SpoolEntry] | None = None
        for i, e in enumerate(batch):
            if e.kind != KIND_MESSAGE:
                continue
            blob = e.blob
            if not blob.startswith(_UNPLACED):
                continue
            mid = _head_id(blob)
            pos = self._positions.get(mid)
            if pos is None:
                ex = self._unplaced.get(mid)
                if ex is not None:
                    pos = await self._settle(ex)
                else:  # spooled by a previous run
                    await self._recover_now(force=True)
                    pos = self._positions.get(mid)
            if pos is None:  # cannot happen: recovery positions every such row it finds
                log.error("spool row %d (thread %s) has no position; stored without one", e.seq, e.thread_id)
                continue
            if out is None:
                out = list(batch)
            out[i] = e.with_blob(b'{"pos":%d' % pos + blob[len(_POS_PLACEHOLDER) :])
        return batch if out is None else out

    def flushed(self, batch: list[SpoolEntry]) -> None:
        """Postgres holds `batch`: its turns' positions are forgotten after FLUSHED_KEEP_S."""
        now = time.monotonic()
        if self._positions:
            ids = [_head_id(e.blob) for e in batch if e.kind == KIND_MESSAGE]
            self._flushed.append((now, ids))
        while self._flushed and now - self._flushed[0][0] > FLUSHED_KEEP_S:
            for mid in self._flushed.popleft()[1]:
                self._positions.pop(mid, None)

    async def _recover_now(self, *, force: bool = False) -> None:
        """Run `_recover` once (or again, `force`), one at a time."""
        async with self._recover_lock:
            if self._unrecovered or force:
                await self._recover()
                self._unrecovered = False

    async def _recover(self) -> None:
        """Give the turns a previous run spooled before their position came back their position.

        They are found by their JSON's head; an exchange's turns are consecutive rows of one
        thread with one time. Each exchange's append script is sent again, as it was: Redis
        answers the position it gave, by the exchange's first turn id, if the first one got
        there (nothing is appended twice), else gives a new one and extends the cache as it
        would have; without Redis, the local fallback (the cache marked dirty). In spool order,
        so a thread's exchanges keep their order."""
        found = await self._spool.find(KIND_MESSAGE, _UNPLACED)
        groups: list[list[SpoolEntry]] = []
        last: tuple[SpoolEntry, Any] | None = None
        for e in found:
            mid = _head_id(e.blob)
            if mid in self._unplaced or mid in self._positions or e.thread_id is None:
                continue  # this run's
            when = e.payload.get("created_at")
            follows = last is not None and (last[0].thread_id, last[0].seq + 1, last[1]) == (
                e.thread_id,
                e.seq,
                when,
            )
            if follows:
                groups[-1].append(e)
            else:
                groups.append([e])
            last = (e, when)
        for group in groups:
            cid = str(group[0].thread_id)
            pos, cached, _ = await self._position(cid, [e.blob.decode() for e in group])
            if not cached and self._marking:
                await self._spool_mark(cid)
            for e in group:
                self._positions[_head_id(e.blob)] = pos
            self._note_pos(cid, pos)
            self.positions_recovered_total += 1
        if groups:
            log.warning(
                "spool %s: %d exchanges of a previous run had no position yet; given theirs again",
                self._spool.path,
                len(groups),
            )

    def _hold_appended(
        self, cid: str, messages: list[Message], listed: int, stamp: Stamp | None = None
    ) -> None:
        """After an append that extended the thread's cache: if the list is now exactly what this
        process holds of it plus these turns (`listed`: its length, whole; nobody pushed in
        between), hold them too, so the next read gets nothing from Redis it has and decodes
        nothing. The held copy keeps the Redis run it was read on: a restart since then makes
        the next read start over (_READ_LUA), whatever the list's length.

        `stamp`: the append went on the tracking connection, and this is its reply's stamp. The
        copy is then trusted from that stamp on, with no read to confirm it: the reply says the
        list is the copy (`listed`), NOLOOP kept the append's own invalidation away (a Redis that
        sends it anyway writes it before the reply: processed before the stamp, it is covered),
        and the script read both keys last, so a later change by anyone else is reported after
        the reply. Not while another exchange of the thread this process sent is unanswered: on
        this connection its change would not be reported."""
        # Once more now that Redis has the exchange: a read sent before its reply (on another
        # connection, so perhaps answered before the append) must not give a copy trust.
        self._appending(cid)
        held = self._held.get(cid)
        if held is not None and listed == len(held.messages) + len(messages):
            self._hold(cid, held.run, [*held.messages, *messages], whole=True, checked=held.checked)
            if stamp is None:
                self._confirm(cid)
            elif held.checked and cid not in self._open and self._tracker is not None:
                kept = self._held.get(cid)
                if kept is not None:
                    self._held[cid] = dataclasses.replace(kept, stamp=stamp)
                    self.tracked_confirms_total += 1
        elif held is not None:
            # Somebody else pushed in between (or the list is gone or trimmed): the copy is not
            # the list plus this exchange, so it must not be trusted (the next read asks Redis).
            self._held[cid] = dataclasses.replace(held, stamp=None)

    def _appending(self, cid: str) -> None:
        """An append of `cid` starts: the held copy loses its trust until it holds the exchange
        (`_hold_appended`), and no read already on its way may give it trust (`_hold`)."""
        self._append_seq += 1
        if len(self._appended_at) > 50_000:
            self._appended_at.clear()
            self._held.clear()  # copies read before a forgotten append must not be trusted
        self._appended_at[cid] = self._append_seq
        held = self._held.get(cid)
        if held is not None and held.stamp is not None:
            self._held[cid] = dataclasses.replace(held, stamp=None)

    def _confirm(self, cid: str) -> None:
        """After this process's own append extended the held copy: confirm it on the tracking
        connection, so the next read trusts it without a round trip.

        The append changed the thread's keys, so its own invalidation is on its way; a read sent
        on the tracking connection after the append's reply is answered after that invalidation
        (Redis wrote it before processing the read), and the stamp taken with the reply covers it.
        The read is the ordinary tail read: it confirms only if the list is still exactly the
        held copy (same run, same length, stamped); anything else leaves the copy untrusted."""
        tracker, held = self._tracker, self._held.get(cid)
        if tracker is None or held is None or not held.checked:
            return
        writes = self._append_seq
        keys = (self._keys.thread_meta(cid), self._keys.thread(cid))
        sent = tracker.send("EVAL", _READ_LUA, 2, *keys, held.run, len(held.messages))
        if sent is not None:
            sent.add_done_callback(lambda fut: self._confirmed(cid, held, writes, fut))

    def _confirmed(self, cid: str, held: _Held, writes: int, fut: asyncio.Future[tuple[Any, Stamp]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        answer, stamp = fut.result()
        try:
            flat, items, run, start = answer
            meta = dict(zip(flat[::2], flat[1::2], strict=True))
            same = (
                not items
                and int(start) == len(held.messages)
                and run == held.run
                and meta.get("run") == run
                and int(meta.get("turns", -1)) == len(held.messages)
            )
        except (ValueError, TypeError):
            return
        if (
            same
            and self._held.get(cid) is held
            and self._appended_at.get(cid, 0) <= writes
            and cid not in self._open  # one on the tracking connection would not be reported
        ):
            self._held[cid] = dataclasses.replace(held, stamp=stamp)
            self.tracked_confirms_total += 1

    def _trusted(self, cid: str, held: _Held) -> bool:
        """Whether the held copy is still the thread's cache list, without asking Redis."""
        tracker = self._tracker
        return (
            tracker is not None
            and held.stamp is not None
            and held.checked
            and tracker.unchanged(held.stamp, self._keys.thread_meta(cid), self._keys.thread(cid))
        )

    def _note_pos(self, cid: str, pos: int) -> None:
        if len(self._known) > 50_000:
            self._known.clear()  # only a floor for a lost counter: forgetting it is safe
        if pos > self._known.get(cid, -1):
            self._known[cid] = pos

    async def _position(
        self,
        cid: str,
        blobs: list[str],
        create: list[str] | None = None,
        *,
        sent: tuple[asyncio.Future[Any] | None, asyncio.Future[Any]] | None = None,
        floor: int | None = None,
    ) -> tuple[int, bool, int]:
        """(the exchange's position, whether the cache saw it, the cache list's length after it as
        `_APPEND_LUA` returns it) — from Redis when reachable.

        `blobs`: the turns as the cache stores them, their position a placeholder. `create`: the
        thread is new, and its (empty) cache is created just before, in the same round trip, with
        these metadata fields. `sent`: the create's and the append's replies, already written
        on the direct line with `floor` (`_send_append`)."""
        floor = self._known.get(cid, -1) if floor is None else floor
        if self._cache.redis is not None:
            try:
                pos, listed = await self._cache_append(cid, blobs, floor, create, already=sent)
                if pos < 0:  # the counter is gone (expired, or Redis lost it): restart past storage
                    floor = await self._floor_from_storage(cid)
                    pos, listed = await self._cache_append(cid, blobs, floor)
                if pos >= 0:
                    return pos, cid not in self._dirty, listed
            except CacheDown:
                pass
            except Exception as exc:  # a cache bug must not fail the write
                log.warning("Redis position for thread %s failed (%s: %s)", cid, type(exc).__name__, exc)
        # Redis unreachable: continue after the highest position this process has seen.
        if floor < 0:
            floor = await self._floor_from_storage(cid)
        self._dirty.add(cid)
        return floor + 1, False, -1

    async def _floor_from_storage(self, cid: str) -> int:
        """The highest position this process can find for the thread (spool, then Postgres)."""
        top = 0
        for e in await self._spool.pending_for_thread(cid):
            if e.kind == KIND_MESSAGE:
                pos = e.payload.get("pos")
                pos = self._positions.get(str(e.payload.get("id"))) if pos is None else pos
                if pos is not None:
                    top = max(top, int(pos))
        with contextlib.suppress(StorageUnavailable):
            stored = await self._db.run(
                lambda c: c.fetchval("SELECT max(pos) FROM messages WHERE conversation_id = $1", cid),
                what="finding the thread's last position",
            )
            top = max(top, int(stored or 0))
        return top

    def _append_args(self, cid: str, floor: int, blobs: list[str]) -> tuple[Any, ...]:
        """`_APPEND_LUA`'s key count, keys and arguments for one exchange."""
        keys = self._keys
        return (
            4, keys.thread(cid), keys.thread_meta(cid), keys.thread_pos(cid), keys.thread_xids(cid),
            floor, self._turns, CACHE_TTL_MS, *blobs,
        )  # fmt: skip

    def _create_args(self, cid: str, create: list[str]) -> tuple[Any, ...]:
        """The EVAL of `_CREATE_LUA` for a new thread's cache with these metadata fields."""
        return (
            "EVAL", _CREATE_LUA, 2, self._keys.thread(cid), self._keys.thread_meta(cid),
            CACHE_TTL_MS, *create,
        )  # fmt: skip

    async def _cache_append(
        self,
        cid: str,
        blobs: list[str],
        floor: int,
        create: list[str] | None = None,
        already: tuple[asyncio.Future[Any] | None, asyncio.Future[Any]] | None = None,
    ) -> tuple[int, int]:
        """Take a position and write the turns through to Redis; concurrent appends share one
        pipelined round trip (like the spool's group commit). Returns `_APPEND_LUA`'s answer
        (position, list length or -1). Raises CacheDown. `already`: the create's and the append's
        replies, written on the direct line already (a lost one is sent again by `reply`)."""
        append = ("EVAL", _APPEND_LUA, *self._append_args(cid, floor, blobs))
        if already is not None:
            was_made, answer = already
            if was_made is not None and create is not None:
                await self._cache.reply(was_made, *self._create_args(cid, create))
            return _appended(await self._cache.reply(answer, *append))
        if create is None:
            sent = self._cache.send_now(*append)
            if sent is not None:  # written now on the direct line: no task, no loop turn first
                return _appended(await self._cache.reply(sent, *append))
        else:  # a new thread: its cache is created, then extended, both written now, in order
            made = self._create_args(cid, create)
            created = self._cache.send_now(*made)
            if created is not None:
                sent = self._cache.send_now(*append)
                if sent is not None:
                    await self._cache.reply(created, *made)
                    return _appended(await self._cache.reply(sent, *append))
                created.add_done_callback(_seen)  # the create is idempotent: sent again below
        fut: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._cache_queue.append((cid, blobs, floor, create, fut))
        if self._cache_sender is None or self._cache_sender.done():
            self._cache_sender = asyncio.create_task(self._send_cache_appends())
        return await fut

    async def _send_cache_appends(self) -> None:
        while self._cache_queue:
            await asyncio.sleep(0)
            group, self._cache_queue = self._cache_queue, []

            async def send(
                r: Redis,
                group: list[
                    tuple[str, list[str], int, list[str] | None, asyncio.Future[tuple[int, int]]]
                ] = group,
            ) -> list[Any]:
                if len(group) == 1 and group[0][3] is None:  # the usual case: no pipeline to build
                    cid, blobs, floor, _, _ = group[0]
                    return [
                        await r.eval(_APPEND_LUA, *self._append_args(cid, floor, blobs))  # type: ignore[misc]
                    ]  # fmt: skip
                async with r.pipeline(transaction=False) as pipe:
                    for cid, blobs, floor, create, _ in group:
                        if create is not None:  # a new thread's cache first: the append extends it
                            pipe.eval(
                                _CREATE_LUA, 2, self._keys.thread(cid), self._keys.thread_meta(cid),
                                CACHE_TTL_MS, *create,
                            )  # fmt: skip
                        pipe.eval(_APPEND_LUA, *self._append_args(cid, floor, blobs))
                    answers = await pipe.execute()
                # One position per append (a create's answer is the one before its append's).
                out, i = [], 0
                for item in group:
                    i += 1 if item[3] is not None else 0
                    out.append(answers[i])
                    i += 1
                return out

            try:
                results = await self._cache.call(send)
            except BaseException as exc:
                error = exc if isinstance(exc, CacheDown) else CacheDown(f"{type(exc).__name__}: {exc}")
                if not isinstance(exc, CacheDown):
                    log.warning("Redis cache write failed (%s); those threads fall back", error)
                for *_, fut in group:
                    if not fut.done():
                        fut.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (*_, fut), answer in zip(group, results, strict=True):
                if not fut.done():
                    try:
                        fut.set_result(_appended(answer))
                    except (TypeError, ValueError) as exc:
                        fut.set_exception(exc)

    async def _drop_dirty_now(self, _: Redis) -> None:
        await self._drop_dirty()

    async def _drop_dirty(self) -> None:
        """Redis is back: drop the caches that missed appends while it was away."""
        if not self._dirty or self._cache.redis is None:
            return
        dirty = list(self._dirty)
        for cid in dirty:
            self._held.pop(cid, None)
        keys = [k for cid in dirty for k in (self._keys.thread(cid), self._keys.thread_meta(cid))]
        await self._cache.redis.delete(*keys)
        self._dirty.difference_update(dirty)
        log.info("dropped the Redis cache of %d threads that missed appends during the outage", len(dirty))

    # --- other instances' marks --------------------------------------------------------------
    def start(self) -> None:
        """Start applying other instances' cache marks (only where a Redis cache is used), and
        give the turns a previous run left without a position theirs (`_recover`)."""
        if self._marking and self._syncer is None:
            self._syncer = asyncio.create_task(self._sync_loop(), name="exai-thread-marks")
        if self._unrecovered and self._recovery is None:
            self._recovery = asyncio.create_task(self._recover_now(), name="exai-thread-positions")

    async def stop(self) -> None:
        # Positions and the marks they lead to, on their way (a position's task may start a mark's).
        for cid in list(self._open):
            await self._placed(cid)
        deadline = time.monotonic() + PLACE_WAIT_S
        while self._background and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._background), timeout=left)
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(BaseException):
                await self._recovery
            self._recovery = None
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
            self._held.pop(cid, None)  # the invalidation of the delete below would say so too
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
        if cid in self._open or self._unrecovered:  # this process's turns get their position first
            await self._placed(cid)
        if limit is None and self._spool.has_pending(cid) and cid in self._last_ids:
            # This process's unflushed turns of the thread are in a complete cache (its last
            # exchange is, and Redis loses only a suffix of writes): no spool read needed.
            with contextlib.suppress(_NeedsLocal):
                cached, complete = await self._read_cache(cid, None, None)
                if cached is not None and complete and self._last_ids[cid] <= {m.id for m in cached}:
                    self.spool_reads_skipped_total += 1
                    return self._finish(cid, cached, None, whole=True)
        pending = await self._spool.pending_for_thread(cid)
        local = [self._with_pos(Message.from_dict(e.payload)) for e in pending if e.kind == KIND_MESSAGE]
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
            self._note_pos(cid, top)
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
            self._held.pop(cid, None)
            return None, False
        meta_key = self._keys.thread_meta(cid)
        held = self._held.get(cid)
        if held is not None and self._trusted(cid, held):
            # Nothing changed the thread's cache since the held copy was confirmed (the tracking
            # connection would have said): Redis would answer "no new turns".
            self.tracked_hits_total += 1
            return list(held.messages), True
        since = (held.run, len(held.messages)) if held is not None else ("", 0)
        writes = self._append_seq
        try:  # on the tracking connection when it is up (its reply's stamp), written at once
            found, stamp = await tracked(
                self._tracker, self._cache, "EVAL", _READ_LUA, 2, meta_key, self._keys.thread(cid), *since
            )
        except CacheDown:
            return None, False
        if not found:
            self._held.pop(cid, None)
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
            self._held.pop(cid, None)
            return None, False
        complete = len(messages) >= turns
        if self._appended_at.get(cid, 0) > writes:
            stamp = None  # an append of this process began meanwhile: the reply may lack it
        checked = meta.get("run") == run
        self._hold(cid, run, messages, whole=len(messages) == turns, stamp=stamp, checked=checked)
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
            self._held.pop(cid, None)
            with contextlib.suppress(CacheDown):
                await self._cache.call(
                    lambda r: r.delete(self._keys.thread(cid), meta_key)  # type: ignore[no-any-return]
                )
            return None, False
        with contextlib.suppress(CacheDown):
            await self._cache.call(lambda r: r.eval(_STAMP_LUA, 1, meta_key, run))  # type: ignore[no-any-return]
        return messages, complete

    def _hold(
        self,
        cid: str,
        run: str,
        messages: list[Message],
        *,
        whole: bool,
        stamp: Stamp | None = None,
        checked: bool = False,
    ) -> None:
        """Keep a thread's decoded cache list for its next read; only an untrimmed list (`whole`:
        as many items as turns ever pushed) can be continued by index, and only a small one is kept."""
        if not whole or sum(len(m.content) for m in messages) > HELD_CHARS:
            self._held.pop(cid, None)
            return
        self._held[cid] = _Held(run, tuple(messages), stamp, checked)
        self._held.move_to_end(cid)
        while len(self._held) > HELD_THREADS:
            self._held.popitem(last=False)

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


def _appended(answer: Any) -> tuple[int, int]:
    """`_APPEND_LUA`'s answer: (position, the cache list's length or -1)."""
    pos, listed = answer
    return int(pos), int(listed)


def _head_id(blob: bytes) -> str:
    """The id of a spooled turn, from its JSON's head (`{"pos":…,"id":"<id>"`, Message.to_dict)."""
    start = blob.find(b'"id":"', 0, 40) + 6
    return blob[start : blob.find(b'"', start)].decode()


def _unstamp(out: asyncio.Future[Any], box: list[Stamp] | None, fut: asyncio.Future[Any]) -> None:
    """Pass a tracking connection's (reply, stamp) on to `out` as the reply alone, the stamp into
    `box` first (`_send_tracked`)."""
    if out.done():
        return
    if fut.cancelled():
        out.cancel()
    elif (exc := fut.exception()) is not None:
        out.set_exception(exc)
    else:
        reply, stamp = fut.result()
        if box is not None:
            box.append(stamp)
        out.set_result(reply)


def _seen(fut: asyncio.Future[Any]) -> None:
    """Retrieve a reply nobody waits for (its command is sent again another way)."""
    if not fut.cancelled():
        fut.exception()


def _has_conversation(entries: list[SpoolEntry]) -> bool:
    return any(e.kind == KIND_CONVERSATION for e in entries)
