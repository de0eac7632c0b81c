"""Failure paths: a call in flight on a dying instance, client disconnects, idle sessions.

The fake provider holds calls open (delay) so a test can act while a call is in flight. The
fleet runs under real supervisord (tests/fleet.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from mcp.shared.exceptions import MCPError

from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, instance_num, mcp_client, status_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=2,
        max_instances=2,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        session_idle_timeout=3.0,
        provider_max_retries=0,
        **ROUTER_TEST_SETTINGS,
    )


async def _health(fleet: Fleet, instance_id: str) -> dict[str, Any]:
    port = fleet.instance_port(instance_num(instance_id))
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{port}/internal/health",
            headers={"X-Exai-Internal-Token": fleet.internal_token},
        ) as r,
    ):
        return dict(await r.json())


async def _until(pred: Any, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_call_in_flight_on_a_killed_instance_gets_a_clear_error(
    fleet: Fleet, provider: FakeProvider, mode: str
) -> None:
    provider.reset(Behaviour(delay=60))
    async with mcp_client(fleet.mcp_url, mode, name=f"inflight-{mode}") as client:
        before = await status_of(client)
        call = asyncio.create_task(client.call_tool("chat", {"prompt": "slow one"}))
        await _until(lambda: asyncio.sleep(0, bool(provider.snapshot())))
        # kill -9, and supervisord does not bring it back (like an instance it gave up on).
        await asyncio.to_thread(fleet.kill_instance, instance_num(before["instance_id"]), restart=False)
        with pytest.raises(MCPError) as info:
            await asyncio.wait_for(call, 30)
        assert info.value.error.code == -32000
        assert "stopped" in info.value.error.message and "instance_lost" in json.dumps(info.value.error.data)
        # what to do, in the message a client shows: the call may have run; retry if safe
        assert "retry the call if it is safe to repeat" in info.value.error.message, info.value.error

        provider.reset()
        after = await status_of(client)  # the next call is served elsewhere, same session
        assert after["session"] == before["session"] and after["instance_id"] != before["instance_id"]
    await asyncio.to_thread(fleet.start_instance, instance_num(before["instance_id"]))
    # the instance itself, not the registry: the killed process's record may still read "ready"
    await fleet.wait_instance_ready(instance_num(before["instance_id"]))
    await fleet.wait_instances(2)
    await fleet.end_all_sessions()


async def test_client_disconnect_cancels_the_upstream_call(fleet: Fleet, provider: FakeProvider) -> None:
    provider.reset(Behaviour(delay=60))
    async with mcp_client(fleet.mcp_url, "2026-07-28", name="quitter") as client:
        st = await status_of(client)
    body = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "tools/call",
        "params": {
            "name": "chat",
            "arguments": {"prompt": "never mind"},
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                "io.modelcontextprotocol/clientInfo": {"name": "quitter", "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    headers = {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "chat",
    }

    async def post() -> None:
        async with aiohttp.ClientSession() as http, http.post(fleet.mcp_url, json=body, headers=headers) as r:
            await r.read()

    task = asyncio.create_task(post())

    async def running() -> bool:
        return int((await _health(fleet, st["instance_id"]))["inflight"]) >= 1

    await _until(running)
    task.cancel()  # the client goes away mid-call

    async def idle() -> bool:
        return int((await _health(fleet, st["instance_id"]))["inflight"]) == 0

    await _until(idle)  # the instance cancelled the call although the provider still holds it
    provider.reset()
    await fleet.end_all_sessions()


async def test_client_disconnect_mid_sse_answer_cancels_the_handshake_era_call(
    fleet: Fleet, provider: FakeProvider
) -> None:
    """The same in the handshake era, whose calls are answered as SSE streams: a client that
    closes its connection while the stream is open (headers relayed, the answer not yet) gets
    the instance's tool cancelled too."""
    provider.reset(Behaviour(delay=60))
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2025-11-25"}
    client = {"name": "sse-quitter", "version": "1"}
    params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": client}
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
    async with aiohttp.ClientSession() as http:
        async with http.post(fleet.mcp_url, json=init, headers=headers) as r:
            assert r.status == 200, await r.text()
            headers["Mcp-Session-Id"] = r.headers["Mcp-Session-Id"]
            await r.read()
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with http.post(fleet.mcp_url, json=note, headers=headers) as r:
            assert r.status == 202
        status = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "status", "arguments": {}},
        }
        async with http.post(fleet.mcp_url, json=status, headers=headers) as r:
            data = [ln[5:] for ln in (await r.text()).splitlines() if ln.startswith("data:")]
            iid = json.loads(data[-1])["result"]["structuredContent"]["instance_id"]
    opened = asyncio.Event()

    async def post() -> None:
        chat = {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "chat", "arguments": {"prompt": "x"}},
        }
        async with aiohttp.ClientSession() as http, http.post(fleet.mcp_url, json=chat, headers=headers) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            opened.set()
            await r.read()

    task = asyncio.create_task(post())

    async def running() -> bool:
        return int((await _health(fleet, iid))["inflight"]) >= 1

    await _until(running)
    await asyncio.wait_for(opened.wait(), 15)  # the stream is open: the router is copying it
    task.cancel()  # the client goes away mid-call

    async def idle() -> bool:
        return int((await _health(fleet, iid))["inflight"]) == 0

    await _until(idle)  # cancelled there although the provider still holds the request
    provider.reset()
    await fleet.end_all_sessions()


async def test_sessions_expire_and_free_their_instance(fleet: Fleet) -> None:
    async with mcp_client(fleet.mcp_url, "2026-07-28", name="sleepy") as client:
        st = await status_of(client)

    async def gone() -> bool:
        _, body = await fleet.admin("GET", "/admin/sessions")
        return st["session"] not in {s["id"] for s in body["sessions"]}

    async def freed() -> bool:
        # The lease is released only after the instance has been reset, a moment after the
        # session leaves the table.
        _, body = await fleet.admin("GET", "/admin/instances")
        return next(i for i in body["instances"] if i["id"] == st["instance_id"])["session"] is None

    async def counted() -> bool:
        # The end is counted once its lease is freed, a moment after `freed` can see it.
        _, metrics = await fleet.admin("GET", "/metrics")
        return 'exai_router_sessions_ended_total{reason="expired"}' in metrics

    await _until(gone, timeout=20)
    await _until(freed, timeout=10)
    await _until(counted, timeout=5)
