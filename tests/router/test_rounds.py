"""The router's background rounds (router/app.py `_every`) stop when cancelled, always."""

from __future__ import annotations

import asyncio

import pytest

from router.app import _every


async def test_a_round_that_swallows_its_cancellation_still_stops_the_loop() -> None:
    entered = asyncio.Event()

    async def swallowing_round() -> None:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # what a client library caught by mistake (seen once in the link handoffs)

    task = asyncio.create_task(_every(0.01, "test", swallowing_round))
    await entered.wait()
    task.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_failing_round_is_retried() -> None:
    calls = 0
    third = asyncio.Event()

    async def failing_round() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            third.set()
        raise RuntimeError("boom")

    task = asyncio.create_task(_every(0.001, "test", failing_round))
    async with asyncio.timeout(5):
        await third.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
