"""A Redis connection on which a command is written the moment it is asked for.

redis-py's asyncio client yields to the event loop at least once between a call and writing the
command to the socket, so behind a busy loop (the sender's own answer being built and written)
a command waits until everything queued before it has run: a millisecond or more. A live
announcement of a group event (instance/links.py) is written here instead, straight from the
spool's commit callback, without a task or an await in between; so is the router's opening
script of a new session (router/opening.py). Replies are parsed by hiredis as they arrive and
set on the commands' futures from the connection's read callback.

The line is an optimisation, never the only way: `send` returns None while the line is down,
connecting or unusable (TLS, a Unix socket), and the caller takes its ordinary path through
redis-py. A command whose reply does not come within `timeout` fails, and so does every
command behind it (the line closes: with a reply missing, the order is no longer known).

`PubSubLine` is the same idea for the router's pub/sub connection (router/streams.py): each
message is parsed by hiredis as its bytes arrive and handed to the hub from the connection's
read callback, where redis-py's `get_message` runs a task of its own through its retry,
timeout and health-check layers before the hub sees it (about 0.15-0.25 ms more per message
on the development machine, under load).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

RETRY_AFTER = 1.0  # seconds between connection attempts while Redis is unreachable


class LineTimeout(RedisConnectionError):
    """No reply came within the line's timeout (the line closes; every command waiting on it
    fails with this). Redis may still run them: a caller must not take this as "not run"."""


def encode(args: tuple[Any, ...]) -> bytes:
    """A command in RESP (an array of bulk strings): hiredis packs it in C (str, bytes, int and
    float, the same bytes as below, 3-4 times faster for a session's opening script); anything
    else (a bool) takes the Python way."""
    try:
        return hiredis.pack_command(args)  # type: ignore[no-any-return]
    except TypeError:
        return _encode(args)


def _encode(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int | float):
            data = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Replies(asyncio.Protocol):
    """The line's connection: replies are parsed by hiredis (C) as their bytes arrive, and each
    is handed to the oldest command waiting, from the loop's read callback (no task between)."""

    def __init__(self, line: DirectLine) -> None:
        self.line = line
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.transport is not None and not self.transport.is_closing():
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.close(f"unreadable reply from Redis ({exc})")
                return
            if reply is False:
                return
            self.line._reply(self, reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.line._fail_all(RedisConnectionError("the direct Redis line closed"))
        if not self.lost.done():
            self.lost.set_result(None)

    def close(self, why: str) -> None:
        log.debug("direct Redis line closing: %s", why)
        self.line._fail_all(RedisConnectionError(f"the direct Redis line closed: {why}"))
        if self.transport is not None:
            self.transport.close()


def _plain_tcp(redis: Redis) -> bool:
    """True if `redis` connects over plain TCP (TLS and Unix sockets take redis-py's path)."""
    pool = redis.connection_pool
    return pool.connection_class is Connection and "host" in pool.connection_kwargs


def _setup_commands(kwargs: dict[str, Any]) -> list[tuple[Any, ...]]:
    """AUTH and SELECT as the pool's connections would send them."""
    setup: list[tuple[Any, ...]] = []
    password, username = kwargs.get("password"), kwargs.get("username")
    if password is not None:
        setup.append(("AUTH", username, password) if username else ("AUTH", password))
    if int(kwargs.get("db") or 0):
        setup.append(("SELECT", int(kwargs.get("db") or 0)))
    return setup


class DirectLine:
    """One Redis connection for commands that must leave at once (see the module docstring)."""

    def __init__(self, redis: Redis, *, timeout: float = 2.0) -> None:
        pool = redis.connection_pool
        kwargs = pool.connection_kwargs
        # Plain TCP only (TLS and Unix sockets take the ordinary path).
        self.usable = _plain_tcp(redis)
        self._host = str(kwargs.get("host", ""))
        self._port = int(kwargs.get("port") or 6379)
        self._setup = _setup_commands(kwargs)
        self._timeout = timeout
        self._conn: _Replies | None = None  # set while the line is up (connected, set up)
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._task: asyncio.Task[None] | None = None
        self._next_try = 0.0
        self._closed = False
        self.sent = 0
        self.failures = 0

    @property
    def up(self) -> bool:
        return self._conn is not None

    def _open_transport(self) -> asyncio.Transport | None:
        """The line's transport if a command can be written on it now."""
        conn = self._conn
        transport = conn.transport if conn is not None else None
        return None if transport is None or transport.is_closing() else transport

    def writable(self) -> bool:
        """Whether `send` would write now."""
        return self._open_transport() is not None

    def send(self, *args: Any) -> asyncio.Future[Any] | None:
        """Write the command now and return the future of its reply (a ResponseError reply is
        set as the exception); None if the line is not up (it starts connecting)."""
        transport = self._open_transport()
        if transport is None:
            self._start()
            return None
        return self._write(transport, args)

    def send_many(self, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]] | None:
        """`send` for several commands, written in one go (in order); their replies' futures,
        or None if the line is not up."""
        transport = self._open_transport()
        if transport is None:
            self._start()
            return None
        return self._write_many(transport, commands)

    def _write(self, transport: asyncio.Transport, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        return self._write_many(transport, [args])[0]

    def _write_many(
        self, transport: asyncio.Transport, commands: list[tuple[Any, ...]]
    ) -> list[asyncio.Future[Any]]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in commands]
        self._pending.extend(futures)
        transport.write(b"".join(encode(args) for args in commands))
        self.sent += len(commands)
        last = futures[-1]  # replies come in order: the last one's deadline covers them all
        handle = loop.call_later(self._timeout, self._expire, last)
        last.add_done_callback(lambda _: handle.cancel())
        return futures

    def _reply(self, conn: _Replies, reply: Any) -> None:
        if not self._pending:
            conn.close("a reply nobody asked for")
            return
        fut = self._pending.popleft()
        if fut.done():
            return  # its caller went away (cancelled) or it expired
        if isinstance(reply, ResponseError):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)

    def _start(self) -> None:
        if not self.usable or self._closed or (self._task is not None and not self._task.done()):
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_try:
            return
        self._next_try = loop.time() + RETRY_AFTER
        self._task = asyncio.create_task(self._run(), name="exai-redis-line")

    def start(self) -> None:
        """Connect in the background (a send before then takes the ordinary path)."""
        self._start()

    async def _run(self) -> None:
        conn: _Replies | None = None
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self._timeout):
                conn = _Replies(self)
                made = conn
                await loop.create_connection(lambda: made, self._host, self._port)
                assert conn.transport is not None
                for command in self._setup:
                    try:
                        await self._write(conn.transport, command)
                    except ResponseError as exc:
                        raise RedisConnectionError(f"{command[0]} refused: {exc}") from None
            self._conn = conn
            await conn.lost
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unreachable, closed, garbled: fail what waits, connect later
            log.debug("direct Redis line down: %s", exc)
        finally:
            self._conn = None
            self._fail_all(RedisConnectionError("the direct Redis line closed"))
            if conn is not None and conn.transport is not None:
                conn.transport.close()

    def _expire(self, fut: asyncio.Future[Any]) -> None:
        if fut.done():
            return
        self.failures += 1
        log.warning("no reply from Redis within %.1fs on the direct line; reconnecting", self._timeout)
        self._fail_all(LineTimeout("no reply from Redis in time"))
        conn = self._conn
        if conn is not None and conn.transport is not None:
            conn.transport.close()  # connection_lost ends the line's task, which clears the line

    def _fail_all(self, exc: Exception) -> None:
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(exc)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _PubSubReplies(asyncio.Protocol):
    """A pub/sub connection's protocol: pushed messages go to `on_message` as they are parsed;
    other replies (AUTH, SELECT while setting up) to the oldest waiting command."""

    def __init__(self, on_message: Callable[[dict[str, Any]], None]) -> None:
        self.on_message = on_message
        self.reader = hiredis.Reader(encoding="utf-8", errors="replace", replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.replies: deque[asyncio.Future[Any]] = deque()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.heard = asyncio.get_running_loop().time()  # when bytes last came from Redis
        self.ping_sent: float | None = None  # a health-check PING waits for its answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.heard = asyncio.get_running_loop().time()
        self.ping_sent = None  # anything from Redis shows the connection alive
        self.reader.feed(data)
        while self.transport is not None and not self.transport.is_closing():
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                log.warning("unreadable pub/sub reply from Redis (%s); reconnecting", exc)
                self.transport.close()
                return
            if reply is False:
                return
            if isinstance(reply, list) and len(reply) == 3 and isinstance(reply[0], str):
                try:  # message, subscribe, unsubscribe: as redis-py hands them out
                    self.on_message({"type": reply[0], "channel": reply[1], "data": reply[2]})
                except Exception:
                    log.exception("a pub/sub message handler failed")
            elif self.replies:
                fut = self.replies.popleft()
                if not fut.done():
                    (fut.set_exception if isinstance(reply, ResponseError) else fut.set_result)(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.replies:
            fut = self.replies.popleft()
            if not fut.done():
                fut.set_exception(RedisConnectionError("the pub/sub connection closed"))
        if not self.lost.done():
            self.lost.set_result(None)


class PubSubLine:
    """One Redis pub/sub connection whose messages are handed to `on_message` from the read
    callback (dicts with "type", "channel" and "data", as redis-py's `get_message` returns them
    with decode_responses). Plain TCP only: `usable(redis)` says whether it can be used; else
    the caller takes redis-py's PubSub."""

    def __init__(
        self,
        redis: Redis,
        on_message: Callable[[dict[str, Any]], None],
        *,
        timeout: float = 5.0,
        health_interval: float = 15.0,
    ) -> None:
        kwargs = redis.connection_pool.connection_kwargs
        self._host = str(kwargs.get("host", ""))
        self._port = int(kwargs.get("port") or 6379)
        self._setup = _setup_commands(kwargs)
        self._timeout = timeout
        self._health_interval = health_interval
        self._on_message = on_message
        self._conn: _PubSubReplies | None = None

    @staticmethod
    def usable(redis: Redis) -> bool:
        return _plain_tcp(redis)

    async def open(self) -> None:
        """Connect and set the connection up (AUTH, SELECT); raises a redis ConnectionError or
        TimeoutError if Redis cannot be reached."""
        loop = asyncio.get_running_loop()
        conn = _PubSubReplies(self._on_message)
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    await loop.create_connection(lambda: conn, self._host, self._port)
                except OSError as exc:
                    raise RedisConnectionError(f"cannot reach Redis for pub/sub: {exc}") from None
                for command in self._setup:
                    fut: asyncio.Future[Any] = loop.create_future()
                    conn.replies.append(fut)
                    self._write(conn, command)
                    try:
                        await fut
                    except ResponseError as exc:
                        raise RedisConnectionError(f"{command[0]} refused: {exc}") from None
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()
            raise
        self._conn = conn

    def _write(self, conn: _PubSubReplies, command: tuple[Any, ...]) -> None:
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise RedisConnectionError("the pub/sub connection closed")
        transport.write(encode(command))

    async def subscribe(self, *channels: str) -> None:
        """Ask for `channels` (each confirmation arrives as a "subscribe" message)."""
        if channels:
            self._write(self._require(), ("SUBSCRIBE", *channels))

    async def unsubscribe(self, *channels: str) -> None:
        if channels:
            self._write(self._require(), ("UNSUBSCRIBE", *channels))

    def _require(self) -> _PubSubReplies:
        if self._conn is None:
            raise RedisConnectionError("the pub/sub connection is not open")
        return self._conn

    async def wait_lost(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the connection to go away; True if it did.

        Also the health check (as redis-py's `health_check_interval`): after `health_interval`
        seconds without a byte from Redis a PING goes out, and a connection that still says
        nothing `timeout` seconds later is closed (a peer gone without a reset)."""
        conn = self._require()
        now = asyncio.get_running_loop().time()
        if conn.ping_sent is not None and now - conn.ping_sent > self._timeout:
            log.warning(
                "no answer from Redis on the pub/sub connection within %.1fs; reconnecting", self._timeout
            )
            if conn.transport is not None:
                conn.transport.close()
        elif conn.ping_sent is None and now - conn.heard >= self._health_interval:
            conn.ping_sent = now
            with contextlib.suppress(RedisConnectionError):
                self._write(conn, ("PING",))
        if not conn.lost.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await asyncio.shield(conn.lost)
        return conn.lost.done()

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()
