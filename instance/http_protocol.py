"""uvicorn's HTTP protocol with each response's head sent together with its body's first bytes.

uvicorn writes a response's status line and headers to the socket the moment the app sends
`http.response.start`, and each body message as it comes: two `send` calls, and with
TCP_NODELAY two TCP segments, for every answer, even a JSON answer whose body follows at once.
The router then wakes twice per call to read one answer (the handshake era's SSE answers:
head, event, end marker, three times).

`HeadHolder` stands between the protocol and its transport and keeps a head back until the
next write, which it joins, or until the event loop's next turn, whichever comes first: a body
sent in the same turn (a whole JSON answer) leaves in one segment with its head.

The handshake era answers a POST with an SSE stream (chunked), and the SDK's stream machinery
takes several turns of the loop to produce its first event, and more to tear the stream down
after its last. For such an answer:

- the head waits for the first event, up to SSE_HEAD_WAIT (as long as the router holds a
  streamed answer's head for its first piece, router/express.py HEAD_HOLD, so a client sees
  its head no later than before), and leaves with it; events are never held;
- the response event (`"id":…,"result"` or `"error"`, the SDK's field order) is the last thing
  the SDK sends on a POST's stream (its writer stops there), so the chunked end marker goes
  with it rather than after the teardown. What uvicorn writes for that response afterwards
  (its own end marker; a keep-alive ping that raced it) is not sent: the body has ended.
  Anything else there would be a bug, and is logged as a dropped write. uvicorn does not start
  on the connection's next request before its own end of this response, so the next answer
  cannot overtake it.

A quick call's answer then reaches the router as one segment, as a JSON answer does: read
once, and the connection is free again at once. A direct client has its answer without
waiting for the teardown.

Order is never changed: every write, and closing, sends the held head first. What decides
failover at the router is whether the request's bytes left it (router/upstream.py), not when
the head came, so a head held longer changes nothing there.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["SSE_HEAD_WAIT", "HeadHolder", "HeadHoldingProtocol"]

SSE_HEAD_WAIT = 0.05  # seconds a POST's SSE head waits for the stream's first event

_STATUS_LINE = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"
_SSE_TYPE = b"text/event-stream"
_CHUNKED = b"transfer-encoding: chunked"
_END = b"0\r\n\r\n"
# A chunk holding one SSE event that is a JSON-RPC response or error (sse_starlette's field
# order: id, event, data; the SDK's JSON: jsonrpc, id, then result or error).
_RESPONSE_EVENT = re.compile(
    rb'[0-9a-fA-F]+\r\n(?:id: [^\r\n]*\r\n)?event: message\r\ndata: \{"jsonrpc":"2\.0","id":'
    rb'(?:-?[0-9]+|"(?:[^"\\\r\n]|\\.)*"),"(?:result|error)":'
)
_PING = re.compile(rb"[0-9a-fA-F]+\r\n: ")  # an SSE comment (sse_starlette's keep-alive ping)

log = logging.getLogger(__name__)


class HeadHolder:
    """A transport that holds a response head back until the next write or a short wait."""

    __slots__ = ("_ended", "_held", "_loop", "_method", "_sse", "_timer", "_transport")

    def __init__(
        self,
        transport: Any,
        loop: asyncio.AbstractEventLoop,
        method: Callable[[], str | None] | None = None,
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._method = method  # the method of the request being answered (None: unknown)
        self._held: bytes | None = None
        self._timer: asyncio.Handle | None = None
        self._sse = False  # the answer being written is a POST's SSE stream
        self._ended = False  # ... whose end marker went with its response event

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        if self._ended and not self._is_head(data):
            self._after_end(data)
            return
        if self._sse and _RESPONSE_EVENT.match(data) and not data.endswith(_END):
            data += _END  # the stream's last event: its end goes with it
            self._ended = True
        held = self._held
        if held is not None:
            self._held = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._transport.write(held + data)
        elif self._is_head(data):
            self._held, self._ended = data, False
            self._sse = (
                _SSE_TYPE in data
                and _CHUNKED in data
                and self._method is not None
                and self._method() == "POST"
            )
            if self._sse:
                self._timer = self._loop.call_later(SSE_HEAD_WAIT, self.flush)
            else:
                self._timer = self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    @staticmethod
    def _is_head(data: bytes) -> bool:
        return data[:9] == _STATUS_LINE and data[-4:] == _HEAD_END

    def _after_end(self, data: bytes) -> None:
        """A write for a response whose end marker went already: uvicorn's own end (done with
        the response) or a ping that raced it, not sent; anything else is logged as dropped."""
        if data.endswith(_END):
            self._ended = self._sse = False
            data = data[: -len(_END)]
        if data and not _PING.match(data):
            log.warning(
                "dropped %d bytes written after an SSE answer's response event: %r", len(data), data[:80]
            )

    def flush(self) -> None:
        """Send a held head now (its wait ran out before its body came)."""
        held = self._held
        self._held, self._timer = None, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


class HeadHoldingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a `HeadHolder`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods)
        super().connection_made(HeadHolder(transport, self.loop, self._request_method))  # type: ignore[arg-type]

    def _request_method(self) -> str | None:
        scope = self.scope
        return scope.get("method") if scope else None
