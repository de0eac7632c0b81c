"""Proxied answers written straight to the client's connection, framed by the router.

aiohttp's `StreamResponse` builds its status line and headers through a header dict, a
payload writer and chunked framing, with a few awaits per answer: about a third of the router's
CPU per proxied call. An answer relayed from an instance needs none of that: its headers are
already bytes (router/upstream.py), so the router frames the answer itself.

- `Raw.whole(...)`: status line, headers, `Content-Length` and body in ONE transport write;
- `Raw.stream(...)`: a chunked answer (SSE) whose header block goes out with the first chunk
  that is already there (or alone when none is), each later chunk in one write, the end marker
  with the last chunk.

Only for HTTP/1.1 keep-alive requests (`usable`). The returned object is a `StreamResponse`
that aiohttp sees as already sent, so its connection handler keeps the connection alive and
writes nothing more. That relies on three private attributes of aiohttp's `StreamResponse`
(`_payload_writer`, `_keep_alive`, `_eof_sent`) and on `StreamWriter.output_size`; `SUPPORTED`
checks them once against the installed aiohttp, and when anything differs the proxy keeps
aiohttp's ordinary path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_writer import HttpVersion11, StreamWriter

log = logging.getLogger(__name__)

__all__ = ["END", "SUPPORTED", "Raw", "chunk", "send_response", "stream_head", "usable", "whole_bytes"]

# aiohttp versions whose StreamResponse/StreamWriter internals this module was checked against.
_CHECKED = ((3, 10), (3, 11), (3, 12), (3, 13), (3, 14))


def _supported() -> bool:
    try:
        version = tuple(int(x) for x in aiohttp.__version__.split(".")[:2])
    except ValueError:  # pragma: no cover - a pre-release spelling
        return False
    resp = web.StreamResponse()
    fields = ("_payload_writer", "_keep_alive", "_eof_sent", "_body_length")
    ok = version in _CHECKED and all(hasattr(resp, f) for f in fields)
    ok = ok and hasattr(StreamWriter, "output_size")
    if not ok:  # pragma: no cover - depends on the installed aiohttp
        log.warning("aiohttp %s: proxied answers go through aiohttp's response path", aiohttp.__version__)
    return ok


SUPPORTED = _supported()

_date: tuple[int, bytes] = (0, b"")


def _date_line() -> bytes:
    """The Date header line, formatted once per second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, b"Date: %s\r\n" % formatdate(now, usegmt=True).encode())
    return _date[1]


def _bodiless(status: int) -> bool:
    return status in (204, 304) or 100 <= status < 200


_OWN_FIELDS = frozenset({"content-length", "transfer-encoding", "connection", "date", "server"})


def send_response(
    request: Any, status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes, *, keep: bool
) -> bool:
    """Write a whole answer made by the router itself (an error) in one write; True when the
    connection stays open."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("latin-1", "replace"))]
    for name, value in headers:
        if name.lower() in _OWN_FIELDS or "\r" in value or "\n" in value:
            continue
        lines.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
    lines.append(_date_line())
    if not _bodiless(status):
        lines.append(b"Content-Length: %d\r\n" % len(body))
    if not keep:
        lines.append(b"Connection: close\r\n")
    lines += (b"\r\n", body)
    transport = request.transport
    if transport is None or transport.is_closing():
        return False
    data = b"".join(lines)
    transport.write(data)
    request._payload_writer.output_size += len(data)
    return keep


_STATUS_LINES: dict[tuple[int, str], bytes] = {}  # (status, reason) -> the status line


def _status_line(status: int, reason: str) -> bytes:
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, (reason or _reason(status)).encode("latin-1", "replace"))
        if len(_STATUS_LINES) < 256:  # an instance's own reason phrases: a few
            _STATUS_LINES[key] = line
    return line


def whole_bytes(status: int, reason: str, fields: bytes, body: bytes) -> bytes:
    """A complete answer (status line, headers, Content-Length, body) as one block of bytes.
    `fields` are header lines (each ending in CRLF, Content-Type among them) without
    Content-Length, Date or Connection."""
    length = b"\r\n" if _bodiless(status) else b"Content-Length: %d\r\n\r\n" % len(body)
    return b"".join((_status_line(status, reason), fields, _date_line(), length, body))


def stream_head(status: int, reason: str, fields: bytes) -> bytes:
    """The status line and headers of a chunked answer (`fields` as for `whole_bytes`)."""
    chunked = b"Transfer-Encoding: chunked\r\n\r\n"
    return b"".join((_status_line(status, reason), fields, _date_line(), chunked))


def chunk(data: bytes) -> bytes:
    """One piece of a chunked answer (nothing for no data: an empty chunk would end it)."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


END = b"0\r\n\r\n"  # the end of a chunked answer


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def usable(request: Any) -> bool:
    """Can an answer to `request` be written by `Raw`? (HTTP/1.1 keep-alive, nothing sent yet)"""
    if not SUPPORTED or request.version != HttpVersion11 or not request.keep_alive:
        return False
    writer = request._payload_writer
    return type(writer) is StreamWriter and writer.output_size == 0


class Raw(web.StreamResponse):
    """An answer whose bytes the router writes to the client's transport itself."""

    def __init__(self, request: Any, status: int, reason: str, content_type: str) -> None:
        super().__init__(status=status, reason=reason or None, headers={"Content-Type": content_type})
        self._raw_req = request
        self._raw_writer: StreamWriter = request._payload_writer  # type: ignore[assignment]
        self._pending = b""  # the status line and headers, until the first write
        self._keep_alive = True

    def _transport(self) -> Any:
        transport = self._raw_req.transport
        if transport is None or transport.is_closing():
            return None
        return transport

    def _send(self, data: bytes) -> bool:
        transport = self._transport()
        if transport is None:
            self._keep_alive = False
            return False
        transport.write(data)
        self._raw_writer.output_size += len(data)
        return True

    def _status_line(self) -> bytes:
        return b"HTTP/1.1 %d %s\r\n" % (self.status, self.reason.encode("latin-1", "replace"))

    @classmethod
    def whole(
        cls, request: Any, status: int, reason: str, content_type: str, fields: bytes, body: bytes
    ) -> Raw:
        """Send a complete answer now, in one write. `fields` are header lines (each ending in
        CRLF) without Content-Length, Date or Connection."""
        self = cls(request, status, reason, content_type)
        self._send(whole_bytes(status, self.reason, fields, body))
        self._eof_sent = True
        self._body_length = len(body)
        return self

    @classmethod
    def stream(
        cls,
        request: Any,
        status: int,
        reason: str,
        content_type: str,
        fields: bytes,
        *,
        flush: bool,
    ) -> Raw:
        """Start a chunked answer. With `flush` the headers go out now (no body is there yet,
        and the client should see them); else they go with the first chunk."""
        self = cls(request, status, reason, content_type)
        self._pending = stream_head(status, self.reason, fields)
        self._payload_writer = self._raw_writer  # aiohttp's prepare() sees it started
        if flush:
            head, self._pending = self._pending, b""
            if not self._send(head):
                raise ConnectionResetError("the client went away")
        return self

    async def prepare(self, request: Any) -> Any:
        if self._eof_sent:
            return None
        return self._payload_writer

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise RuntimeError("the answer has already ended")
        if not data:
            return
        head, self._pending = self._pending, b""
        if not self._send(b"%s%x\r\n%s\r\n" % (head, len(data), bytes(data))):
            raise ConnectionResetError("the client went away")
        await self._raw_writer.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        self._eof_sent = True
        head, self._pending = self._pending, b""
        frame = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"
        if not self._send(head + frame):
            raise ConnectionResetError("the client went away")
        self._payload_writer = None
