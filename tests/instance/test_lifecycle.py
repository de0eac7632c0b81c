"""The instance's uvicorn server (instance/lifecycle.py): its housekeeping tick and its stop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import uvicorn

from common.settings import Settings
from instance import lifecycle
from instance.lifecycle import InstanceServer
from instance.runtime import Identity, Runtime


async def _app(scope: object, receive: object, send: object) -> None:  # never called here
    raise AssertionError("no request is served in these tests")


def _server(settings: Settings) -> InstanceServer:
    runtime = Runtime(settings, Identity(id="tick-test", host="127.0.0.1", port=1), version="t")
    server = InstanceServer(uvicorn.Config(_app, log_config=None), runtime)
    server.server_state = uvicorn.server.ServerState()
    return server


async def test_the_main_loop_stamps_the_date_and_stops_when_asked_not_at_its_next_tick(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's own loop wakes ten times a second; ours ticks rarely (here: once an hour) and
    still stops as soon as a drain or a second Ctrl-C asks it to."""
    monkeypatch.setattr(lifecycle, "TICK_SECONDS", 3600.0)
    server = _server(make_settings())
    ticks = 0
    tick = server.on_tick

    async def counted(counter: int) -> bool:
        nonlocal ticks
        ticks += 1
        return await tick(counter)

    server.on_tick = counted  # type: ignore[method-assign]
    loop = asyncio.create_task(server.main_loop())
    await asyncio.sleep(0.5)  # uvicorn's own loop would have ticked five times by now
    assert not loop.done() and ticks == 1
    assert any(name == b"date" for name, _ in server.server_state.default_headers)  # the first tick
    server.should_exit = True
    await asyncio.wait_for(loop, 10)  # an hour's tick would time this out


async def test_a_stop_asked_before_the_loop_starts_is_kept(make_settings: Callable[..., Settings]) -> None:
    server = _server(make_settings())
    server.should_exit = True
    await asyncio.wait_for(server.main_loop(), 10)
    assert server.should_exit
