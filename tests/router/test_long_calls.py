"""Long calls through the router, both eras, with the SDK's own `Client`: progress
notifications reach the client while the call still runs (copied as they come, not held until
the answer), and a call that stays silent for longer than the router's upstream read timeout
still gets its answer whole.

The fake provider holds its answer until the test lets it go (`Behaviour.gate`), so what is
asserted is an order of events, not a duration. The fleet runs under real supervisord.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, mcp_client

pytestmark = pytest.mark.timeout(180)

MODES = ("legacy", "2026-07-28")
READ_TIMEOUT = 20.0  # EXAI_UPSTREAM_READ_TIMEOUT: above the 2026-07-28 SDK's 15 s SSE pings


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=2,
        max_instances=2,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        provider_max_retries=0,
        upstream_read_timeout=READ_TIMEOUT,
        **ROUTER_TEST_SETTINGS,
    )


@pytest.mark.parametrize("mode", MODES)
async def test_progress_arrives_while_the_call_runs(fleet: Fleet, provider: FakeProvider, mode: str) -> None:
    gate = threading.Event()
    provider.reset(Behaviour(gate=gate))
    seen: list[str] = []
    first = asyncio.Event()

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")
        first.set()

    try:
        async with mcp_client(fleet.mcp_url, mode, name=f"progress-{mode}") as client:
            call = asyncio.create_task(
                client.call_tool("chat", {"prompt": f"long one {mode}"}, progress_callback=on_progress)
            )
            async with asyncio.timeout(30):
                await first.wait()  # the instance's heartbeat, relayed mid-call
            assert not call.done() and provider.snapshot(), "progress came only with the answer"
            gate.set()
            result = await asyncio.wait_for(call, 30)
            assert not result.is_error, result
            assert result.structured_content is not None
            assert f"long one {mode}" in result.structured_content["content"]
            assert seen and all("waiting for" in m for m in seen), seen
    finally:
        gate.set()
        provider.reset()
        await fleet.end_all_sessions()


@pytest.mark.parametrize("mode", MODES)
async def test_a_call_silent_for_longer_than_the_read_timeout_is_answered(
    fleet: Fleet, provider: FakeProvider, mode: str
) -> None:
    # No progress token: nothing for the client to see until the answer. The instance's SSE
    # stream sends a ping comment every 15 s (both eras), which the router relays: it does not
    # take the wait for a hung instance, and the answer comes whole.
    provider.reset(Behaviour(delay=READ_TIMEOUT + 5))
    try:
        async with mcp_client(fleet.mcp_url, mode, name=f"silent-{mode}") as client:
            result = await asyncio.wait_for(client.call_tool("chat", {"prompt": f"silent one {mode}"}), 60)
            assert not result.is_error, result
            assert result.structured_content is not None
            assert f"silent one {mode}" in result.structured_content["content"]
    finally:
        provider.reset()
        await fleet.end_all_sessions()


async def test_more_calls_at_once_than_connections_per_instance_all_answer(
    fleet: Fleet, provider: FakeProvider
) -> None:
    """One 2026-07-28 session with more calls in flight than the router keeps connections to
    its instance (router/upstream.py, CALLS_PER_INSTANCE): the rest wait for a connection,
    none is refused or lost, each gets its own answer."""
    from router.upstream import CALLS_PER_INSTANCE

    count = CALLS_PER_INSTANCE + 8
    provider.reset(Behaviour(delay=0.5))
    try:
        async with mcp_client(fleet.mcp_url, "2026-07-28", name="many-at-once") as client:
            results = await asyncio.wait_for(
                asyncio.gather(*(client.call_tool("chat", {"prompt": f"call {n}"}) for n in range(count))),
                120,
            )
        for n, result in enumerate(results):
            assert not result.is_error, result
            assert result.structured_content is not None
            assert f"call {n}" in result.structured_content["content"]
        assert len(provider.snapshot()) == count
    finally:
        provider.reset()
        await fleet.end_all_sessions()
