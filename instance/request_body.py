"""A request's body read ahead on the ASGI side, and given back to whoever answers it.

The instance's own paths (the direct `tools/call`, the kept `tools/list` answers) look at a
request's whole body before deciding to answer it themselves; when they do not, the SDK gets
the same messages, replayed in order, then whatever the server receives after them.
"""

from __future__ import annotations

from starlette.types import Message, Receive


class ReadAhead:
    """The messages of one request read up to `max_body` bytes (a larger body stays the SDK's
    to refuse), whether they hold the whole body, and a `receive` that replays them."""

    __slots__ = ("_messages", "_receive", "whole")

    def __init__(self, messages: list[Message], whole: bool, receive: Receive) -> None:
        self._messages = messages
        self._receive = receive
        self.whole = whole

    @classmethod
    async def read(cls, receive: Receive, max_body: int) -> ReadAhead:
        messages: list[Message] = []
        size = 0
        whole = False
        while size <= max_body:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # e.g. http.disconnect
                break
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                whole = True
                break
        return cls(messages, whole, receive)

    @property
    def body(self) -> bytes:
        """The body read so far (the whole body when `whole`)."""
        return b"".join(m.get("body", b"") for m in self._messages)

    async def replay(self) -> Message:
        """The messages read ahead, in order, then the server's own."""
        return self._messages.pop(0) if self._messages else await self._receive()
