"""The relay reads an answer whose head repeats the connection's last one without parsing it
again (router/upstream.py, `_SameAnswer`): only when the read is exactly that head, another
Date and Content-Length, and the body. Everything else goes through the parser, as before.

A tiny HTTP server on loopback plays the instance, sending the answers a test lines up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from router.proxy import _answer_fields
from router.upstream import Relay, Response

pytestmark = pytest.mark.asyncio

REQUEST = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"


def answer(body: bytes, date: bytes = b"Sat, 28 Nov 2026 04:00:00 GMT", **extra: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ndate: %s\r\nserver: uvicorn\r\ncontent-type: application/json\r\n" % date
    head += b"content-length: %d\r\n" % len(body)
    head += b"".join(b"%s: %s\r\n" % (k.replace("_", "-").encode(), v) for k, v in extra.items())
    return head + b"\r\n" + body


@contextlib.asynccontextmanager
async def scripted() -> AsyncIterator[tuple[int, list[list[bytes]]]]:
    """(port, script): each request is answered by the next entry's pieces, written apart."""
    script: list[list[bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                for piece in script.pop(0):
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.03)
        except (asyncio.IncompleteReadError, ConnectionError, IndexError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], script
    finally:
        server.close()


async def _call(relay: Relay, port: int) -> tuple[Response, bytes]:
    resp = await relay.send("127.0.0.1", port, REQUEST, b"{}", 5.0)
    return resp, await resp.read(5.0)


async def test_a_repeated_head_with_another_date_and_length_is_read_the_same() -> None:
    relay = Relay()
    async with scripted() as (port, script):
        bodies = [b'{"a":1}', b'{"much":"longer than the first"}', b"", b'{"b":2}']
        dates = [b"Sat, 28 Nov 2026 04:00:0%d GMT" % i for i in range(len(bodies))]
        script += [[answer(body, date)] for body, date in zip(bodies, dates, strict=True)]
        seen = []
        for body, date in zip(bodies, dates, strict=True):
            resp, got = await _call(relay, port)
            assert got == body and resp.status == 200 and resp.reason == "OK" and resp.keep_alive
            assert resp.headers["Date"] == date.decode()
            assert resp.content_length == len(body)
            assert resp.headers["Content-Type"] == "application/json"
            names = [k for k, _ in resp.raw_headers]
            assert names == [b"date", b"server", b"content-type", b"content-length"]
            fields, ctype, length = _answer_fields(resp, "sid", True)
            assert ctype == "application/json" and length == len(body)
            assert fields == b"content-type: application/json\r\nMcp-Session-Id: sid\r\n"
            seen.append(resp.memo is not None)
            resp.release()
        # the first answer is parsed; the others are taken by the head it left
        assert seen == [False, True, True, True]
        assert len(relay.pool("127.0.0.1", port).idle) == 1  # one connection, given back each time
    await relay.close()


async def test_answers_unlike_the_last_head_go_through_the_parser() -> None:
    relay = Relay()
    async with scripted() as (port, script):
        first = answer(b'{"a":1}')
        script += [
            [first],
            [answer(b'{"a":1}', mcp_session_id=b"x")],  # a header more
            [answer(b'{"a":2}').replace(b"application/json", b"application/jsox")],  # another value
            [answer(b'{"a":3}')[:-3], answer(b'{"a":3}')[-3:]],  # the body in two reads
            [answer(b'{"a":4}').replace(b"content-length: 7", b"content-length:  7")],  # spelled apart
            [answer(b'{"a":5}')],
            [answer(b'{"a":66}')],
        ]
        expected = [
            (b'{"a":1}', None),
            (b'{"a":1}', "x"),
            (b'{"a":2}', None),
            (b'{"a":3}', None),
            (b'{"a":4}', None),
            (b'{"a":5}', None),
            (b'{"a":66}', None),
        ]
        memo = []
        for body, sid in expected:
            resp, got = await _call(relay, port)
            assert got == body and resp.status == 200
            assert resp.headers.get("mcp-session-id") == sid
            memo.append(resp.memo is not None)
            resp.release()
        # a parsed answer that came whole leaves its own head: the last one repeats the one before
        assert memo == [False, False, False, False, False, False, True]
        assert resp.headers["Content-Type"] == "application/json"
    await relay.close()


async def test_a_read_with_more_than_the_answer_is_left_to_the_parser() -> None:
    relay = Relay()
    async with scripted() as (port, script):
        script += [[answer(b'{"a":1}')], [answer(b'{"a":2}') + b"HTTP/1.1 200 OK\r\n"]]
        resp, _ = await _call(relay, port)
        resp.release()
        resp, got = await _call(relay, port)
        assert got == b'{"a":2}' and resp.memo is None  # the parser read it (and what followed)
        assert resp.conn.same is None
        resp.close()
    await relay.close()


async def test_an_answer_that_closes_its_connection_leaves_no_head() -> None:
    relay = Relay()
    async with scripted() as (port, script):
        script += [[answer(b'{"a":1}', connection=b"close")]]
        resp, got = await _call(relay, port)
        assert got == b'{"a":1}' and not resp.keep_alive
        assert resp.conn.same is None
        resp.release()
    await relay.close()
