"""Where, in an SSE answer, the JSON-RPC response to the call's request ends.

An instance answers a handshake-era request with an SSE stream: related notifications and
requests first, the response last. MCP's streamable HTTP says the server SHOULD close the
stream once the response has been sent, and the SDK does, but its end marker comes in a later
TCP segment, a quarter of a millisecond after the response (the SDK closes the stream after
the event went out). The router need not wait for it: `ResponseWatch` finds the end of the
event that carries the response to the request's id as the bytes come, so the relay can send
that event and the end of the client's answer in one write. The instance's end is still read
(router/upstream.py `Response.drain`), so its connection goes back to the pool.

Events are split on blank lines, whichever line ends the instance uses (CRLF, LF or CR, as the
SSE format allows); an event's `data:` lines are joined and read as JSON only when they could
be a response (they name an `"id"`), but for the SDK's own spelling of the response, which
`response_start` knows: the SDK's usual answer, that event alone in one read, is recognised
by its first bytes and its one line end before the blank line. Notifications and requests
from the server (they have a `method`) and responses to other ids are not it. An event larger
than SCAN_LIMIT stops the watch: the answer then ends when the instance ends it, as before.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["SCAN_LIMIT", "ResponseWatch", "is_response_to", "response_start"]

SCAN_LIMIT = 1024 * 1024  # bytes of one event held while looking for its end
_LINE_END = re.compile(rb"\r\n|\n|\r")


def _blank(buf: bytes, at: int) -> tuple[int, int] | None:
    """The first blank line (a line end right after another) in `buf` from `at`: where it
    begins and ends; None if there is none yet. A line end is CRLF, LF or CR, CRLF being one,
    so a blank line is an LF (alone or ending a CRLF) followed by a line end, or a CR followed
    by a CR (and maybe its LF). A CR last may be half a CRLF, which would belong to it: not yet."""
    size = len(buf)
    i = buf.find(b"\n", at)
    while 0 <= i < size - 1 and buf[i + 1] not in b"\r\n":
        i = buf.find(b"\n", i + 1)
    if i == size - 1:
        i = -1  # an LF last: what follows it is not here yet
    cr = buf.find(b"\r\r", at, i if i >= 0 else size)
    if cr >= 0:  # CR CR, or CR CRLF
        second = cr + 1
        start = cr
    elif i >= 0:
        second = i + 1
        start = i - 1 if i > 0 and buf[i - 1] == 13 else i
    else:
        return None
    if buf[second] == 13:  # the second line end is a CR, or a CRLF
        if second + 1 == size:
            return None
        return start, second + 2 if buf[second + 1] == 10 else second + 1
    return start, second + 1


_HEAD = b'{"jsonrpc":"2.0",'  # how the SDK (pydantic, compact) begins every message
_SDK_EVENT = b"event: message\r\ndata: "  # and every event of an SSE answer
_DATA_AT = len(_SDK_EVENT)


def is_response_to(data: bytes, rid: Any, said: tuple[bytes, ...] = ()) -> bool:
    """Is `data` (an event's data field) the JSON-RPC response to request `rid`? `said`: the
    start of that response as the SDK writes it (`response_start`), known without parsing."""
    if said and data.startswith(said) and data.endswith(b"}"):
        return True
    if data.startswith(_HEAD):
        if data.startswith(b'"method"', len(_HEAD)):
            return False  # a notification or a request from the server
    elif b'"id"' not in data:
        return False
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    if not isinstance(obj, dict) or "method" in obj or not ("result" in obj or "error" in obj):
        return False
    got = obj.get("id")
    return got == rid and type(got) is type(rid)


def response_start(rid: Any) -> tuple[bytes, ...]:
    """The ways the SDK begins the response to `rid` (compact JSON, keys in its order)."""
    text = b"%d" % rid if type(rid) is int else json.dumps(rid, separators=(",", ":")).encode()
    head = _HEAD + b'"id":' + text
    return (head + b',"result":', head + b',"error":')


def _data_of(event: bytes) -> bytes:
    """An event's data: its `data:` lines' values (one leading space dropped), joined by LF."""
    at = event.find(b"data:")
    if at >= 0 and (at == 0 or event[at - 1] in b"\r\n") and event.find(b"data:", at + 5) < 0:
        value = event[at + 5 :]  # one data line, the event's last (the SDK's events)
        if b"\n" not in value and b"\r" not in value:
            return value[1:] if value.startswith(b" ") else value
    out = []
    for line in _LINE_END.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            out.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(out)


class ResponseWatch:
    """Follows an SSE answer's bytes for the event holding the response to request `rid`."""

    __slots__ = ("buf", "off", "rid", "said", "whole")

    def __init__(self, rid: Any) -> None:
        self.rid = rid
        self.said = response_start(rid)
        self.whole = tuple(_SDK_EVENT + start for start in self.said)
        self.buf = b""  # the bytes of the event not ended yet
        self.off = False  # gave up (an event over SCAN_LIMIT)

    def feed(self, data: bytes) -> int | None:
        """None while the response has not ended; else how many bytes of `data` reach the end
        of its event (what follows in `data` comes after the response)."""
        if self.off:
            return None
        held = len(self.buf)
        if not held and data.startswith(self.whole) and data.endswith(b"\r\n\r\n"):
            # The SDK's usual answer: the response's event alone, in one read. Its data is one
            # line (compact JSON has no raw line ends): the first CR and LF after the field
            # name are those of the blank line that ends the event.
            size = len(data)
            ends = data.find(b"\r", _DATA_AT) == size - 4 and data.find(b"\n", _DATA_AT) == size - 3
            if ends and data[size - 5] == 125:  # "}"
                return size
        buf = self.buf + data if held else data
        # a blank line may begin up to three bytes (CRLF, then a CR held back) before the new data
        at = max(0, held - 3)
        while True:
            span = _blank(buf, at)
            if span is None:
                break
            start, end = span
            # (a blank line that begins the buffer ends an empty event)
            if start > 0 and is_response_to(_data_of(buf[:start]), self.rid, self.said):
                self.buf = b""
                return end - held
            buf = buf[end:]
            held -= end
            at = 0
        if len(buf) > SCAN_LIMIT:
            self.off = True
            self.buf = b""
            return None
        self.buf = buf
        return None
