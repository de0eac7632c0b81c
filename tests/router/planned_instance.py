"""A tiny HTTP server on loopback that plays an instance for the relay's tests (router/upstream.py).

Each request (a head, then a 2-byte body) is answered by the next step popped from `plan`:

- "now": the answer at once (the default when the plan is empty);
- "pause": the answer after 0.15 s;
- "split": the answer's headers, 0.05 s, then its body;
- "headers": the answer's headers, then nothing;
- "mute": nothing at all;
- "drop": the connection closed without an answer;
- "big": a 600 KiB JSON answer (above the relay's 256 KiB read-ahead);
- "sse": an SSE answer as the SDK sends one: its headers and the response's event, 0.05 s,
  then the end of the stream;
- "sse-more": the same with another event between the response's and the end;
- "sse-open": the headers and the response's event, then nothing (the stream stays open).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

HEAD = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
BIG_BODY = b'{"x":"' + b"y" * (600 * 1024) + b'"}'
BIG = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BIG_BODY),
    BIG_BODY,
)
_HEADERS_END = ANSWER.index(b"\r\n\r\n") + 4
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
RESPONSE_EVENT = b'event: message\r\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\r\n\r\n'
LATE_EVENT = b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/message"}\r\n\r\n'


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@contextlib.asynccontextmanager
async def planned_instance() -> AsyncIterator[tuple[int, list[str]]]:
    """(its port, its plan): append steps to the plan before the calls they answer."""
    plan: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                step = plan.pop(0) if plan else "now"
                if step == "drop":
                    return
                if step == "mute":
                    await asyncio.sleep(30)
                elif step == "headers":
                    writer.write(ANSWER[:_HEADERS_END])
                    await writer.drain()
                    await asyncio.sleep(30)
                elif step == "big":
                    writer.write(BIG)
                elif step.startswith("sse"):
                    writer.write(SSE_HEAD + _chunk(RESPONSE_EVENT))
                    await writer.drain()
                    await asyncio.sleep(30 if step == "sse-open" else 0.05)
                    writer.write((_chunk(LATE_EVENT) if step == "sse-more" else b"") + b"0\r\n\r\n")
                elif step == "split":
                    writer.write(ANSWER[:_HEADERS_END])
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(ANSWER[_HEADERS_END:])
                else:
                    if step == "pause":
                        await asyncio.sleep(0.15)
                    writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], plan
    finally:
        server.close()
