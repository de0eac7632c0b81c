"""uvicorn's HTTP protocol with each response's head sent together with its body's first bytes.

uvicorn writes a response's status line and headers to the socket the moment the app sends
`http.response.start`, and each body message as it comes: two `send` calls, and with
TCP_NODELAY two TCP segments, for every answer, even a JSON answer whose body follows at once.
The router then wakes twice per call to read one answer (the handshake era's SSE answers:
head, event, end marker, three times).

`HeadHolder` stands between the protocol and its transport and keeps a head back until the
next write, which it joins, or until the event loop's next turn, whichever comes first: a body
sent in the same turn (a whole JSON answer, an SSE event ready at once) leaves in one segment
with its head, and a head whose body takes longer (a stream whose first event comes later)
goes out alone one loop turn later, as before. Order is never changed: every write, and
closing, sends the held head first.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HeadHolder", "HeadHoldingProtocol"]

_STATUS_LINE = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"


class HeadHolder:
    """A transport that holds a response head back until the next write or loop turn."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
        elif data[:9] == _STATUS_LINE and data[-4:] == _HEAD_END:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Send a held head now (the loop's next turn came before its body)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self._transport, name)


class HeadHoldingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing through a `HeadHolder`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods)
        super().connection_made(HeadHolder(transport, self.loop))  # type: ignore[arg-type]
