"""The relay's silence timer (router/upstream.py): one per connection, not one per wait.

A tiny HTTP server on loopback plays the instance: it answers at once, after a pause, or
sends its headers and then nothing. No fleet needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router.upstream import Lost, Relay
from tests.router.planned_instance import HEAD, planned_instance


@pytest.fixture
async def instance() -> AsyncIterator[tuple[int, list[str]]]:
    async with planned_instance() as planned:
        yield planned


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
        plan.append("headers")
        with pytest.raises(Lost) as lost:
            await _call(relay, port, 0.2)
        assert lost.value.silent
        # The connection's timer is armed for a long silence by one call; a later call on the
        # same connection with a shorter limit is still cut after its own limit.
        plan += ["now", "headers"]
        assert await _call(relay, port, 30.0) == b"{}"
        async with asyncio.timeout(10):  # fails here if the 30 s timer were the one that counts
            with pytest.raises(Lost) as lost:
                await _call(relay, port, 0.2)
        assert lost.value.silent
    finally:
        await relay.close()
