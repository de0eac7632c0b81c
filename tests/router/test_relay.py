"""The relay's pools (router/upstream.py): sending without waiting, and pruning departed addresses.

A tiny HTTP server on loopback plays the instance; no fleet needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router import upstream
from router.sseresponse import ResponseWatch
from router.upstream import Lost, Relay, Response
from tests.router.planned_instance import BIG_BODY, HEAD, LATE_EVENT, RESPONSE_EVENT, planned_instance


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


async def _until_response(resp: Response) -> bytes:
    """Read an SSE answer up to the end of the response's event; what came after it in that read."""
    watch = ResponseWatch(1)
    async for data in resp.iter_chunks(5.0):
        cut = watch.feed(data)
        if cut is not None:
            assert data[:cut].endswith(RESPONSE_EVENT)
            return data[cut:]
    raise AssertionError("the answer ended without the response")


async def test_an_answer_drained_after_its_response_gives_its_connection_back(
    instance: tuple[int, list[str]], caplog: pytest.LogCaptureFixture
) -> None:
    """drain(): the caller has the response; the instance's end, 0.05 s later, is read here,
    and the connection goes back to the pool then, usable (the next call is answered on it)."""
    port, plan = instance
    relay = Relay()
    try:
        await _warm(relay, port)
        pool = relay.pools[("127.0.0.1", port)]
        conn = pool.idle[0]
        for step in ("sse", "sse-more"):
            plan.append(step)
            resp = await relay.send("127.0.0.1", port, HEAD, b"{}", 5.0)
            rest = await _until_response(resp)
            assert not resp.complete  # the instance has not ended its answer yet
            resp.drain(rest)
            assert pool.idle == [] and pool.busy == 1
            for _ in range(100):
                if pool.idle:
                    break
                await asyncio.sleep(0.02)
            assert pool.idle == [conn] and pool.busy == 0 and not conn.closed
            await _warm(relay, port)
            assert pool.idle == [conn]  # the same connection answered the next call
        # what came after the response (the "sse-more" event) is not relayed: it is said
        assert resp.extra == len(LATE_EVENT.strip())
        assert any("more bytes after the response" in r.getMessage() for r in caplog.records)
    finally:
        await relay.close()


async def test_an_answer_that_does_not_end_after_its_response_loses_its_connection(
    instance: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    port, plan = instance
    monkeypatch.setattr(upstream, "DRAIN_TIMEOUT", 0.2)
    relay = Relay()
    try:
        await _warm(relay, port)
        pool = relay.pools[("127.0.0.1", port)]
        conn = pool.idle[0]
        plan.append("sse-open")
        resp = await relay.send("127.0.0.1", port, HEAD, b"{}", 5.0)
        resp.drain(await _until_response(resp))
        for _ in range(100):
            if conn.closed:
                break
            await asyncio.sleep(0.02)
        assert conn.closed and pool.busy == 0 and pool.idle == []
        assert isinstance(resp.error, Lost) and resp.error.silent
        await _warm(relay, port)  # a new connection serves the next call
    finally:
        await relay.close()
