"""The provider calls' HTTP/1.1 client: keep-alive connections on asyncio protocols, answers
parsed by httptools' C parser.

A chat call makes one provider request, and the client's own work on it is part of the fleet's
overhead on every chat. aiohttp's client, used before, builds a request object, merges header
tables, runs its cookie jar and trace hooks and parses the answer through its stream reader for
each call: side by side against the fake provider on loopback (`tests/bench/bench_provider_http.py`)
that cost about 0.7 ms per call more than this client, which writes one prebuilt block of bytes
(request line, headers, body) and hands the parsed body over as it arrives.

What it does, all of it for one origin (scheme, host, port) per `Connections`:
- HTTPS through the standard library's TLS (the provider's `tls_context`, SNI, certificate
  checks), HTTP on loopback for tests;
- keep-alive: a finished answer's connection goes back to the pool unless the server said
  `Connection: close`; idle connections are closed after KEEPALIVE_S, and one the server has
  closed leaves the pool the moment the event loop sees its end (no per-call check);
- answers with `Content-Length`, chunked, or ended by the connection's close; `gzip` and
  `deflate` bodies are decompressed (none is asked for: no `Accept-Encoding` is sent);
- flow control: reading pauses while more than HIGH_WATER bytes wait to be read;
- timeouts: the connect (TCP and TLS) within `connect_timeout`; after that, any wait for the
  answer's next bytes longer than `read_timeout` raises TimeoutError.

Failures are typed for the caller's retry rule: `ConnectFailed` when nothing was sent (the
request may go again), `Dropped` when the connection failed or the answer was malformed after
the request went out (it may have been run). Requests through an HTTP(S) proxy stay on aiohttp
(instance/providers/base.py).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import zlib
from collections import deque
from typing import cast
from urllib.parse import urlsplit

import httptools  # type: ignore[import-untyped]

KEEPALIVE_S = 30.0
HIGH_WATER = 256 * 1024


class ConnectFailed(Exception):
    """The connection could not be made (refused, unreachable, TLS refused, timed out): nothing was sent."""


class Dropped(Exception):
    """The connection failed, or the answer could not be parsed, after the request was written."""


class Connections:
    """Keep-alive HTTP/1.1 connections to the origin of `url`, and the request head for it."""

    def __init__(
        self,
        url: str,
        headers: dict[str, str],
        *,
        tls: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme == "https" and tls is None:
            # Building a default context here would read the CA bundle on the event loop;
            # the caller builds it once off the loop (base.tls_context through to_thread).
            raise ValueError("an https URL needs the provider's TLS context, and none was built")
        self._tls = tls if parts.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        default = self.port == (443 if parts.scheme == "https" else 80)
        name = f"[{self.host}]" if ":" in self.host else self.host
        authority = name if default else f"{name}:{self.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {target} HTTP/1.1", f"Host: {authority}"]
        for key, value in headers.items():
            if any(c in key or c in value for c in "\r\n\0"):
                raise ValueError(f"the {key} header holds a line break or a NUL")
            lines.append(f"{key}: {value}")
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._idle: deque[_Conn] = deque()
        self._closed = False

    async def post(self, body: bytes) -> Response:
        """Send `body` as the POST's and return the answer once its head has arrived."""
        data = self._head + b"%d\r\n\r\n" % len(body) + body
        conn = self._take()
        if conn is not None:
            try:
                return await conn.send(data, self.read_timeout)
            except Dropped:
                if conn.received:
                    raise
                # The server closed the kept-alive connection as the request went out (nothing
                # came back): once more, on a new connection, as HTTP clients do.
        conn = await self._connect()
        return await conn.send(data, self.read_timeout)

    def _take(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the likeliest to be still open
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                conn.close()
                continue
            if now - conn.idle_since > KEEPALIVE_S:
                conn.close()
                continue
            return conn
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self),
                    self.host,
                    self.port,
                    ssl=self._tls,
                    server_hostname=self.host if self._tls is not None else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connecting to {self.host}:{self.port} timed out") from None
        except OSError as exc:  # refused, unreachable, name not resolved, TLS refused (ssl.SSLError)
            raise ConnectFailed(f"{self.host}:{self.port}: {exc}") from None
        return conn

    def _release(self, conn: _Conn) -> None:
        if self._closed or conn.closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def idle(self) -> int:
        return sum(1 for c in self._idle if not c.closed)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


class Headers(dict[str, str]):
    """An answer's headers by lowercase name (a repeated one's values joined by ", "); `get`
    takes a name in any case."""

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(key.lower(), default)


class Response:
    """An answer whose head has arrived: its status and headers, and its body as it comes."""

    __slots__ = ("_conn", "_inflate", "content", "headers", "reason", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status: int = conn.status
        self.reason: str = conn.reason
        self.headers = conn.headers
        coding = (self.headers.get("content-encoding") or "identity").strip().lower()
        if coding in ("gzip", "x-gzip", "deflate"):
            # wbits 47: a gzip or a zlib header, whichever the body has
            self._inflate: zlib._Decompress | None = zlib.decompressobj(47)
        elif coding in ("identity", ""):
            self._inflate = None
        else:
            conn.close()
            raise Dropped(f"the answer is encoded as {coding!r}, which was not asked for")
        self.content = self  # read as `response.content.readany()`, as aiohttp's answers are

    async def readany(self) -> bytes:
        """What has arrived of the body (waiting for at least one byte); b"" once it has ended."""
        while True:
            data = await self._conn.take(self._conn.owner.read_timeout)
            if self._inflate is None or not data:
                if not data and self._inflate is not None:
                    tail = self._inflate.flush()
                    self._inflate = None
                    if tail:
                        return tail
                return data
            try:
                out = self._inflate.decompress(data)
            except zlib.error as exc:
                self.release()
                raise Dropped(f"the answer's compressed body is corrupt ({exc})") from None
            if out:
                return out

    def at_eof(self) -> bool:
        return self._conn.complete and not self._conn.chunks

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while data := await self.readany():
            parts.append(data)
        return b"".join(parts)

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the answer was read to
        its end and the server keeps it open; otherwise it is closed."""
        self._conn.finish()


class _Conn(asyncio.Protocol):
    """One connection; one request at a time."""

    def __init__(self, owner: Connections) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.reason = ""
        self.headers = Headers()
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # a body without a length, ended by the connection's close
        self.error: Exception | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.received = False  # any byte of the current answer

    # --- the caller's side -----------------------------------------------------------------
    async def send(self, data: bytes, timeout: float) -> Response:
        assert self.transport is not None
        self.busy = True
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.reason, self.headers = 0, "", Headers()
        self.chunks.clear()
        self.buffered = 0
        self.head_done = self.complete = self.keep_alive = self.until_close = False
        self.error = None
        self.received = False
        self.transport.write(data)
        try:
            while not self.head_done:
                if self.error is not None:
                    raise self.error
                await self._wait(timeout)
            return Response(self)
        except BaseException:  # failed, timed out or cancelled: the connection cannot be reused
            self.close()
            raise

    async def take(self, timeout: float) -> bytes:
        """The body's bytes that have arrived, waiting for some; b"" at its end."""
        while not self.chunks:
            if self.complete:
                return b""
            if self.error is not None:
                self.close()
                raise self.error
            try:
                await self._wait(timeout)
            except BaseException:
                self.close()
                raise
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def _wait(self, timeout: float) -> None:
        waiter = self.waiter = self.loop.create_future()
        self.timer = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            self.timer.cancel()
            self.waiter = self.timer = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def finish(self) -> None:
        if not self.busy:
            return
        self.busy = False
        if self.complete and self.keep_alive and self.error is None and not self.chunks:
            self.owner._release(self)
        else:
            self.close()

    def close(self) -> None:
        self.busy = False
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # --- the protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = Dropped(f"the answer is not valid HTTP/1.1 ({exc})")
            self.close()
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True  # not to be taken from the pool while connection_lost is pending
        return None  # close the transport (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy and not self.complete and self.error is None:
            if self.head_done and self.until_close:
                self.complete = True
                self.keep_alive = False
            else:
                where = "its answer's body" if self.head_done else "answering"
                reason = f" ({exc})" if exc is not None else ""
                self.error = Dropped(f"the connection closed before {where} ended{reason}")
        self._wake()

    # --- httptools' callbacks ----------------------------------------------------------------
    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if 100 <= self.status < 200:  # an interim answer: the real one follows
            self.headers = Headers()
            self.reason = ""
            return
        self.keep_alive = self.parser.should_keep_alive()
        chunked = "chunked" in (self.headers.get("transfer-encoding") or "").lower()
        self.until_close = not chunked and "content-length" not in self.headers
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.head_done:
            self.complete = True


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
