"""The relay's pools (router/upstream.py): sending without waiting, and pruning departed addresses.

A tiny HTTP server on loopback plays the instance; no fleet needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router.upstream import Relay, Response
from tests.router.planned_instance import BIG_BODY, HEAD, planned_instance


@pytest.fixture
async def instance() -> AsyncIterator[tuple[int, list[str]]]:
    async with planned_instance() as planned:
        yield planned


async def _warm(relay: Relay, port: int) -> None:
    """One ordinary call, so the pool holds an idle connection."""
    resp = await relay.send("127.0.0.1", port, HEAD, b"{}", 5.0)
    assert await resp.read(5.0) == b"{}"
    resp.release()


async def _followed(resp: Response) -> list[bool]:
    """Follow `resp` through its notify callback until it completes or fails; the calls' flags."""
    seen: list[bool] = []
    done = asyncio.get_running_loop().create_future()

    def notify(timed_out: bool) -> None:
        seen.append(timed_out)
        if (timed_out or resp.complete or resp.error is not None) and not done.done():
            done.set_result(None)

    resp.notify = notify
    await asyncio.wait_for(done, 10)
    return seen


async def test_send_now_uses_an_idle_connection_and_reports_through_notify(
    instance: tuple[int, list[str]],
) -> None:
    port, plan = instance
    relay = Relay()
    try:
        assert relay.send_now("127.0.0.1", port, HEAD + b"{}", 5.0) is None  # no pool yet: send() opens
        await _warm(relay, port)
        plan.append("split")
        resp = relay.send_now("127.0.0.1", port, HEAD + b"{}", 5.0)
        assert resp is not None
        seen = await _followed(resp)
        assert seen and not any(seen) and resp.complete and resp.status == 200
        assert resp.take() == b"{}"
        resp.release()
        assert len(relay.pools[("127.0.0.1", port)].idle) == 1  # the connection is back
    finally:
        await relay.close()


async def test_send_now_reports_silence_and_loss(instance: tuple[int, list[str]]) -> None:
    port, plan = instance
    relay = Relay()
    try:
        await _warm(relay, port)
        plan.append("mute")
        resp = relay.send_now("127.0.0.1", port, HEAD + b"{}", 0.2)
        assert resp is not None
        assert await _followed(resp) == [True]  # the silence timer, not an answer
        resp.close()

        await _warm(relay, port)
        plan.append("drop")  # the instance closes the connection without answering
        resp = relay.send_now("127.0.0.1", port, HEAD + b"{}", 5.0)
        assert resp is not None
        await _followed(resp)
        assert resp.error is not None and not resp.complete
        resp.close()
    finally:
        await relay.close()


async def test_pools_of_departed_addresses_are_pruned(instance: tuple[int, list[str]]) -> None:
    port, plan = instance
    relay = Relay()
    try:
        await _warm(relay, port)
        conn = relay.pools[("127.0.0.1", port)].idle[0]
        assert relay.prune({("127.0.0.1", port)}) == 0  # still registered: kept
        plan.append("mute")
        resp = relay.send_now("127.0.0.1", port, HEAD + b"{}", 5.0)
        assert resp is not None
        assert relay.prune(set()) == 0  # a call in flight: kept for a later round
        resp.close()
        await _warm(relay, port)
        conn = relay.pools[("127.0.0.1", port)].idle[0]
        assert relay.prune(set()) == 1
        assert relay.pools == {} and conn.closed
        await _warm(relay, port)  # an address that comes back gets a new pool
        assert len(relay.pools) == 1
    finally:
        await relay.close()


async def test_a_whole_answer_larger_than_the_read_ahead_is_read_to_its_end(
    instance: tuple[int, list[str]],
) -> None:
    """read() takes a whole JSON answer (up to 1 MiB): pausing the instance's connection at the
    256 KiB read-ahead must not leave it waiting for bytes it stopped reading."""
    port, plan = instance
    relay = Relay()
    try:
        plan.append("big")
        resp = await relay.send("127.0.0.1", port, HEAD, b"{}", 5.0)
        await resp.wait_headers(5.0)
        assert await resp.read(5.0) == BIG_BODY
        resp.release()
        await _warm(relay, port)  # and the connection went back to the pool in a usable state
    finally:
        await relay.close()
