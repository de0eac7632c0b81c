"""An exchange's position in its thread: taken from Redis, and given after the spool commit.

Order (docs/ARCHITECTURE.md, "Thread order"): the turns one call appends (chat's question and
answer) are one exchange and share one position `pos`, taken from the thread's counter in Redis
by the same script that extends the cache (thread_scripts.APPEND_LUA), so positions and the
cache never disagree and two sessions continuing one thread get positions 1, 2, 3, ... in the
order their appends reached Redis. Without Redis, a process continues after the highest
position it has seen (`Positions.position`; ties are kept together and broken by time).

The call does not wait for its position: the turns go to the spool's thread to be committed
with the position a placeholder (`Positions.commit_unplaced`) and, in the same turn of the
loop, the script goes out on the Redis tracking connection (its reply then confirms the held
copy it extends, held.py `HeldCopies.hold_appended`) or else the direct line
(`Positions.send_append`), beside the commit; the reply fills the position in memory
(`Positions.replied`); the flusher writes it into the turns before storing them
(`Positions.place_batch`), this process's reads wait for it (`Positions.placed`), and a
restarted process sends the script of turns left without one again (`Positions.recover`).

The thread store (instance/storage/history.py) owns what is done once an exchange has its
position (its cache bookkeeping, the `placed` callback) and the set of threads whose cache
missed appends (`dirty`, shared with this object).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from common.errors import StorageUnavailable
from common.keys import Keys
from instance.storage.cache import CacheDown, RedisGuard
from instance.storage.models import Message
from instance.storage.pool import Database
from instance.storage.spool import Spool, SpoolEntry
from instance.storage.thread_scripts import (
    APPEND_LUA,
    CACHE_TTL_MS,
    CREATE_LUA,
    POS_PLACEHOLDER,
    UNPLACED,
    append_args,
    appended,
    create_args,
)
from instance.storage.tracking import Stamp, Tracker
from instance.storage.validation import new_id
from instance.storage.writebehind import KIND_CACHE_MARK, KIND_MESSAGE

log = logging.getLogger(__name__)

PLACE_WAIT_S = 8.0
"""Longest a reader or the flusher waits for an exchange's position from Redis (the direct line
gives up after 5 s and redis-py's retry after its own socket timeout); then the local fallback."""
FLUSHED_KEEP_S = 5.0
"""How long the position of a turn stays in memory once the flusher stored it (for a read that
took the spool's rows just before)."""

Placed = Callable[[str, list[Message], bool, int, Stamp | None], None]
"""What the store does once an exchange is positioned: (thread, its turns, whether the cache saw
it, the cache list's length after it as APPEND_LUA returns it, the append reply's stamp)."""


@dataclasses.dataclass(eq=False)
class Exchange:
    """An exchange committed to the spool while its position is on its way from Redis (its
    append script written on the direct line, not waited for: `Positions.commit_unplaced`)."""

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


Sent = tuple[asyncio.Future[Any] | None, asyncio.Future[Any], int, list[Stamp] | None]
"""`Positions.send_append`'s answer: (the create's reply, the append's, the floor sent, the box
its reply's stamp goes in if sent on the tracking connection)."""


class Positions:
    """The positions of one process's exchanges: the sequencer's Redis side, the exchanges
    committed before their position came, and the recovery of a previous run's."""

    def __init__(
        self,
        *,
        db: Database,
        spool: Spool,
        cache: RedisGuard,
        keys: Keys,
        cache_turns: int,
        spool_sync: Literal["full", "normal"],
        tracker: Tracker | None,
        dirty: set[str],
        placed: Placed,
    ) -> None:
        self._db = db
        self._spool = spool
        self._cache = cache
        self._keys = keys
        self._turns = cache_turns
        self._sync: Literal["full", "normal"] = spool_sync  # EXAI_CHAT_SPOOL_SYNC
        self._tracker = tracker
        self._dirty = dirty  # the store's: threads whose cache missed appends
        self._on_placed = placed
        self._known: dict[str, int] = {}  # the highest exchange position seen per thread
        # (thread, turns, floor, create: the new thread's cache fields or None, answer)
        self._cache_queue: list[
            tuple[str, list[str], int, list[str] | None, asyncio.Future[tuple[int, int]]]
        ] = []
        self._cache_sender: asyncio.Task[None] | None = None
        # Positions that came after their turns were spooled (see `commit_unplaced`): by turn id,
        # the exchanges still waiting for theirs, and the positions of turns not stored yet.
        self._unplaced: dict[str, Exchange] = {}
        self._open: dict[str, list[Exchange]] = {}  # per thread, the exchanges in `_unplaced`
        self._positions: dict[str, int] = {}
        self._flushed: deque[tuple[float, list[str]]] = deque()  # turn ids stored, forgotten later
        self._background: set[asyncio.Task[Any]] = set()
        # Turns a previous run spooled without their position (it died before they were
        # stored): given theirs again before they are read or stored (`recover`).
        self._unrecovered = spool.rows > 0
        self._recover_lock = asyncio.Lock()
        self._recovery: asyncio.Task[None] | None = None
        self.after_commit_total = 0  # exchanges whose position came after their commit
        self.recovered_total = 0  # exchanges of a previous run given their position again
        self.tracked_appends_total = 0  # exchanges appended on the tracking connection

    @property
    def marking(self) -> bool:
        """Whether appends that miss Redis must leave a mark (only if a fleet cache may exist)."""
        return self._cache.redis is not None and self._turns > 0

    def note(self, cid: str, pos: int) -> None:
        """`pos` is a position of the thread: a floor for its next one, should Redis lose the counter."""
        if len(self._known) > 50_000:
            self._known.clear()  # only a floor for a lost counter: forgetting it is safe
        if pos > self._known.get(cid, -1):
            self._known[cid] = pos

    def unanswered(self, cid: str) -> bool:
        """Whether an exchange of the thread this process spooled still waits for its position."""
        return cid in self._open

    def needs_placing(self, cid: str) -> bool:
        """Whether a read of the thread must wait for `placed` first."""
        return cid in self._open or self._unrecovered

    # --- the sequencer: a position from Redis, or the local fallback --------------------------
    async def position(
        self,
        cid: str,
        blobs: list[str],
        create: list[str] | None = None,
        *,
        sent: tuple[asyncio.Future[Any] | None, asyncio.Future[Any]] | None = None,
        floor: int | None = None,
    ) -> tuple[int, bool, int]:
        """(the exchange's position, whether the cache saw it, the cache list's length after it as
        `APPEND_LUA` returns it) — from Redis when reachable.

        `blobs`: the turns as the cache stores them, their position a placeholder. `create`: the
        thread is new, and its (empty) cache is created just before, in the same round trip, with
        these metadata fields. `sent`: the create's and the append's replies, already written
        on the direct line with `floor` (`send_append`)."""
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
        return append_args(self._keys, self._turns, cid, floor, blobs)

    def _create_args(self, cid: str, create: list[str]) -> tuple[Any, ...]:
        return create_args(self._keys, cid, create)

    async def _cache_append(
        self,
        cid: str,
        blobs: list[str],
        floor: int,
        create: list[str] | None = None,
        already: tuple[asyncio.Future[Any] | None, asyncio.Future[Any]] | None = None,
    ) -> tuple[int, int]:
        """Take a position and write the turns through to Redis; concurrent appends share one
        pipelined round trip (like the spool's group commit). Returns `APPEND_LUA`'s answer
        (position, list length or -1). Raises CacheDown. `already`: the create's and the append's
        replies, written on the direct line already (a lost one is sent again by `reply`)."""
        append = ("EVAL", APPEND_LUA, *self._append_args(cid, floor, blobs))
        if already is not None:
            was_made, answer = already
            if was_made is not None and create is not None:
                await self._cache.reply(was_made, *self._create_args(cid, create))
            return appended(await self._cache.reply(answer, *append))
        if create is None:
            sent = self._cache.send_now(*append)
            if sent is not None:  # written now on the direct line: no task, no loop turn first
                return appended(await self._cache.reply(sent, *append))
        else:  # a new thread: its cache is created, then extended, both written now, in order
            made = self._create_args(cid, create)
            created = self._cache.send_now(*made)
            if created is not None:
                sent = self._cache.send_now(*append)
                if sent is not None:
                    await self._cache.reply(created, *made)
                    return appended(await self._cache.reply(sent, *append))
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
                        await r.eval(APPEND_LUA, *self._append_args(cid, floor, blobs))  # type: ignore[misc]
                    ]  # fmt: skip
                async with r.pipeline(transaction=False) as pipe:
                    for cid, blobs, floor, create, _ in group:
                        if create is not None:  # a new thread's cache first: the append extends it
                            pipe.eval(
                                CREATE_LUA, 2, self._keys.thread(cid), self._keys.thread_meta(cid),
                                CACHE_TTL_MS, *create,
                            )  # fmt: skip
                        pipe.eval(APPEND_LUA, *self._append_args(cid, floor, blobs))
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
                        fut.set_result(appended(answer))
                    except (TypeError, ValueError) as exc:
                        fut.set_exception(exc)

    # --- the append script sent without waiting -----------------------------------------------
    def send_append(self, cid: str, blobs: list[str], create: list[str] | None) -> Sent | None:
        """Write the exchange's append script (after a new thread's create script) now, without
        waiting for the reply: (the create's reply, the append's, the floor sent, the box its
        reply's stamp goes in if sent on the tracking connection), or None if no connection can
        take them now (nothing sent but a create, which is idempotent).

        On the tracking connection when it is up (docs/ARCHITECTURE.md, "Own appends on the
        tracking connection"): it tracks with NOLOOP, so the append invalidates nothing here,
        and its reply, stamped, confirms the held copy it extends (held.py,
        `HeldCopies.hold_appended`). Else on the direct line."""
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
        sent = self._cache.send_now("EVAL", APPEND_LUA, *self._append_args(cid, floor, blobs))
        if sent is None:
            if created is not None:
                created.add_done_callback(_seen)  # sent again with the append, the usual way
            return None
        return created, sent, floor, None

    def _send_tracked(
        self, cid: str, floor: int, blobs: list[str], create: list[str] | None
    ) -> tuple[asyncio.Future[Any] | None, asyncio.Future[Any], int, list[Stamp]] | None:
        """`send_append` on the tracking connection: its replies unwrapped from their stamps
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
        sent_append = tracker.send("EVAL", APPEND_LUA, *self._append_args(cid, floor, blobs))
        if sent_append is None:
            if created is not None:
                created.add_done_callback(_seen)  # sent again with the append, the usual way
            return None
        box: list[Stamp] = []
        sent: asyncio.Future[Any] = loop.create_future()
        sent_append.add_done_callback(functools.partial(_unstamp, sent, box))
        return created, sent, floor, box

    def can_send(self) -> bool:
        """Whether `send_append` would write now (the tracking connection or the direct line is
        up): `commit_unplaced` then takes the exchange; else its position comes first."""
        if self._cache.redis is None:
            return False
        tracker = self._tracker
        if tracker is not None and self._turns > 0 and tracker.writable():
            return True
        return self._cache.line_writable()

    async def commit_unplaced(
        self, cid: str, drafts: list[Message], blobs: list[str], create: list[str] | None
    ) -> list[Message]:
        """Commit the exchange's turns to the spool with their position still the placeholder,
        and write its append script to Redis while the spool's thread commits; return once the
        commit is done, without waiting for the script's reply.

        The rows go to the spool's thread first and the script (`send_append`) is written
        right after, in the same turn of the loop, so the thread's wake-up and the commit run
        beside the script's encoding and write. Redis runs one connection's commands in order,
        so this process's next read of the thread on the same line sees the append. The reply
        (usually back before the commit ends) gives the position (`replied`): kept in memory by
        turn id until the flusher has stored the turns, which it fills in first
        (`place_batch`); reads of this process's unflushed turns wait for it (`placed`). A
        lost reply, or a script no connection could take after all (`can_send` said one could),
        is taken as `position` does (sent through redis-py: the script is idempotent per
        exchange), else the local fallback (the highest position seen, plus one, and the cache
        marked dirty). A spool that refuses the rows (full) sends nothing.

        The commit failing after the script went: the exchange's position, when it comes, is
        only consumed (a gap in the thread, skipped once old); the caller drops the thread's
        cache."""
        loop = asyncio.get_running_loop()
        unsent: asyncio.Future[Any] = loop.create_future()  # the reply, until the script is written
        floor = self._known.get(cid, -1)
        ex = Exchange(cid, drafts, blobs, floor, create, None, unsent, loop.create_future())
        entries: list[tuple[str, dict[str, Any] | bytes]] = [(KIND_MESSAGE, b.encode()) for b in blobs]
        if cid in self._dirty and self.marking:  # the cache will not see it: mark it now
            entries.insert(0, (KIND_CACHE_MARK, {"id": new_id(), "conversation_id": cid}))
            ex.marked = True

        def send() -> None:  # the rows are on their way to the spool's thread
            for m in drafts:
                self._unplaced[m.id] = ex
            self._open.setdefault(cid, []).append(ex)
            try:
                sent = self.send_append(cid, blobs, create)
            except Exception:
                log.exception("writing thread %s's append script failed; sent again through redis-py", cid)
                sent = None
            if sent is None:
                # Not written after all: as a line lost with its reply, so the slow path sends
                # the script again through redis-py (`RedisGuard.reply`).
                unsent.set_exception(RedisConnectionError("no Redis connection took the append script"))
            else:
                ex.created, ex.sent, ex.floor, ex.stamps = sent
            ex.sent.add_done_callback(functools.partial(self.replied, ex))

        try:
            await self._spool.append_many(
                entries, thread_id=cid, eager=True, sync=self._sync, after_handoff=send
            )
        except Exception:
            ex.abandoned = True
            for m in drafts:
                self._positions.pop(m.id, None)
            raise
        if ex.pos is None:
            self.after_commit_total += 1
        return drafts

    def replied(self, ex: Exchange, sent: asyncio.Future[Any]) -> None:
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
                pos, listed = appended(sent.result())
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

    async def _place_slowly(self, ex: Exchange) -> None:
        """The reply was lost, an error, or no position: `position`'s way (re-sent through
        redis-py, the counter restarted past storage, or the local fallback).

        This process's earlier exchanges of the thread are placed first: their replies may
        have been lost with this one's, and a local position must come after theirs (the
        floor `ex` was sent with predates them)."""
        for earlier in list(self._open.get(ex.cid, ())):
            if earlier is ex:
                break
            await self.settle(earlier)
        floor = max(ex.floor, self._known.get(ex.cid, -1))
        try:
            pos, cached, listed = await self.position(
                ex.cid, ex.blobs, ex.create, sent=(ex.created, ex.sent), floor=floor
            )
        except Exception as exc:  # position falls back on its own; only storage reads raise here
            log.warning("thread %s: position by the fallback (%s: %s)", ex.cid, type(exc).__name__, exc)
            await self._place_fallback(ex)
            return
        self._place(ex, pos, cached, listed)

    async def _place_fallback(self, ex: Exchange) -> None:
        """Position `ex` without Redis: past the highest position seen, the cache marked dirty."""
        floor = self._known.get(ex.cid, -1)
        if floor < 0:
            with contextlib.suppress(Exception):
                floor = await self._floor_from_storage(ex.cid)
        if ex.pos is None:
            self._dirty.add(ex.cid)
            self._place(ex, max(floor, 0) + 1, False, -1)

    def _place(self, ex: Exchange, pos: int, cached: bool, listed: int, stamp: Stamp | None = None) -> None:
        """`ex` has its position: set it on its turns and keep it for the flusher and for reads
        of the spool; then what the store does after the commit when the cache saw the
        exchange (the `placed` callback: its ids as the thread's last, its turns held), or when
        it did not (that, and a cache mark spooled, if none went with the turns)."""
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
        self.note(cid, pos)
        if not ex.abandoned:
            for m in ex.messages:
                self._positions[m.id] = pos
            self._on_placed(cid, ex.messages, cached, listed, stamp)
            if not cached and self.marking and not ex.marked:
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

    async def settle(self, ex: Exchange) -> int:
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

    async def settle_earlier(self, cid: str) -> None:
        """Place this process's exchanges of the thread still waiting for their position (before
        one is positioned locally: it must come after theirs)."""
        for earlier in list(self._open.get(cid, ())):
            await self.settle(earlier)

    async def placed(self, cid: str) -> None:
        """Every exchange of the thread this process spooled has its position (in memory)."""
        if self._unrecovered and self._spool.has_pending(cid):
            await self._recover_now()
        while waiting := self._open.get(cid):
            await self.settle(waiting[0])

    def with_pos(self, m: Message) -> Message:
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
        (at most PLACE_WAIT_S), and a previous run's turns given theirs again (`recover`)."""
        out: list[SpoolEntry] | None = None
        for i, e in enumerate(batch):
            if e.kind != KIND_MESSAGE:
                continue
            blob = e.blob
            if not blob.startswith(UNPLACED):
                continue
            mid = _head_id(blob)
            pos = self._positions.get(mid)
            if pos is None:
                ex = self._unplaced.get(mid)
                if ex is not None:
                    pos = await self.settle(ex)
                else:  # spooled by a previous run
                    await self._recover_now(force=True)
                    pos = self._positions.get(mid)
            if pos is None:  # cannot happen: recovery positions every such row it finds
                log.error("spool row %d (thread %s) has no position; stored without one", e.seq, e.thread_id)
                continue
            if out is None:
                out = list(batch)
            out[i] = e.with_blob(b'{"pos":%d' % pos + blob[len(POS_PLACEHOLDER) :])
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

    # --- a previous run's turns ----------------------------------------------------------------
    async def _recover_now(self, *, force: bool = False) -> None:
        """Run `recover` once (or again, `force`), one at a time."""
        async with self._recover_lock:
            if self._unrecovered or force:
                await self.recover()
                self._unrecovered = False

    async def recover(self) -> None:
        """Give the turns a previous run spooled before their position came back their position.

        They are found by their JSON's head; an exchange's turns are consecutive rows of one
        thread with one time. Each exchange's append script is sent again, as it was: Redis
        answers the position it gave, by the exchange's first turn id, if the first one got
        there (nothing is appended twice), else gives a new one and extends the cache as it
        would have; without Redis, the local fallback (the cache marked dirty). In spool order,
        so a thread's exchanges keep their order."""
        found = await self._spool.find(KIND_MESSAGE, UNPLACED)
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
            pos, cached, _ = await self.position(cid, [e.blob.decode() for e in group])
            if not cached and self.marking:
                await self._spool_mark(cid)
            for e in group:
                self._positions[_head_id(e.blob)] = pos
            self.note(cid, pos)
            self.recovered_total += 1
        if groups:
            log.warning(
                "spool %s: %d exchanges of a previous run had no position yet; given theirs again",
                self._spool.path,
                len(groups),
            )

    def start(self) -> None:
        """Give the turns a previous run left without a position theirs (`recover`)."""
        if self._unrecovered and self._recovery is None:
            self._recovery = asyncio.create_task(self._recover_now(), name="exai-thread-positions")

    async def stop(self) -> None:
        # Positions and the marks they lead to, on their way (a position's task may start a mark's).
        for cid in list(self._open):
            await self.placed(cid)
        deadline = time.monotonic() + PLACE_WAIT_S
        while self._background and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(list(self._background), timeout=left)
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(BaseException):
                await self._recovery
            self._recovery = None


def _head_id(blob: bytes) -> str:
    """The id of a spooled turn, from its JSON's head (`{"pos":…,"id":"<id>"`, Message.to_dict)."""
    start = blob.find(b'"id":"', 0, 40) + 6
    return blob[start : blob.find(b'"', start)].decode()


def _unstamp(out: asyncio.Future[Any], box: list[Stamp] | None, fut: asyncio.Future[Any]) -> None:
    """Pass a tracking connection's (reply, stamp) on to `out` as the reply alone, the stamp into
    `box` first (`Positions._send_tracked`)."""
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
