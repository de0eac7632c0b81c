"""`POST /mcp` served beside aiohttp's request machinery, by the same proxy code.

aiohttp spends about 90 µs of CPU per request on the way to a handler (its request and
payload objects, URL dispatch, the middleware chain, finishing the response) where a bare
protocol on httptools spends about 25. The router's hottest request needs none of that: one
complete `POST /mcp` with a small JSON body, on a keep-alive HTTP/1.1 connection.

`parse` takes such a request straight from the connection's bytes (httptools' C parser) when
aiohttp's connection handler is idle, and `FastRequest` carries it: it has the few attributes
the proxy reads from an aiohttp request (method, path, headers, body, remote address, the
connection's writer). `serve` runs it through the same middleware functions and `Proxy.handle`
as every other request, so auth and Origin checks, failover, re-sends, cancellation on
disconnect, limits, metrics and error bodies are the proxy's own; the answer is written by
router/prebuilt.py, and `send_plain` writes the proxy's own answers (errors) the same way.

Anything else (another method or path, a request split over several reads, pipelining,
chunked bodies, Expect, non-ASCII headers, HTTP/1.0, Connection: close, oversized bodies,
`subscriptions/listen`, which holds a stream) goes to aiohttp untouched. The last is told by
its bytes only once the express path has not sent the request (it never sends that method):
the usual call is not searched for it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import httptools  # type: ignore[import-untyped]
from aiohttp import web
from aiohttp.http_writer import HttpVersion11, StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy

from router import prebuilt
from router.admin import PROXY_KEY, admin_auth
from router.express import start as express_start
from router.middleware import route_errors

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler

    from router.express import Express

log = logging.getLogger(__name__)

__all__ = ["FastPath", "FastRequest"]

REQUEST_LINE = b"POST /mcp HTTP/1.1\r\n"
# Requests with these headers keep aiohttp's path (framing it handles, or an upgrade).
_AIOHTTP_ONLY = frozenset({b"transfer-encoding", b"expect", b"upgrade"})
_HELD_STREAM = b"subscriptions/listen"  # served by router/streams.py with aiohttp's response


class _Resource:
    canonical = "/mcp"


class _Route:
    resource = _Resource()


class _MatchInfo(dict[str, str]):
    """What the proxy reads of aiohttp's match info for the plain /mcp route."""

    route = _Route()


_MATCH = _MatchInfo()


class _Body:
    """The request body, all of it already here (aiohttp's StreamReader, as far as used)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def is_eof(self) -> bool:
        return True

    def read_nowait(self, n: int = -1) -> bytes:
        data, self.data = self.data, b""
        return data


class FastRequest:
    """A complete `POST /mcp` taken off the connection: the parts of aiohttp's Request the
    proxy uses."""

    method = "POST"
    path = "/mcp"
    version = HttpVersion11
    keep_alive = True
    match_info = _MATCH

    __slots__ = ("_headers", "_length", "_raw", "_same", "_writer", "content", "handler", "memo_key")

    def __init__(
        self,
        handler: RequestHandler,
        raw_headers: tuple[tuple[bytes, bytes], ...] | None,
        body: bytes,
        memo_key: tuple[tuple[bytes, bytes], ...] = (),
        same: _SameHead | None = None,
        length: bytes = b"",
    ) -> None:
        self.handler = handler
        # None: the head of `same` with this Content-Length value, put together when asked for
        # (the express path does not ask: what it reads of the headers is kept per connection)
        self._raw = raw_headers
        self._same = same
        self._length = length
        # The headers but Content-Length: a client sends the same ones on every call of a
        # connection, so what the express path derives from them is kept per connection.
        self.memo_key = memo_key
        self.content = _Body(body)
        self._writer: StreamWriter | None = None  # made when an answer is written
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]:
        raw = self._raw
        if raw is None:
            same = self._same
            assert same is not None
            raw = self._raw = (*same.before, (same.length_name, self._length), *same.after)
        return raw

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        if self._headers is None:
            self._headers = CIMultiDictProxy(
                CIMultiDict((k.decode(), v.decode()) for k, v in self.raw_headers)
            )
        return self._headers

    @property
    def content_length(self) -> int:
        return len(self.content.data)

    @property
    def _payload_writer(self) -> StreamWriter:
        writer = self._writer
        if writer is None:
            writer = self._writer = StreamWriter(self.handler, self.handler._loop)
        return writer

    @property
    def writer(self) -> StreamWriter:
        return self._payload_writer

    @property
    def transport(self) -> Any:
        return self.handler.transport

    @property
    def remote(self) -> str | None:
        transport = self.handler.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if isinstance(peer, (list, tuple)) and peer:
            return str(peer[0])
        return None if peer is None else str(peer)


class _Parsed:
    """httptools callbacks: one request's headers and body."""

    __slots__ = ("body", "complete", "headers", "keep_alive", "messages", "parser", "url")

    def __init__(self) -> None:
        self.parser: Any = None
        self.keep_alive = False
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.complete = False
        self.messages = 0

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        # read now: the parser forgets the request's Connection semantics once it has ended
        self.keep_alive = self.parser.should_keep_alive() and self.parser.get_http_version() == "1.1"

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class _SameHead:
    """A connection's last request head, to take the next request whose head is the same
    bytes but for the Content-Length value without parsing it again: a client sends the same
    headers on every call of a connection. httptools parsed and accepted these bytes (one
    complete, plain `POST /mcp`, ASCII headers, keep-alive), so the same bytes with another
    length parse the same way; the request must then be exactly head and body (no more)."""

    __slots__ = ("after", "before", "key", "length_name", "prefix", "suffix")

    def __init__(
        self,
        prefix: bytes,
        suffix: bytes,
        before: tuple[tuple[bytes, bytes], ...],
        length_name: bytes,
        after: tuple[tuple[bytes, bytes], ...],
        key: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self.prefix = prefix  # up to the Content-Length value
        self.suffix = suffix  # from the end of its line to the blank line, included
        self.before = before  # the parsed headers before Content-Length
        self.length_name = length_name
        self.after = after  # and after it
        self.key = key

    @classmethod
    def of(
        cls,
        data: bytes,
        head_size: int,
        raw: tuple[tuple[bytes, bytes], ...],
        key: tuple[tuple[bytes, bytes], ...],
    ) -> _SameHead | None:
        """The head of the request httptools just parsed from `data` (head and body, nothing
        else), or None when its Content-Length is not one plain `Name: digits` line."""
        head = data[:head_size]
        if not head.endswith(b"\r\n\r\n"):
            return None
        where = [i for i, (name, _value) in enumerate(raw) if name.lower() == b"content-length"]
        if len(where) != 1:
            return None
        i = where[0]
        name, value = raw[i]
        line = b"\r\n%s: %s\r\n" % (name, value)
        at = head.find(line)
        if at < 0 or head.find(line, at + 1) >= 0 or not value.isdigit() or len(value) > 12:
            return None
        start = at + len(name) + 4
        end = start + len(value)
        return cls(head[:start], head[end:], raw[:i], name, raw[i + 1 :], key)

    def match(self, handler: RequestHandler, data: bytes) -> FastRequest | None:
        prefix = self.prefix
        if not data.startswith(prefix):
            return None
        start = len(prefix)
        end = data.find(b"\r\n", start, start + 14)
        if end < 0:
            return None
        value = data[start:end]
        if not value.isdigit() or not data.startswith(self.suffix, end):
            return None
        body_at = end + len(self.suffix)
        if len(data) - body_at != int(value):
            return None  # part of the body, or more than this request
        return FastRequest(handler, None, data[body_at:], self.key, self, value)


class FastPath:
    """Decides which requests take the fast path and serves them (one per connection at once)."""

    def __init__(self, app: web.Application, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._handler: Any = None  # route_errors(admin_auth(proxy.handle)), built on first use
        self._count: Any = None
        self._proxy: Any = None
        self._express_count: Any = None

    def parse(self, handler: RequestHandler, data: bytes) -> FastRequest | None:
        """The request in `data` if it is one complete, plain `POST /mcp`; else None. (A
        `subscriptions/listen` is one too: `held` tells, unless the express path sent it.)"""
        if len(data) > self.max_body_bytes + 16384:
            return None
        same = handler._fast_same  # type: ignore[attr-defined]
        if same is not None:
            request = same.match(handler, data)
            if request is not None:
                return request
        parsed = _Parsed()
        parser = parsed.parser = httptools.HttpRequestParser(parsed)
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None  # aiohttp answers it (a framing error) or upgrades it
        finally:
            parsed.parser = None  # no cycle between the parser and its callbacks
        if not parsed.complete or parsed.messages != 1 or parsed.url != b"/mcp" or not parsed.keep_alive:
            return None
        kept = []
        for pair in parsed.headers:
            name, value = pair
            if not (name.isascii() and value.isascii()):
                return None
            low = name.lower()
            if low in _AIOHTTP_ONLY:
                return None
            if low != b"content-length":
                kept.append(pair)
        body = b"".join(parsed.body) if len(parsed.body) != 1 else parsed.body[0]
        raw, key = tuple(parsed.headers), tuple(kept)
        handler._fast_same = _SameHead.of(data, len(data) - len(body), raw, key)  # type: ignore[attr-defined]
        return FastRequest(handler, raw, body, key)

    @staticmethod
    def held(data: bytes) -> bool:
        """Might `data` hold a `subscriptions/listen` (aiohttp's path serves it)? Asked only
        of a request the express path did not send: one it sent is known to be no such call."""
        return _HELD_STREAM in data

    def _setup(self) -> None:
        proxy = self._proxy = self.app[PROXY_KEY]
        inner = partial(admin_auth, handler=proxy.handle)
        self._handler = partial(route_errors, handler=inner)
        self._count = proxy.metrics.fast_calls
        self._express_count = proxy.metrics.express_calls

    def express(self, handler: RequestHandler, request: FastRequest) -> Express | None:
        """The call sent on the express path (router/express.py), or None: serve() it then."""
        if self._handler is None:
            self._setup()
        try:
            sent = express_start(self._proxy, handler, request)
        except Exception:  # a bug: the proxy's own path serves it
            log.exception("express path: could not start POST /mcp")
            return None
        if sent is not None:
            self._count.inc()
            self._express_count.inc()
        return sent

    async def serve(
        self, request: FastRequest, inner: Callable[[Any], Awaitable[web.StreamResponse]] | None = None
    ) -> web.StreamResponse:
        """The proxy's answer, through the same middleware as aiohttp's path (`inner`: the
        proxy taking up a call the express path sent, counted already)."""
        if self._handler is None:
            self._setup()
        if inner is not None:
            return await route_errors(request, partial(admin_auth, handler=inner))  # type: ignore[arg-type]
        self._count.inc()
        return await self._handler(request)  # type: ignore[no-any-return]


def send_plain(request: FastRequest, resp: web.StreamResponse) -> bool:
    """Write an answer the proxy made itself (a `web.Response` with its body in bytes, e.g. an
    error) to the connection; True when the connection stays open. A `Raw` answer has already
    been written."""
    if isinstance(resp, prebuilt.Raw):
        return bool(resp.keep_alive) and resp.prepared and not resp._payload_writer
    body = getattr(resp, "body", None)
    if not isinstance(resp, web.Response) or not isinstance(body, bytes) or resp.prepared:
        log.warning("fast path: cannot write a %s answer; closing the connection", type(resp).__name__)
        return False
    keep = resp.keep_alive is not False
    return prebuilt.send_response(request, resp.status, resp.reason, resp.headers.items(), body, keep=keep)
