"""uvicorn's HTTP protocol with each response's head sent together with its body's first bytes.

uvicorn writes a response's status line and headers to the socket the moment the app sends
`http.response.start`, and each body message as it comes: two `send` calls, and with
TCP_NODELAY two TCP segments, for every answer, even a JSON answer whose body follows at once.
The router then wakes twice per call to read one answer (the handshake era's SSE answers:
head, event, end marker, three times).

`HeadHolder` stands between the protocol and its transport and keeps a head back until the
next write, which it joins, or until the event loop's next turn, whichever comes first: a body
sent in the same turn (a whole JSON answer) leaves in one segment with its head.

The handshake era answers a POST with an SSE stream, and the SDK's stream machinery takes
several turns of the loop to produce its first event. A POST's SSE head therefore waits for
that first event, up to SSE_HEAD_WAIT (as long as the router holds a streamed answer's head for
its first piece, router/express.py HEAD_HOLD, so a client sees its head no later than before),
and leaves with it: a quick call's answer reaches the router as head and response in one
segment, and the end marker that the SDK writes after tearing the stream down comes alone,
read by the router once the client has its answer. The response event itself is never held:
waiting for the end marker to join it would make the answer wait for that teardown.

Order is never changed: every write, and closing, sends the held head first. What decides
failover at the router is whether the request's bytes left it (router/upstream.py), not when
the head came, so a head held longer changes nothing there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["SSE_HEAD_WAIT", "HeadHolder", "HeadHoldingProtocol"]

SSE_HEAD_WAIT = 0.05  # seconds a POST's SSE head waits for the stream's first event

_STATUS_LINE = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"
_SSE_TYPE = b"text/event-stream"


class HeadHolder:
    """A transport that holds a response head back until the next write or a short wait."""

    __slots__ = ("_held", "_loop", "_method", "_timer", "_transport")

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

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._transport.write(held + bytes(data))
        elif data[:9] == _STATUS_LINE and data[-4:] == _HEAD_END:
            self._held = bytes(data)
            if _SSE_TYPE in data and self._method is not None and self._method() == "POST":
                self._timer = self._loop.call_later(SSE_HEAD_WAIT, self.flush)
            else:
                self._timer = self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

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
