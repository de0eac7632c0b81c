"""The router's HTTP clients towards its instances.

`Relay` carries every proxied /mcp call: a small HTTP/1.1 keep-alive pool on plain asyncio
protocols with httptools' C parser. A call is one pre-built block of bytes (request line,
headers and body) written at once; the answer is parsed as it arrives and handed over either
whole (a JSON answer of known length) or chunk by chunk (SSE and everything else). At most
CALLS_PER_INSTANCE connections per instance; further calls wait for one to come free. An
instance serves one session, so this only bounds what one client can have in flight at once.

`calls` (aiohttp's ClientSession) carries the router's own control requests (health, reset,
replayed initialize, DELETE): rare, and not worth a second code path.

Which failures mean "the call never reached the instance" (so it may be sent again anywhere)
is decided here, once: `NotSent` for a refused or timed-out connect, for a pooled connection
that its peer had already closed, and for a connection lost before the request's bytes had
left the router; `Lost` for everything after the request went out (the instance may have run
it). A pooled connection whose peer closes it is dropped the moment the event loop sees the
EOF (the protocol's connection_lost), so no per-call poll of the socket is needed: when an
instance process dies, its connections leave the pool before the next call picks one.

An instance answers every call of a kind with the same header lines but for Date and
Content-Length. A connection keeps the head of its last answer that came whole in one read
(`_SameAnswer`) and takes the next read that is exactly that head, with other Date and
Content-Length values, and its body without the parser (no callback per header), with the
relayed header lines the proxy derived from the first one; any other read goes to the parser.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import httptools  # type: ignore[import-untyped]
from multidict import CIMultiDict

CALLS_PER_INSTANCE = 32
KEEPALIVE_TIMEOUT = 30.0
CONNECT_TIMEOUT = 3.0
# An answer's body is buffered up to this many bytes before the instance is asked to pause
# (the client reads slower than the instance writes).
HIGH_WATER = 256 * 1024
# An answer the caller has all it needs of (`Response.drain`) is read to its end for at most
# this long in silence, and this much more of it, before its connection is closed instead.
DRAIN_TIMEOUT = 5.0
DRAIN_LIMIT = 64 * 1024

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """A proxied call failed between the router and the instance."""


class NotSent(UpstreamError):
    """Nothing of the call reached the instance: it may be sent again, to any instance."""


class Lost(UpstreamError):
    """The call went out and its answer did not (fully) come back: the instance may have run it."""

    def __init__(self, message: str, *, silent: bool = False) -> None:
        super().__init__(message)
        self.silent = silent  # nothing arrived for read_timeout seconds


class _Conn(asyncio.Protocol):
    """One keep-alive connection to an instance, parsing answers with httptools."""

    __slots__ = (
        "closed",
        "idle_since",
        "key",
        "loop",
        "parser",
        "pool",
        "resp",
        "reused",
        "same",
        "silence",
        "timer",
        "timer_due",
        "transport",
        "wait_started",
    )  # fmt: skip

    def __init__(self, pool: _HostPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        # One silence timer per connection, not one per wait: a wait only notes when it began,
        # and the timer, when it fires, either expires the wait or sleeps until it could.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        self.wait_started = 0.0
        self.silence = 0.0
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.resp: Response | None = None
        self.reused = False
        self.same: _SameAnswer | None = None  # the last whole answer's head (see _SameAnswer)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # an idle connection never has anything to read: drop it
            self.close()
            return
        fresh = not resp.got_bytes
        resp.got_bytes = True
        same = self.same
        if not (fresh and same is not None and same.take(resp, data)):
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                resp._fail(Lost(f"unreadable answer ({exc})"))
                self.close()
            else:
                if fresh and resp.complete:
                    self.same = _SameAnswer.of(resp, data)
        if resp.notify is not None:  # after the parser is done with this read, never inside it
            resp.notify(False)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self.pool.lost(self)
        resp = self.resp
        if resp is not None and not resp.complete:
            # The request went out (send() checked that the write did not fail): ambiguous.
            why = exc.__class__.__name__ if exc is not None else "ServerDisconnected"
            resp._fail(Lost(why))
            if resp.notify is not None:
                resp.notify(False)

    def pause_writing(self) -> None:  # a large body waits in the transport's buffer
        pass

    def resume_writing(self) -> None:
        pass

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        if self.resp is not None:
            self.resp.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp is not None:
            self.resp.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is not None:
            resp.status = self.parser.get_status_code()
            resp.keep_alive = self.parser.should_keep_alive()
            resp._headers_done()

    def on_body(self, body: bytes) -> None:
        if self.resp is not None:
            self.resp._feed(body)

    def on_message_complete(self) -> None:
        if self.resp is not None:
            self.resp._complete()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.pool.lost(self)
        self._disarm()

    # the silence timer
    def watch(self, timeout: float) -> None:
        """A wait of at most `timeout` seconds of silence begins now."""
        now = self.loop.time()
        self.wait_started = now
        self.silence = timeout
        due = now + timeout
        if self.timer is not None and self.timer_due > due:
            self.timer.cancel()  # armed for a longer silence than this wait allows
            self.timer = None
        if self.timer is None:
            self.timer_due = due
            self.timer = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        self.timer = None
        resp = self.resp
        waiter = resp._waiter if resp is not None else None
        watched = waiter is not None and not waiter.done()
        if resp is None or not self.silence or not (watched or resp.notify is not None):
            return  # nobody waits (or the wait has no limit): the next wait arms the timer again
        due = self.wait_started + self.silence
        if self.loop.time() >= due:
            if waiter is not None and watched:
                waiter.set_exception(TimeoutError())
            elif resp.notify is not None:
                resp.notify(True)
        else:
            self.timer_due = due
            self.timer = self.loop.call_at(due, self._check)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _SameAnswer:
    """A connection's last answer head, to take the next answer that came whole in one read
    and whose head is the same bytes but for its Date and Content-Length values without
    parsing it again: an instance sends the same headers with every answer of a kind.
    httptools parsed and accepted these bytes (status line, one `Name: value` line per
    header, no body framing but Content-Length), so the same bytes with another length and
    date (neither holding a line break) parse the same way; the read must then be exactly
    head and body. The relayed header lines, which depend only on the other lines, are kept
    here too (`memo`, for the proxy's `_answer_fields`)."""

    __slots__ = (
        "date_at", "keep_alive", "last", "length_at", "memo", "pieces", "raw", "reason", "status",
        "values",
    )  # fmt: skip

    def __init__(
        self,
        head: bytes,
        spans: list[tuple[int, int, int]],
        raw: list[tuple[bytes, bytes]],
        length_at: int,
        date_at: int,
        resp: Response,
    ) -> None:
        # The head cut around its varying values (`spans`: start, end, index into raw, in
        # order): the fixed bytes before each value, and after the last one (to the blank line).
        cuts = [0]
        for start, end, _ in spans:
            cuts += (start, end)
        cuts.append(len(head))
        self.pieces = tuple(head[cuts[i] : cuts[i + 1]] for i in range(0, len(cuts) - 2, 2))
        self.last = head[cuts[-2] :]
        self.values = tuple(at for _, _, at in spans)  # which header each value is
        self.raw = raw
        self.length_at = length_at
        self.date_at = date_at  # -1: no Date header
        self.status = resp.status
        self.reason = resp.reason
        self.keep_alive = resp.keep_alive
        self.memo: dict[tuple[str | None, bool], tuple[bytes, str]] = {}

    @classmethod
    def of(cls, resp: Response, data: bytes) -> _SameAnswer | None:
        """The head of the answer httptools just parsed whole from `data` alone, or None when
        it is not one plain head with a Content-Length line and that body, nothing more."""
        if resp.error is not None or not resp.keep_alive or not resp.status:
            return None
        end = data.find(b"\r\n\r\n")
        raw = resp.raw_headers
        if end < 0 or len(data) - end - 4 != resp._size:
            return None
        lines = data[:end].split(b"\r\n")
        if len(lines) != len(raw) + 1:
            return None
        length_at = date_at = -1
        spans = []
        at = len(lines[0]) + 2  # where the header's line begins
        for i, (name, value) in enumerate(raw):
            line = lines[i + 1]
            if line != b"%s: %s" % (name, value):
                return None  # spelled another way (spaces, folding): not taken
            low = name.lower()
            if low == b"content-length" or low == b"date":
                if low == b"content-length":
                    if length_at >= 0 or not value.isdigit() or int(value) != resp._size:
                        return None
                    length_at = i
                else:
                    if date_at >= 0:
                        return None
                    date_at = i
                spans.append((at + len(name) + 2, at + len(line), i))
            elif low == b"transfer-encoding":
                return None
            at += len(line) + 2
        if length_at < 0:
            return None
        return cls(data[: end + 4], spans, list(raw), length_at, date_at, resp)

    def take(self, resp: Response, data: bytes) -> bool:
        """Fill `resp` from `data` when it is exactly one answer with this head; else False
        (nothing changed: the parser reads it)."""
        at = length = 0
        raw = None
        for piece, header in zip(self.pieces, self.values, strict=True):
            if not data.startswith(piece, at):
                return False
            at += len(piece)
            end = data.find(b"\r", at, at + 100)
            if end < 0:
                return False
            value = data[at:end]
            if header == self.length_at:
                if not value.isdigit() or len(value) > 12:
                    return False
                length = int(value)
            elif b"\n" in value:
                return False
            if raw is None:
                raw = self.raw.copy()
            raw[header] = (raw[header][0], value)
            at = end
        last = self.last
        if not data.startswith(last, at):
            return False
        at += len(last)
        if len(data) - at != length:
            return False
        resp.status = self.status
        resp.reason = self.reason
        resp.keep_alive = self.keep_alive
        resp.raw_headers = raw  # type: ignore[assignment]  # the length's value at least
        resp.memo = self.memo
        resp.length = length
        if length:
            resp._feed(data[at:])
        resp._complete()
        return True


class Response:
    """An instance's answer as it arrives. `release()` (or `close()`) must follow, always."""

    __slots__ = (
        "_chunks",
        "_headers",
        "_loop",
        "_paused",
        "_released",
        "_size",
        "_waiter",
        "_whole",
        "complete",
        "conn",
        "error",
        "extra",
        "got_bytes",
        "keep_alive",
        "length",
        "memo",
        "notify",
        "raw_headers",
        "reason",
        "status",
    )  # fmt: skip

    def __init__(self, conn: _Conn, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = conn
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.complete = False
        self.got_bytes = False
        self.error: UpstreamError | None = None
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._waiter: asyncio.Future[None] | None = None
        self._headers: CIMultiDict[str] | None = None
        self._released = False
        self._paused = False
        self._whole = False  # read() takes the body whole: no read-ahead limit
        self.extra = 0  # bytes (but white space) that came after the caller had all it needed
        # An answer taken by its connection's `_SameAnswer`: its Content-Length, and where the
        # relayed header lines of answers with its head are kept.
        self.length: int | None = None
        self.memo: dict[tuple[str | None, bool], tuple[bytes, str]] | None = None
        self._loop = loop
        # Called (timed_out) after each read, loss or silence when a caller follows the answer
        # without waiting on it (router/express.py); None while a task waits on it.
        self.notify: Callable[[bool], None] | None = None

    # --- fed by the connection -----------------------------------------------------------
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _headers_done(self) -> None:
        self._wake()

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        transport = self.conn.transport
        if self._size > HIGH_WATER and not self._paused and not self._whole and transport is not None:
            self._paused = True
            transport.pause_reading()
        self._wake()

    def _complete(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()

    async def _wait(self, timeout: float | None) -> None:
        """Until the connection reports something, or `timeout` seconds of silence."""
        waiter = self._waiter = self._loop.create_future()
        if timeout:
            self.conn.watch(timeout)
        else:
            self.conn.silence = 0.0  # an armed timer leaves this wait alone
        try:
            await waiter
        finally:
            self._waiter = None

    async def _wait_or_lost(self, timeout: float | None) -> None:
        """`_wait`, with `timeout` seconds of silence reported as a silent instance."""
        try:
            await self._wait(timeout)
        except TimeoutError:
            raise Lost(f"nothing for {timeout:g}s", silent=True) from None

    async def wait_headers(self, timeout: float | None) -> None:
        while not self.status:
            if self.error is not None:
                raise self.error
            await self._wait_or_lost(timeout)

    # --- read by the proxy ---------------------------------------------------------------
    @property
    def headers(self) -> CIMultiDict[str]:
        if self._headers is None:
            self._headers = CIMultiDict(
                (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for k, v in self.raw_headers
            )
        return self._headers

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self, timeout: float | None) -> bytes:
        """The whole body (its length is known to be small: up to the proxy's 1 MiB). The read-ahead
        limit is for copying, where `take` resumes reading: a whole answer is read past it."""
        self._whole = True
        if self._paused and self.conn.transport is not None and not self.conn.closed:
            self._paused = False
            self.conn.transport.resume_reading()
        while not self.complete:
            if self.error is not None:
                raise self.error
            await self._wait_or_lost(timeout)
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        return data

    async def read_some(self, limit: int) -> bytes:
        """Up to `limit` bytes of what has come (for an error's detail); b"" if nothing yet."""
        if not self._chunks and not self.complete and self.error is None:
            try:
                await self._wait(2.0)
            except TimeoutError:
                return b""
        data = b"".join(self._chunks)[:limit]
        self._chunks.clear()
        self._size = 0
        return data

    async def iter_chunks(self, timeout: float | None) -> AsyncIterator[bytes]:
        """The body as it arrives; Lost if the instance goes away or stays silent too long."""
        while True:
            if self._chunks:
                yield self.take()
                continue
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            await self._wait_or_lost(timeout)

    def take(self) -> bytes:
        """What has come of the body since the last take (reading resumes if it was paused)."""
        data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks.clear()
        self._size = 0
        if self._paused and self.conn.transport is not None and not self.conn.closed:
            self._paused = False
            self.conn.transport.resume_reading()
        return data

    @property
    def has_data(self) -> bool:
        """Has part of the body (or its end) already come?"""
        return bool(self._chunks) or self.complete

    @property
    def at_eof(self) -> bool:
        return self.complete and not self._chunks

    def release(self) -> None:
        """Give the connection back if the answer was read to its end, else close it."""
        if self._released:
            return
        self._released = True
        conn = self.conn
        if self.complete and self.keep_alive and self.error is None and not conn.closed:
            if self._paused and conn.transport is not None:
                conn.transport.resume_reading()  # idle, it must see the instance's EOF
            conn.pool.put(conn)
        else:
            conn.close()
            conn.pool.done(conn)

    def drain(self, extra: bytes = b"") -> None:
        """The caller has all it needs of this answer, though the instance has not ended it
        yet (`extra`: what of it the caller got past that): read it to its end here, then
        give the connection back. It is closed instead when the instance stays silent for
        DRAIN_TIMEOUT, sends more than DRAIN_LIMIT bytes, or goes away. Anything but white
        space is logged (nobody reads it)."""
        if self._released:
            return
        self.extra += len(extra.strip())
        self._drained(False)

    def _drained(self, timed_out: bool) -> None:
        for data in self._chunks:
            self.extra += len(data.strip())
        self._chunks.clear()
        self._size = 0
        conn = self.conn
        if self._paused and conn.transport is not None and not conn.closed:
            self._paused = False
            conn.transport.resume_reading()
        if not (timed_out or self.complete or self.error is not None or self.extra > DRAIN_LIMIT):
            self.notify = self._drained
            conn.watch(DRAIN_TIMEOUT)
            return
        self.notify = None
        if self.extra:
            log.warning(
                "instance %s:%d sent %d more bytes after the response it answered a call with;"
                " not relayed (the client's answer had ended)",
                conn.pool.host, conn.pool.port, self.extra,
            )  # fmt: skip
        if timed_out and self.error is None:
            self.error = Lost(f"no end within {DRAIN_TIMEOUT:g}s of its response", silent=True)
        if self.extra > DRAIN_LIMIT:
            self.close()
        else:
            self.release()  # closes the connection unless the answer ended cleanly

    def close(self) -> None:
        """Drop the connection (the instance sees the call cancelled)."""
        if self._released:
            return
        self._released = True
        self.conn.close()
        self.conn.pool.done(self.conn)


class _HostPool:
    """Connections to one instance (host, port): idle ones, and a bound on those in use."""

    def __init__(self, relay: Relay, host: str, port: int) -> None:
        self.relay = relay
        self.host = host
        self.port = port
        self.idle: list[_Conn] = []
        self.busy = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self, *, fresh: bool = False) -> _Conn:
        while self.busy >= CALLS_PER_INSTANCE:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._wake_next()  # pass the slot on
                raise
        self.busy += 1
        if not fresh:
            conn = self._pop_idle()
            if conn is not None:
                return conn
        try:
            return await self._connect()
        except BaseException:
            self.busy -= 1
            self._wake_next()
            raise

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        conn = _Conn(self)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: conn, self.host, self.port)
        except TimeoutError:
            raise NotSent(f"connect timed out after {CONNECT_TIMEOUT:g}s") from None
        except OSError as exc:
            raise NotSent(f"connect failed ({exc.__class__.__name__}: {exc.strerror or exc})") from None
        return conn

    def _pop_idle(self) -> _Conn | None:
        """The most recently used idle connection that can still be used (least likely stale)."""
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now - conn.idle_since > KEEPALIVE_TIMEOUT:
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.close()
                continue
            conn.reused = True
            return conn
        return None

    def take_idle(self) -> _Conn | None:
        """An idle connection, counted busy, or None (no waiting, no connecting)."""
        conn = self._pop_idle()
        if conn is not None:
            self.busy += 1
        return conn

    def put(self, conn: _Conn) -> None:
        conn.resp = None
        conn.idle_since = time.monotonic()
        self.idle.append(conn)
        self.busy -= 1
        self._wake_next()

    def done(self, conn: _Conn) -> None:
        """A busy connection was closed instead of given back."""
        conn.resp = None
        self.busy -= 1
        self._wake_next()

    def lost(self, conn: _Conn) -> None:
        if conn.resp is None and conn in self.idle:
            self.idle.remove(conn)
            self.relay.stale_dropped += 1

    def _wake_next(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return


class Relay:
    """The keep-alive pools for proxied calls, one per instance address."""

    def __init__(self) -> None:
        self.pools: dict[tuple[str, int], _HostPool] = {}
        self.stale_dropped = 0

    def pool(self, host: str, port: int) -> _HostPool:
        key = (host, port)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = _HostPool(self, host, port)
        return pool

    async def send(
        self, host: str, port: int, head: bytes, body: bytes | None, timeout: float | None
    ) -> Response:
        """Send one request (`head` ends with the blank line) and wait for the answer's headers.

        Raises NotSent when nothing reached the instance, Lost when the call went out and
        no answer's headers came back. The caller must release() or close() the Response.
        """
        pool = self.pool(host, port)
        data = head + body if body and len(body) < 65536 else None  # one send() on the usual path
        fresh = False
        while True:
            conn = await pool.acquire(fresh=fresh)
            resp = Response(conn, conn.loop)
            conn.resp = resp
            transport = conn.transport
            try:
                if transport is None or conn.closed:
                    raise NotSent("connection closed before the call was sent")
                if data is not None:
                    transport.write(data)
                else:
                    transport.write(head)
                    if body:
                        transport.write(body)
                if transport.is_closing():
                    # The send failed at once (the peer had reset the connection): nothing
                    # went out that the instance could have acted on.
                    raise NotSent("the connection failed while the call was written")
                await resp.wait_headers(timeout)
            except NotSent:
                resp.close()
                if conn.reused and not fresh:
                    # A pooled connection the instance had dropped: try once on a new one
                    # (refused there means the instance really is gone).
                    self.stale_dropped += 1
                    fresh = True
                    continue
                raise
            except BaseException:
                resp.close()
                raise
            return resp

    def send_now(self, host: str, port: int, data: bytes, timeout: float | None) -> Response | None:
        """Send one request (head and body in `data`) on an idle pooled connection, without
        waiting for anything: the answer's Response, whose `notify` the caller sets at once, or
        None when no idle connection is free or the write failed at once (nothing went out
        that the instance could act on; `send` is the way then)."""
        pool = self.pools.get((host, port))
        if pool is None or pool.busy >= CALLS_PER_INSTANCE or pool.waiters:
            return None
        conn = pool.take_idle()
        if conn is None:
            return None
        transport = conn.transport
        assert transport is not None
        transport.write(data)  # first: nothing is read before this returns to the loop
        resp = conn.resp = Response(conn, conn.loop)
        if transport.is_closing():  # the instance had dropped the connection
            self.stale_dropped += 1
            resp.close()
            return None
        if timeout:
            conn.watch(timeout)
        else:
            conn.silence = 0.0
        return resp

    async def resume(self, resp: Response, timeout: float | None) -> Response:
        """Wait for the headers of an answer `send_now` began (as `send` does for its own)."""
        resp.notify = None
        try:
            await resp.wait_headers(timeout)
        except BaseException:
            resp.close()
            raise
        return resp

    def prune(self, live: set[tuple[str, int]]) -> int:
        """Drop the pools of addresses no longer in use (`live`: the registry's instances and
        the bound sessions' targets), closing their idle connections; a pool with a call in
        flight or waiting stays until a later round. Instances come and go (k8s gives each new
        pod a new address), so the pools would otherwise grow for the router's lifetime.
        Returns how many pools went."""
        gone = [
            key for key, pool in self.pools.items() if key not in live and not pool.busy and not pool.waiters
        ]
        for key in gone:
            pool = self.pools.pop(key)
            for conn in list(pool.idle):
                conn.close()
            pool.idle.clear()
        return len(gone)

    async def close(self) -> None:
        for pool in self.pools.values():
            for conn in list(pool.idle):
                conn.close()
            pool.idle.clear()


@dataclass
class Upstream:
    calls: aiohttp.ClientSession
    relay: Relay

    @classmethod
    def create(cls, max_instances: int) -> Upstream:
        connector = aiohttp.TCPConnector(
            limit=CALLS_PER_INSTANCE * max_instances,
            limit_per_host=CALLS_PER_INSTANCE,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            ttl_dns_cache=None,
        )
        calls = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(None)
        )
        return cls(calls=calls, relay=Relay())

    @property
    def stale_dropped(self) -> int:
        return self.relay.stale_dropped

    async def close(self) -> None:
        await self.relay.close()
        await self.calls.close()


def header_block(lines: list[tuple[str, str]]) -> bytes:
    """Header lines as bytes; a value with a line break or NUL cannot be sent (ValueError)."""
    out = []
    for k, v in lines:
        if "\r" in v or "\n" in v or "\0" in v:
            raise ValueError(f"header {k} has a line break in its value")
        out.append(f"{k}: {v}\r\n")
    return "".join(out).encode("utf-8", "surrogateescape")
