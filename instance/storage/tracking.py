"""Redis-assisted client-side caching: which copies this process holds are still what Redis has.

One connection per instance speaks RESP3 with `CLIENT TRACKING ON` (Redis's default tracking
mode): Redis remembers every key this connection reads (inside Lua scripts too) and, when any
client changes one of them (a write, a delete, an expiry, a FLUSHDB), pushes an `invalidate`
message naming it on this same connection, once, until the key is read here again. The reads
whose copies are kept (a thread's cache list, a note scope's copy) go on this connection
(`tracked`). A copy held in memory is *trusted*, i.e. used without asking Redis, only while
both hold:

- the connection has been up and set up continuously since the copy was read, and Redis was
  heard from lately (a reconnect, a lost connection, a Redis restart start a new epoch, and no
  copy of an older epoch is trusted again; a silence of SILENT_S suspends all trust until Redis
  speaks again, and a PING unanswered for `timeout` closes the connection; a read made on
  another connection is never trusted);
- no invalidation of the copy's keys has been processed since its read's reply (`unchanged`).

On one connection Redis answers in order, and it writes a key's invalidation to the connection
when the key changes: an invalidation processed before a read's reply is for a change the read
already saw, one processed after it may be for a later change and ends the copy's trust. So a
copy's stamp is taken when its reply is processed (invalidations are numbered in the order they
are processed), and this is exact: no change is missed, none made before the read costs a read.
A read sent here right after this process's own write on another connection confirms a copy
that holds the write: the write's invalidation was written before that read was even processed
(instance/storage/held.py, `HeldCopies.confirm`).

This process's own appends go on this connection too while it is up, and it tracks with NOLOOP:
a change made by this connection itself (inside a Lua script too, on Redis 7) is reported to
nobody here, so the append's stamped reply confirms the copy it extends with no read after it
(held.py, `HeldCopies.hold_appended`). Redis 6.2 reports it anyway, but before the reply: processed
before the stamp, it voids nothing. Only appends are written here: a note write must make its
writer's next read see it, so it stays on the other connections (and drops the writer's copy,
notes_cache.py).

Only the instances that read a key hear of its changes (broadcast mode, BCAST, would wake every
instance of the fleet on every append anywhere; measured in docs/BENCHMARKS.md, it cost more than
the reads it saved).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common.redis_line import _plain_tcp, _setup_commands, encode
from instance.storage.cache import RedisGuard

log = logging.getLogger(__name__)

RETRY_S = 1.0
"""Seconds between connection attempts while Redis is unreachable."""
HEALTH_S = 1.0
"""After this long without a byte from Redis the connection sends a PING."""
SILENT_S = 3.0
"""Nothing heard from Redis for this long: no copy is trusted until it speaks again."""
_PUSH: Any = getattr(hiredis, "PushNotification", None)
"""hiredis's type for RESP3 pushes (an older hiredis without it: no tracking)."""
KEYS_KEPT = 200_000
"""Invalidated key names remembered; past this the memory is cleared and every copy read again."""


@dataclasses.dataclass(frozen=True)
class Stamp:
    """When a copy was read: the connection's epoch and how many invalidations it had processed."""

    epoch: int
    seq: int


class _Conn(asyncio.Protocol):
    """The tracking connection: RESP3 replies and pushes parsed by hiredis as their bytes arrive."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace", replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.replies: deque[tuple[asyncio.Future[Any], bool]] = deque()  # (future, wants a stamp)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.heard = time.monotonic()
        self.ping_sent: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.heard = time.monotonic()
        self.ping_sent = None
        self.reader.feed(data)
        while self.transport is not None and not self.transport.is_closing():
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                log.warning("unreadable reply on the Redis tracking connection (%s); reconnecting", exc)
                self.transport.close()
                return
            if reply is False:
                return
            if isinstance(reply, _PUSH):
                self.tracker._pushed(self, list(reply))
                continue
            if not self.replies:
                log.warning("a reply nobody asked for on the Redis tracking connection; reconnecting")
                self.transport.close()
                return
            fut, stamped = self.replies.popleft()
            if fut.done():
                continue
            if isinstance(reply, ResponseError):
                fut.set_exception(reply)
            else:
                fut.set_result((reply, self.tracker._stamp_now()) if stamped else reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tracker._lost(self)
        while self.replies:
            fut, _ = self.replies.popleft()
            if not fut.done():
                fut.set_exception(RedisConnectionError("the Redis tracking connection closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    def write(self, args: Sequence[Any], *, stamped: bool = False) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.replies.append((fut, stamped))
        self.transport.write(encode(tuple(args)))
        return fut


class Tracker:
    """The tracking connection of one process (see the module docstring). Without Redis, over
    TLS or a Unix socket (`usable` False), or while the connection is down, `stamp` is None and
    nothing is trusted: every read goes to Redis as it would without tracking."""

    def __init__(self, redis: Redis | None, *, timeout: float = 5.0) -> None:
        self.usable = redis is not None and _plain_tcp(redis) and _PUSH is not None
        kwargs = redis.connection_pool.connection_kwargs if redis is not None else {}
        self._host = str(kwargs.get("host", ""))
        self._port = int(kwargs.get("port") or 6379)
        self._setup = _setup_commands(kwargs)
        self._timeout = timeout
        self._conn: _Conn | None = None  # set once tracking is on; None while down
        self._task: asyncio.Task[None] | None = None
        self._epoch = 0
        self._seq = 0  # invalidation messages processed (in this process's lifetime)
        self._last: dict[str, int] = {}  # key -> seq of its latest invalidation
        self._floor = 0  # every stamp below this is void (a flush, or the key memory cleared)
        self.client_id: int | None = None  # the connection's CLIENT ID while it is up
        self.invalidations_total = 0  # keys named by invalidation messages
        self.flushes_total = 0  # "everything" invalidations (FLUSHDB/FLUSHALL) and memory clears
        self.connects_total = 0  # times tracking was switched on (a new epoch each)
        self.losses_total = 0  # times the connection was lost once tracking was on

    @property
    def up(self) -> bool:
        """Tracking is on and Redis was heard from recently: stamps taken now can be trusted."""
        conn = self._conn
        return conn is not None and time.monotonic() - conn.heard < SILENT_S

    def _stamp_now(self) -> Stamp:
        return Stamp(self._epoch, self._seq)

    def unchanged(self, stamp: Stamp | None, *keys: str) -> bool:
        """Whether nothing has invalidated `keys` since `stamp` (and the connection held throughout)."""
        if stamp is None or stamp.epoch != self._epoch or stamp.seq < self._floor or not self.up:
            return False
        last = self._last
        return all(last.get(k, -1) <= stamp.seq for k in keys)

    def writable(self) -> bool:
        """Whether `send` would write now."""
        conn = self._conn
        return conn is not None and conn.transport is not None and not conn.transport.is_closing() and self.up

    def send(self, *args: Any) -> asyncio.Future[tuple[Any, Stamp]] | None:
        """Write a command on the tracking connection now; its future gives (reply, the stamp when
        the reply was processed). None while tracking is not on."""
        conn = self._conn
        if conn is None or not self.writable():
            return None
        fut = conn.write(args, stamped=True)
        # As the direct line: no reply in time and the connection closes (every command waiting on
        # it fails, and its callers take the ordinary path); replies come in order.
        handle = asyncio.get_running_loop().call_later(self._timeout, self._expire, conn, fut)
        fut.add_done_callback(lambda _: handle.cancel())
        return fut

    def _expire(self, conn: _Conn, fut: asyncio.Future[Any]) -> None:
        if not fut.done() and conn.transport is not None:
            log.warning("no reply from Redis in %.1fs (tracking connection); reconnecting", self._timeout)
            conn.transport.close()

    # --- the connection ----------------------------------------------------------------------
    def start(self) -> None:
        if self.usable and self._task is None:
            self._task = asyncio.create_task(self._run(), name="exai-redis-tracking")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self._connect_and_serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # unreachable, refused, garbled: trust nothing, try again
                log.debug("Redis tracking connection down: %s", exc)
            await asyncio.sleep(RETRY_S)

    async def _connect_and_serve(self) -> None:
        loop = asyncio.get_running_loop()
        conn = _Conn(self)
        try:
            async with asyncio.timeout(self._timeout):
                await loop.create_connection(lambda: conn, self._host, self._port)
                for command in self._setup:  # AUTH, SELECT
                    await conn.write(command)
                await conn.write(("HELLO", "3"))
                self.client_id = int(await conn.write(("CLIENT", "ID")))
                # NOLOOP: this connection's own writes (this process's appends) report nothing
                # to it (held.py `HeldCopies.hold_appended`); nothing else writes on it.
                await conn.write(("CLIENT", "TRACKING", "ON", "NOLOOP"))
            # Every copy read before now was read without this connection: a new epoch.
            self._epoch += 1
            self._conn = conn
            self.connects_total += 1
            log.info("Redis tracking on (client %s): held copies trusted until invalidated", self.client_id)
            while not conn.lost.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEALTH_S):
                        await asyncio.shield(conn.lost)
                now = time.monotonic()
                if conn.ping_sent is not None and now - conn.ping_sent > self._timeout:
                    log.warning("no answer from Redis on the tracking connection; reconnecting")
                    if conn.transport is not None:
                        conn.transport.close()
                elif conn.ping_sent is None and now - conn.heard >= HEALTH_S and not conn.lost.done():
                    conn.ping_sent = now
                    ping = conn.write(("PING",))
                    ping.add_done_callback(_retrieve)
        finally:
            self._lost(conn)
            if conn.transport is not None:
                conn.transport.close()

    def _lost(self, conn: _Conn) -> None:
        if self._conn is conn:
            self._conn = None
            self.client_id = None
            self._epoch += 1  # every stamp taken so far is void
            self.losses_total += 1
            log.info("Redis tracking connection lost: held copies are read from Redis again")

    def _pushed(self, conn: _Conn, push: list[Any]) -> None:
        if not push or push[0] != "invalidate":
            return
        self._seq += 1
        keys = push[1] if len(push) > 1 else None
        if keys is None:  # FLUSHDB / FLUSHALL: everything
            self._floor = self._seq
            self.flushes_total += 1
            return
        last, seq = self._last, self._seq
        for key in keys:
            last[key] = seq
        self.invalidations_total += len(keys)
        if len(last) > KEYS_KEPT:
            last.clear()
            self._floor = seq + 1  # a cleared key could not say it changed: trust nothing older
            self._seq = seq + 1
            self.flushes_total += 1

    def stats(self) -> dict[str, int]:
        return {
            "invalidations_total": self.invalidations_total,
            "flushes_total": self.flushes_total,
            "connects_total": self.connects_total,
            "losses_total": self.losses_total,
        }


async def tracked(tracker: Tracker | None, guard: RedisGuard, *args: Any) -> tuple[Any, Stamp | None]:
    """One read: on the tracking connection when it is up ((reply, its stamp)), else as the guard
    sends it ((reply, None): not to be trusted later). Raises CacheDown as the guard does."""
    sent = tracker.send(*args) if tracker is not None else None
    if sent is not None:
        try:
            return await sent
        except RedisConnectionError:
            pass  # lost on the way: the ordinary path
    return await guard.command(*args, batched=True), None


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
