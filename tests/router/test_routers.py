"""More than one router: routers on different ports (or several processes on one port) serve
one fleet, and Redis is the truth about sessions and leases.

Real supervisord runs the fleet (tests/fleet.py); a second `exai-router` process on another
port (`ExtraRouter`) shares its Redis prefix. Clients are the SDK's own `Client` of both eras;
a client can be moved from one router to the other between calls (`Switch`), keeping its
session (the handshake era its Mcp-Session-Id).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import mcp_types
import pytest
import redis.asyncio as aioredis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.fleet import ExtraRouter, Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, status_of

pytestmark = pytest.mark.usefixtures("provider")

MODES = ("legacy", "2026-07-28")
# Quick lease rounds, so a wrong renewal would show within the test's waits.
SETTINGS = {**ROUTER_TEST_SETTINGS, "lease_ttl": 3.0}


class Switch:
    """Which router port a client's requests go to; flip `port` between calls."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.session_ids: list[str] = []
        self.versions: list[str] = []

    async def hook(self, request: httpx2.Request) -> None:
        request.url = request.url.copy_with(port=self.port)
        if sid := request.headers.get("mcp-session-id"):
            self.session_ids.append(sid)
        if version := request.headers.get("mcp-protocol-version"):
            self.versions.append(version)


@contextlib.asynccontextmanager
async def switched_client(fleet: Fleet, switch: Switch, mode: str) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(
            timeout=httpx2.Timeout(30.0, read=60.0),
            event_hooks={"request": [switch.hook]},
            limits=httpx2.Limits(max_keepalive_connections=0),  # a new connection per request
        ) as http,
        Client(
            streamable_http_client(fleet.mcp_url, http_client=http),
            mode=mode,  # type: ignore[arg-type]
            client_info=mcp_types.Implementation(name=f"multi-{mode}", version="1"),
        ) as client,
    ):
        yield client


async def _open(
    stack: contextlib.AsyncExitStack, fleet: Fleet, switches: dict[str, Switch]
) -> dict[str, Client]:
    return {m: await stack.enter_async_context(switched_client(fleet, sw, m)) for m, sw in switches.items()}


def _pid(metric_line: str) -> str:
    return metric_line.split('pid="')[1].split('"')[0]


async def _cached(fleet: Fleet, router_url: str) -> float:
    """Sessions a router holds in memory (its exai_router_sessions gauge)."""
    status, text = await fleet.admin("GET", "/metrics", router_url=router_url)
    assert status == 200
    lines = [line for line in text.splitlines() if line.startswith("exai_router_sessions{")]
    assert lines, text[:500]
    return sum(float(line.split()[-1]) for line in lines)


async def _sessions(fleet: Fleet, router_url: str) -> dict[str, dict[str, Any]]:
    status, body = await fleet.admin("GET", "/admin/sessions", router_url=router_url)
    assert status == 200, body
    return {s["id"]: s for s in body["sessions"]}


async def _instances(fleet: Fleet, router_url: str) -> set[str]:
    status, body = await fleet.admin("GET", "/admin/instances", router_url=router_url)
    assert status == 200, body
    return {i["id"] for i in body["instances"]}


@pytest.fixture
def fleet(fleet_factory: Any) -> Fleet:
    fleet: Fleet = fleet_factory(instances=2, max_instances=2, **SETTINGS)
    return fleet


async def test_sessions_move_between_routers_and_end_everywhere(fleet: Fleet) -> None:
    """Both eras: start through one router, continue through the other, end through the first;
    the second forgets it, renews no lease for it and re-creates nothing, so both instances
    serve new sessions again (before, the stale router kept the lease: 503)."""
    redis = aioredis.from_url(str(fleet.settings.redis_url), decode_responses=True)
    try:
        with ExtraRouter(fleet) as other:
            await asyncio.to_thread(fleet.wait_registered, 2)
            a, b = fleet.router_url, other.router_url
            assert (
                await _instances(fleet, a)
                == await _instances(fleet, b)
                == {
                    fleet.instance_id(1),
                    fleet.instance_id(2),
                }
            )
            switches = {mode: Switch(fleet.settings.router_port) for mode in MODES}
            ended: list[str] = []
            async with contextlib.AsyncExitStack() as stack:
                clients = await _open(stack, fleet, switches)
                first = {m: await status_of(c) for m, c in clients.items()}
                for m in MODES:
                    switches[m].port = other.port
                moved = {m: await status_of(c) for m, c in clients.items()}
                for m in MODES:
                    # Same session, same instance, whichever router carried the call.
                    assert moved[m]["session"] == first[m]["session"]
                    assert moved[m]["instance_id"] == first[m]["instance_id"]
                handshake = switches["legacy"].session_ids
                assert len(set(handshake)) == 1, handshake  # one Mcp-Session-Id through both routers
                # Either router's admin API shows the whole fleet's sessions.
                seen_a, seen_b = await _sessions(fleet, a), await _sessions(fleet, b)
                ended = sorted(seen_a)
                assert set(seen_a) == set(seen_b) and len(seen_a) == 2
                await status_of(clients["legacy"])  # dirty in the second router's counters
                for m in MODES:
                    switches[m].port = fleet.settings.router_port  # end them through the first
            # The handshake client sent DELETE; end the stateless one through the first router
            # (before the second's next counter flush).
            for sid in ended:
                await fleet.admin("DELETE", f"/admin/sessions/{sid}")
            await asyncio.sleep(4 * 1.0 + 1.0)  # several lease-renewal and flush rounds (ttl 3 s)
            assert await _sessions(fleet, b) == {} and await _sessions(fleet, a) == {}
            assert await _cached(fleet, b) == 0  # gone from the second router's memory too
            for sid in ended:
                assert not await redis.exists(fleet.keys.session(sid)), "a flush re-created it"
            for num in (1, 2):
                assert await redis.get(fleet.keys.lease(fleet.instance_id(num))) is None
            # Both instances free: two new sessions through the second router are served.
            async with contextlib.AsyncExitStack() as stack:
                fresh = await _open(stack, fleet, {m: Switch(other.port) for m in MODES})
                got = {(await status_of(c))["instance_id"] for c in fresh.values()}
                assert got == {fleet.instance_id(1), fleet.instance_id(2)}
    finally:
        await redis.aclose()


async def test_router_killed_under_load_loses_no_session(fleet_factory: Any) -> None:
    """SIGKILL a router while it carries calls: no session is lost. Sessions between calls
    (both eras, SDK clients) go on through the other router on the same instance; the
    sessions whose calls the dead router cut (their SDK clients give up on the broken
    connection) are still there too and answer through the other router."""
    fleet: Fleet = await asyncio.to_thread(fleet_factory, instances=4, max_instances=4, **SETTINGS)
    with ExtraRouter(fleet) as other:
        switches = {mode: Switch(other.port) for mode in MODES}
        async with contextlib.AsyncExitStack() as stack:
            clients = await _open(stack, fleet, switches)
            before = {m: await status_of(c) for m, c in clients.items()}
            # Load: more handshake sessions calling through the router that will die.
            loaders = [Switch(other.port) for _ in range(2)]
            started = asyncio.Event()
            cut: list[BaseException] = []

            async def load(sw: Switch) -> None:
                try:
                    async with switched_client(fleet, sw, "legacy") as c:
                        while True:
                            await status_of(c)
                            started.set()
                except Exception as exc:  # the killed router cut the call in flight
                    cut.append(exc)

            tasks = [asyncio.create_task(load(sw)) for sw in loaders]
            await asyncio.wait_for(started.wait(), 30.0)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(other.kill, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 60.0)
            assert len(cut) == len(loaders)  # each was cut, none hung
            for m in MODES:
                switches[m].port = fleet.settings.router_port
                after = await status_of(clients[m])
                assert after["session"] == before[m]["session"]
                assert after["instance_id"] == before[m]["instance_id"]
            assert len(set(switches["legacy"].session_ids)) == 1
            listed = await _sessions(fleet, fleet.router_url)
            assert {before[m]["session"] for m in MODES} <= set(listed)
            async with httpx2.AsyncClient(timeout=30.0) as http:
                for sw in loaders:
                    sid = sw.session_ids[-1]
                    assert sid in listed
                    call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "status"}}
                    answer = await http.post(
                        fleet.mcp_url,
                        json=call,
                        headers={
                            "Mcp-Session-Id": sid,
                            "MCP-Protocol-Version": sw.versions[-1],
                            "Accept": "application/json, text/event-stream",
                        },
                    )
                    assert answer.status_code == 200, answer.text
                    assert sid in answer.text  # the status tool names the session it serves


async def test_two_router_processes_share_one_port(fleet_factory: Any) -> None:
    """EXAI_ROUTER_PROCESSES=2: supervisord runs two routers on one port (SO_REUSEPORT); with a
    new connection per request either may accept, and sessions of both eras are served."""
    fleet: Fleet = await asyncio.to_thread(
        fleet_factory, instances=2, max_instances=2, router_processes=2, **SETTINGS
    )
    procs = {p.full_name: p for p in await asyncio.to_thread(fleet.processes)}
    routers = [procs[f"router:router_{n}"] for n in (1, 2)]
    assert all(p.state == "RUNNING" for p in routers), routers
    pids = {str(p.pid) for p in routers}
    answered: set[str] = set()
    for _ in range(30):  # which process answers: the kernel spreads new connections
        status, text = await fleet.admin("GET", "/metrics")
        assert status == 200
        answered |= {_pid(line) for line in text.splitlines() if line.startswith("exai_router_process{")}
        if answered == pids:
            break
    assert answered == pids, (answered, pids)
    switches = {mode: Switch(fleet.settings.router_port) for mode in MODES}
    async with contextlib.AsyncExitStack() as stack:
        clients = await _open(stack, fleet, switches)
        first = {m: await status_of(c) for m, c in clients.items()}
        for _ in range(10):
            for m, c in clients.items():
                st = await status_of(c)
                assert (st["session"], st["instance_id"]) == (first[m]["session"], first[m]["instance_id"])
    assert len(set(switches["legacy"].session_ids)) == 1
    await fleet.end_all_sessions()
    await asyncio.sleep(4.0)  # lease rounds of both processes: nothing left held
    redis = aioredis.from_url(str(fleet.settings.redis_url), decode_responses=True)
    try:
        for num in (1, 2):
            assert await redis.get(fleet.keys.lease(fleet.instance_id(num))) is None
    finally:
        await redis.aclose()
