"""Instances on other hosts: each host is its own supervisord running only instances on another
loopback address (127.0.0.2, 127.0.0.3), registered in the fleet's Redis with the address the
router must use. The router routes to them like local ones, every hop carries the internal
token, and a host that disappears (supervisord and its instances killed at once) is handled
like dead instances: its sessions fail over, keeping their ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet, InstanceHost
from tests.router.conftest import ROUTER_TEST_SETTINGS, mcp_client, status_of

pytestmark = pytest.mark.timeout(240)

HOST_A, HOST_B = "127.0.0.2", "127.0.0.3"


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=1,
        max_instances=1,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        provider_max_retries=0,
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture
def hosts(fleet: Fleet, tmp_path: Path) -> Iterator[tuple[InstanceHost, InstanceHost]]:
    with (
        InstanceHost(fleet, tmp_path / "host_a", HOST_A, instances=2) as a,
        InstanceHost(fleet, tmp_path / "host_b", HOST_B, instances=2) as b,
    ):
        yield a, b


async def test_routers_route_to_instances_on_other_hosts_and_survive_a_host_dying(
    fleet: Fleet, provider: FakeProvider, hosts: tuple[InstanceHost, InstanceHost]
) -> None:
    host_a, host_b = hosts
    ready = await fleet.wait_instances(5)
    where = {i["id"]: i["host"] for i in ready}
    assert where[host_a.instance_id(1)] == HOST_A and where[host_b.instance_id(2)] == HOST_B
    assert where["instance_01"] == "127.0.0.1"

    # Every hop needs the internal token: an instance on another host refuses anyone else.
    url = f"http://{HOST_B}:{host_b.instance_port(1)}"
    async with aiohttp.ClientSession() as http:
        async with http.post(url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"}) as r:
            assert r.status == 401
        token = {"X-Exai-Internal-Token": fleet.internal_token}
        async with http.get(url + "/internal/health", headers=token) as r:
            assert r.status == 200
        # Orchestrator probes need no token and tell nothing but the state.
        async with http.get(url + "/healthz") as r:
            assert r.status == 200 and await r.json() == {"state": "ready"}
        async with http.get(url + "/readyz") as r:
            assert r.status == 200
        spare = f"http://{HOST_A}:{host_a.instance_port(2)}"
        async with http.post(spare + "/internal/drain", headers=token) as r:
            assert r.status == 200
        async with http.get(spare + "/readyz") as r:
            assert r.status == 503 and await r.json() == {"state": "draining"}

    async with (
        mcp_client(fleet.mcp_url, "legacy", name="one") as one,
        mcp_client(fleet.mcp_url, "legacy", name="two") as two,
        mcp_client(fleet.mcp_url, "2026-07-28", name="three") as three,
    ):
        # Allocation takes free instances in id order: one here, one on each other host.
        st = {name: await status_of(c) for name, c in (("one", one), ("two", two), ("three", three))}
        placed = {name: s["instance_id"] for name, s in st.items()}
        assert placed == {"one": "instance_01", "two": host_a.instance_id(1), "three": host_b.instance_id(1)}
        for name, c in (("two", two), ("three", three)):
            result = await c.call_tool("chat", {"prompt": f"hello from {name}"})
            assert not result.is_error, result

        # Host A disappears at once: no drain, no deregistering. Its heartbeats stop, so the
        # registry forgets its instances within EXAI_HEARTBEAT_TTL. (The next call comes after
        # that, as in test_supervised: a call racing the kill may be written into a dying
        # connection, which no proxy can tell from one the instance was running.)
        await asyncio.to_thread(host_a.kill)

        async def host_a_gone() -> bool:
            _, body = await fleet.admin("GET", "/admin/instances")
            return not any(i["host"] == HOST_A for i in body["instances"])

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not await host_a_gone():
            assert loop.time() < deadline, "host A's instances are still registered"
            await asyncio.sleep(0.1)
        moved = await status_of(two)
        assert moved["session"] == st["two"]["session"]  # same session, another host
        assert moved["instance_id"] == host_b.instance_id(2)
        result = await two.call_tool("chat", {"prompt": "still here?"})
        assert not result.is_error, result
        assert (await status_of(three))["instance_id"] == host_b.instance_id(1)  # untouched
        assert (await status_of(one))["instance_id"] == "instance_01"
    await fleet.end_all_sessions()
