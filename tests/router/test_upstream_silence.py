"""The relay's silence timer (router/upstream.py): one per connection, not one per wait.

A tiny HTTP server on loopback plays the instance: it answers at once, after a pause, or
sends its headers and then nothing. No fleet needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router.upstream import Lost, Relay

HEAD = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@pytest.fixture
async def instance() -> AsyncIterator[tuple[int, list[str]]]:
    """A server whose next behaviours are popped from the list: 'now', 'pause', 'silent'."""
    plan: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(2)
                step = plan.pop(0) if plan else "now"
                if step == "pause":
                    await asyncio.sleep(0.15)
                if step == "silent":
                    writer.write(ANSWER[: ANSWER.index(b"\r\n\r\n") + 4])  # headers, then nothing
                    await writer.drain()
                    await asyncio.sleep(30)
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, plan
    finally:
        server.close()


async def _call(relay: Relay, port: int, timeout: float | None) -> bytes:
    resp = await relay.send("127.0.0.1", port, HEAD, b"{}", timeout)
    try:
        return await resp.read(timeout)
    finally:
        resp.release()


async def test_waits_on_one_connection_each_get_their_full_silence(instance: tuple[int, list[str]]) -> None:
    port, plan = instance
    relay = Relay()
    try:
        # The timer armed by the first call (0.2 s) must not cut later calls that each stay
        # within 0.2 s, though together they last longer than that.
        plan += ["pause", "pause", "pause"]
        for _ in range(4):
            assert await _call(relay, port, 0.2) == b"{}"
        assert len(relay.pools[("127.0.0.1", port)].idle) == 1  # one connection throughout
        # A wait without a limit is left alone by a timer an earlier wait armed.
        plan.append("pause")
        assert await _call(relay, port, None) == b"{}"
    finally:
        await relay.close()


async def test_a_silent_instance_is_reported_after_the_silence(instance: tuple[int, list[str]]) -> None:
    port, plan = instance
    relay = Relay()
    try:
        plan.append("silent")
        with pytest.raises(Lost) as lost:
            await _call(relay, port, 0.2)
        assert lost.value.silent
        # The connection's timer is armed for a long silence by one call; a later call on the
        # same connection with a shorter limit is still cut after its own limit.
        plan += ["now", "silent"]
        assert await _call(relay, port, 30.0) == b"{}"
        async with asyncio.timeout(10):  # fails here if the 30 s timer were the one that counts
            with pytest.raises(Lost) as lost:
                await _call(relay, port, 0.2)
        assert lost.value.silent
    finally:
        await relay.close()
