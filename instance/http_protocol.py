"""uvicorn's HTTP protocol with each response's head sent together with its body's first bytes.

uvicorn writes a response's status line and headers to the socket the moment the app sends
`http.response.start`, and each body message as it comes: two `send` calls, and with
TCP_NODELAY two TCP segments, for every answer, even a JSON answer whose body follows at once.
The router then wakes twice per call to read one answer (the handshake era's SSE answers:
head, event, end marker, three times).

`HeadHolder` stands between the protocol and its transport and keeps a head back until the
next write, which it joins, or until the event loop's next turn, whichever comes first: a body
sent in the same turn (a whole JSON answer) leaves in one segment with its head.

The handshake era answers a POST with an SSE stream whose last event is the call's response,
and the SDK's stream machinery takes several turns of the loop to produce it (and more to end
the stream after it). So for a POST's SSE answer the holder waits longer:

- its head waits for the first event, up to SSE_HEAD_WAIT (as long as the router holds a
  streamed answer's head for its first piece, router/express.py HEAD_HOLD, so a client sees
  no later head than before); an event that is not the response (a progress notification, a
  request to the client) leaves with the head at once;
- an event that is the stream's response (`"id":…,"result"` or `"error"`, the SDK's field
  order) waits up to END_WAIT for the end marker (`0\\r\\n\\r\\n`) that follows it a few turns
  later, and leaves with it.

A quick call's SSE answer then leaves in one segment, as a JSON answer does, and the router
reads it once instead of three times. Nothing is delayed beyond those bounds; order is never
changed: every write, and closing, sends what is held first. What decides failover at the
router is whether the request's bytes left it (router/upstream.py), not when the head came, so
a head held longer changes nothing there.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["END_WAIT", "SSE_HEAD_WAIT", "HeadHolder", "HeadHoldingProtocol"]

SSE_HEAD_WAIT = 0.05  # seconds a POST's SSE head waits for the stream's first event
END_WAIT = 0.002  # seconds the stream's response event waits for the end marker behind it

_STATUS_LINE = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"
_SSE_TYPE = b"text/event-stream"
_END = b"0\r\n\r\n"
# A chunk holding one SSE event that is a JSON-RPC response or error (sse_starlette's field
# order: id, event, data; the SDK's JSON: jsonrpc, id, then result or error).
_RESPONSE_EVENT = re.compile(
    rb'[0-9a-fA-F]+\r\n(?:id: [^\r\n]*\r\n)?event: message\r\ndata: \{"jsonrpc":"2\.0","id":'
    rb'(?:-?[0-9]+|"(?:[^"\\\r\n]|\\.)*"),"(?:result|error)":'
)


class HeadHolder:
    """A transport that holds a response head (and a POST's SSE response event) back briefly."""

    __slots__ = ("_held", "_loop", "_method", "_sse", "_timer", "_transport", "_waits_end")

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
        self._waits_end = False  # what is held ends with the stream's response event

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes):
            data = bytes(data)
        held = self._held
        if held is not None:
            if self._waits_end:
                self._release(held + data)  # the end marker, or anything else: in order
            elif self._sse and self._ends_stream(data):
                self._hold(held + data, END_WAIT, waits_end=True)
            else:
                self._release(held + data)
        elif data[:9] == _STATUS_LINE and data[-4:] == _HEAD_END:
            self._sse = _SSE_TYPE in data and self._method is not None and self._method() == "POST"
            self._hold(data, SSE_HEAD_WAIT if self._sse else None)
        elif self._sse and self._ends_stream(data):
            self._hold(data, END_WAIT, waits_end=True)
        else:
            self._transport.write(data)

    @staticmethod
    def _ends_stream(data: bytes) -> bool:
        """The chunk is the stream's response event, without the end marker it waits for."""
        return _RESPONSE_EVENT.match(data) is not None and not data.endswith(_END)

    def _hold(self, data: bytes, wait: float | None, *, waits_end: bool = False) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._held, self._waits_end = data, waits_end
        if wait is None:
            self._timer = self._loop.call_soon(self.flush)
        else:
            self._timer = self._loop.call_later(wait, self.flush)

    def _release(self, data: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._held, self._waits_end = None, False
        self._transport.write(data)

    def flush(self) -> None:
        """Send what is held now (its wait ran out before the bytes it waited for came)."""
        held = self._held
        self._held, self._waits_end, self._timer = None, False, None
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
        holder = HeadHolder(transport, self.loop, self._request_method)
        super().connection_made(holder)  # type: ignore[arg-type]

    def _request_method(self) -> str | None:
        scope = self.scope
        return scope.get("method") if scope else None
