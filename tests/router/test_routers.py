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
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx2
import mcp_types
import pytest
import redis.asyncio as aioredis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.fleet import ExtraRouter, Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, status_of
from tests.test_cli import exai

pytestmark = pytest.mark.usefixtures("provider")

MODES = ("legacy", "2026-07-28")
VERSION = "2026-07-28"
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


class Alternate(Switch):
    """Each request to the next of `ports` in turn: one client's concurrent calls reach
    several routers at the same moment, with the same session."""

    def __init__(self, *ports: int) -> None:
        super().__init__(ports[0])
        self.ports = ports
        self.sent = 0

    async def hook(self, request: httpx2.Request) -> None:
        self.port = self.ports[self.sent % len(self.ports)]
        self.sent += 1
        await super().hook(request)


@contextlib.asynccontextmanager
async def switched_client(
    fleet: Fleet, switch: Switch, mode: str, *, name: str = ""
) -> AsyncIterator[Client]:
    async with (
        httpx2.AsyncClient(
            timeout=httpx2.Timeout(30.0, read=60.0),
            event_hooks={"request": [switch.hook]},
            limits=httpx2.Limits(max_keepalive_connections=0),  # a new connection per request
        ) as http,
        Client(
            streamable_http_client(fleet.mcp_url, http_client=http),
            mode=mode,  # type: ignore[arg-type]
            client_info=mcp_types.Implementation(name=name or f"multi-{mode}", version="1"),
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
    # `exai status`, as an operator runs it with the fleet's settings, lists both on the port.
    shown = await asyncio.to_thread(exai, "status", env=fleet.environment())
    assert shown.returncode == 0, shown
    for p in routers:
        row = next((ln.split() for ln in shown.stdout.splitlines() if ln.startswith(f"{p.name} ")), None)
        assert row is not None, shown.stdout
        assert row[1:4] == ["RUNNING", str(p.pid), str(fleet.settings.router_port)], shown.stdout
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


# --- a router process killed for good ------------------------------------------------------

HANDSHAKE = "2025-11-25"


def _rpc_answer(ctype: str, text: str) -> dict[str, Any]:
    """The JSON-RPC answer of a POST /mcp: the JSON body, or an SSE body's last data event."""
    if ctype.startswith("text/event-stream"):
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        assert data, text
        text = data[-1]
    answer: dict[str, Any] = json.loads(text)
    return answer


class RawSession:
    """One session over plain HTTP on a client of its own (aiohttp, one keep-alive connection
    at most): it can be pinned to the router process that accepted that connection."""

    def __init__(self, fleet: Fleet, era: str, name: str) -> None:
        self.fleet, self.era, self.name = fleet, era, name
        self.sid = ""  # the handshake era's Mcp-Session-Id
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))

    async def metrics(self) -> str:
        """/metrics of the router process serving this client's connection."""
        headers = {"Authorization": f"Bearer {self.fleet.admin_token}"}
        async with self.http.get(self.fleet.router_url + "/metrics", headers=headers) as r:
            return await r.text()

    async def pid(self) -> str:
        """The pid of the router process serving this client's connection."""
        text = await self.metrics()
        return next(_pid(line) for line in text.splitlines() if line.startswith("exai_router_process{"))

    async def post(self, body: dict[str, Any], extra: dict[str, str]) -> tuple[int, dict[str, str], str]:
        url = self.fleet.mcp_url + (f"/s/{self.name}" if self.era == VERSION else "")
        headers = {"Accept": "application/json, text/event-stream", **extra}
        if self.sid:
            headers["Mcp-Session-Id"] = self.sid
        async with self.http.post(url, json=body, headers=headers) as r:
            return r.status, dict(r.headers), await r.text()

    async def open(self) -> None:
        if self.era == VERSION:
            return  # a 2026-07-28 session opens with its first call
        client = {"name": self.name, "version": "1"}
        params = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": client}
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
        status, headers, text = await self.post(init, {"MCP-Protocol-Version": HANDSHAKE})
        assert status == 200, text
        assert "result" in _rpc_answer(headers.get("Content-Type", ""), text), text
        self.sid = headers["Mcp-Session-Id"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        status, _, text = await self.post(note, {"MCP-Protocol-Version": HANDSHAKE})
        assert status == 202, text

    async def status(self, rid: int) -> dict[str, Any]:
        """The `status` tool's answer (which session and instance served the call)."""
        params: dict[str, Any] = {"name": "status", "arguments": {}}
        extra = {"MCP-Protocol-Version": HANDSHAKE}
        if self.era == VERSION:
            params["_meta"] = {
                "io.modelcontextprotocol/protocolVersion": VERSION,
                "io.modelcontextprotocol/clientInfo": {"name": self.name, "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            }
            extra = {"MCP-Protocol-Version": VERSION, "Mcp-Method": "tools/call", "Mcp-Name": "status"}
        call = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}
        status, headers, text = await self.post(call, extra)
        assert status == 200, text
        answer = _rpc_answer(headers.get("Content-Type", ""), text)
        assert answer.get("id") == rid and not answer["result"].get("isError"), answer
        return dict(answer["result"]["structuredContent"])

    async def close(self) -> None:
        await self.http.close()


async def _pinned(fleet: Fleet, era: str, name: str, pid: str) -> RawSession:
    """A RawSession whose connection the router process `pid` accepted (the kernel spreads new
    connections over the processes on the port: try new ones until one lands there)."""
    for _ in range(200):
        raw = RawSession(fleet, era, name)
        if await raw.pid() == pid:
            return raw
        await raw.close()
    raise AssertionError(f"no connection landed on router process {pid}")


async def test_a_router_process_killed_for_good_leaves_no_lease_held(fleet_factory: Any) -> None:
    """EXAI_ROUTER_PROCESSES=2 under supervisord: sessions of both eras made through router_1
    (and only known there) hold both instances when router_1 is SIGKILLed, and the process
    supervisord starts in its place is stopped again for good (once it runs: a stop that
    lands while supervisord is still starting a process can lose its signal). Nothing renews
    the sessions' leases any more; router_2 adopts them once router_1's heartbeat expires
    (router/routers.py) instead of treating the instances as lost or leaving them held for the
    dead router: new sessions through the port
    are served (the orphans are parked for them), the orphans themselves continue through
    router_2 under their own ids, and once every session has ended no lease is left in Redis."""
    fleet: Fleet = await asyncio.to_thread(
        fleet_factory, instances=2, max_instances=2, router_processes=2,
        # parking after more than router_1's restart and stop take, so that its replacement
        # (which loads every session as it starts) leaves the orphans bound when it stops
        **{**SETTINGS, "session_park_after": 8.0, "allocation_deadline": 20.0},
    )  # fmt: skip
    procs = {p.full_name: p for p in await asyncio.to_thread(fleet.processes)}
    doomed, survivor = (str(procs[f"router:router_{n}"].pid) for n in (1, 2))
    orphans = [await _pinned(fleet, era, f"orphan-{n}", doomed) for n, era in enumerate((HANDSHAKE, VERSION))]
    redis = aioredis.from_url(str(fleet.settings.redis_url), decode_responses=True)
    try:
        before = []
        for raw in orphans:
            await raw.open()
            before.append(await raw.status(1))
            assert await raw.pid() == doomed  # made and served by router_1 alone
        held = {st["instance_id"]: st["session"] for st in before}
        assert set(held) == {fleet.instance_id(1), fleet.instance_id(2)}
        for iid, sid in held.items():
            assert await redis.get(fleet.keys.lease(iid)) == sid
        for raw in orphans:
            await raw.close()  # its connection went to the dead router anyway

        pid = await asyncio.to_thread(fleet._kill, "router:router_1", signal.SIGKILL)
        assert str(pid) == doomed
        await asyncio.to_thread(fleet._wait_dead, pid)
        await asyncio.to_thread(fleet.wait_restarted, "router:router_1", pid)
        await asyncio.to_thread(fleet.supervisor.stop, "router:router_1")
        assert (await asyncio.to_thread(fleet.process, "router:router_1")).state == "STOPPED"

        # New sessions through the port (router_2 only now): both instances come free for them.
        async with contextlib.AsyncExitStack() as stack:
            fresh = await _open(stack, fleet, {m: Switch(fleet.settings.router_port) for m in MODES})
            got = {(await status_of(c))["instance_id"] for c in fresh.values()}
            assert got == {fleet.instance_id(1), fleet.instance_id(2)}

        # router_2 did it: it adopted the sessions router_1 left bound once router_1's heartbeat
        # expired (router/routers.py) and parked them for the new ones (not the replacement of
        # router_1, which stopped before)
        probe = await _pinned(fleet, VERSION, "probe", survivor)
        try:
            text = await probe.metrics()
        finally:
            await probe.close()
        counts = {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line.startswith(("exai_router_sessions_adopted_total", "exai_router_sessions_parked_total"))
        }
        assert counts.get("exai_router_sessions_adopted_total", 0) >= 2, counts
        parked = sum(v for k, v in counts.items() if k.startswith("exai_router_sessions_parked_total"))
        assert parked >= 2, counts

        # The orphans go on through router_2, each under its own id (the handshake era's
        # Mcp-Session-Id kept, its initialize replayed on the instance it lands on).
        for n, (raw, first) in enumerate(zip(orphans, before, strict=True)):
            again = RawSession(fleet, raw.era, raw.name)
            again.sid = raw.sid
            try:
                assert await again.pid() == survivor
                st = await again.status(2 + n)
                assert st["session"] == first["session"], (st, first)
            finally:
                await again.close()

        await fleet.end_all_sessions()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20.0
        while True:  # the survivor's lease rounds: nothing left held for anyone
            leases = {num: await redis.get(fleet.keys.lease(fleet.instance_id(num))) for num in (1, 2)}
            if all(v is None for v in leases.values()):
                break
            assert loop.time() < deadline, leases
            await asyncio.sleep(0.2)
        assert await _sessions(fleet, fleet.router_url) == {}
    finally:
        for raw in orphans:
            await raw.close()
        await redis.aclose()


async def test_a_session_served_through_another_router_is_not_parked_as_idle(fleet_factory: Any) -> None:
    """A session opened through one router and then used only through another: the first sees
    its calls only in the record, a flush later, and must not take that for idleness. With a
    park time near the flush interval it parked the session between calls, and the routers
    then took its instance from each other (tests/bench/bench_router.py with two processes)."""
    fleet: Fleet = await asyncio.to_thread(
        fleet_factory, instances=2, max_instances=2, **{**SETTINGS, "session_park_after": 1.0}
    )
    with ExtraRouter(fleet) as other:
        await asyncio.to_thread(fleet.wait_registered, 2)
        await asyncio.sleep(2 * SETTINGS["heartbeat_interval"])  # each router has seen the other's heartbeat
        switch = Switch(fleet.settings.router_port)
        async with switched_client(fleet, switch, VERSION) as client:
            first = await status_of(client)  # opened through the fleet's router
            switch.port = other.port
            loop = asyncio.get_running_loop()
            until = loop.time() + 6.0
            while loop.time() < until:  # a call every 0.4 s, through the other router only
                st = await status_of(client)
                assert (st["session"], st["instance_id"]) == (first["session"], first["instance_id"])
                await asyncio.sleep(0.4)
            listed = await _sessions(fleet, fleet.router_url)
            assert listed[first["session"]]["parks"] == 0, listed
    await fleet.end_all_sessions()


async def _park_and_call_twice(
    fleet: Fleet, redis: aioredis.Redis, sid: str, a: Client, b: Client, other: ExtraRouter
) -> None:
    """Six times: park the session, then two calls at once (through both routers): both on one
    instance, the only lease held, and the other router's view the same."""
    for attempt in range(6):
        status, body = await fleet.admin("POST", f"/admin/sessions/{sid}/park")
        assert status == 200, body
        await asyncio.sleep(0.3)  # the other router hears of it on the sessions channel
        sa, sb = await asyncio.gather(status_of(a), status_of(b))
        assert sa["session"] == sb["session"] == sid
        assert sa["instance_id"] == sb["instance_id"], (attempt, sa, sb)
        held = [await redis.get(fleet.keys.lease(fleet.instance_id(n))) for n in (1, 2)]
        assert sorted(h for h in held if h) == [sid], (attempt, held)
        listed = await _sessions(fleet, other.router_url)
        assert listed[sid]["instance"] == sa["instance_id"], (attempt, listed[sid])


async def test_two_routers_resuming_one_session_at_once_bind_it_once(fleet_factory: Any) -> None:
    """A parked 2026-07-28 session whose next calls reach two routers at the same moment (one
    client's requests spread over them): one binding, both calls on its instance, one lease.
    Before, each router leased an instance of its own and the later record won, so the two
    calls ran on two instances and the loser's lease was held for nothing."""
    fleet: Fleet = await asyncio.to_thread(fleet_factory, instances=2, max_instances=2, **SETTINGS)
    redis = aioredis.from_url(str(fleet.settings.redis_url), decode_responses=True)
    try:
        with ExtraRouter(fleet) as other:
            await asyncio.to_thread(fleet.wait_registered, 2)
            async with (
                switched_client(fleet, Switch(fleet.settings.router_port), VERSION) as a,
                switched_client(fleet, Switch(other.port), VERSION) as b,  # the same client name: one session
            ):
                sid = (await status_of(a))["session"]
                assert (await status_of(b))["session"] == sid
                await _park_and_call_twice(fleet, redis, sid, a, b, other)
    finally:
        await redis.aclose()
    await fleet.end_all_sessions()


async def test_two_routers_resuming_one_handshake_session_at_once_bind_it_once(fleet_factory: Any) -> None:
    """The handshake era's resume replays the client's `initialize` on the new instance before
    the record is written (the allocator's path, not the one-round-trip script). A parked
    session's two concurrent calls reaching two routers: one binding, both calls on its
    instance, one lease held. Before, each router replayed on an instance of its own and the
    later record won, so the calls ran on two instances and the loser's lease was held."""
    fleet: Fleet = await asyncio.to_thread(fleet_factory, instances=2, max_instances=2, **SETTINGS)
    redis = aioredis.from_url(str(fleet.settings.redis_url), decode_responses=True)
    try:
        with ExtraRouter(fleet) as other:
            await asyncio.to_thread(fleet.wait_registered, 2)
            switch = Alternate(fleet.settings.router_port, other.port)
            async with switched_client(fleet, switch, "legacy") as client:
                sid = (await status_of(client))["session"]
                await _park_and_call_twice(fleet, redis, sid, client, client, other)
    finally:
        await redis.aclose()
    await fleet.end_all_sessions()


async def test_a_waiter_gets_the_instance_of_a_session_idle_behind_another_router(fleet_factory: Any) -> None:
    """A full fleet, both instances bound to sessions that only the other router serves, idle
    for less than EXAI_SESSION_PARK_AFTER. A new session through this router must not wait out
    the allocation deadline and get a 503: only the serving router parks a session this soon,
    so the waiting router asks it to (the pressure channel), and it parks its longest-idle one."""
    fleet: Fleet = await asyncio.to_thread(
        fleet_factory,
        instances=2,
        max_instances=2,
        **{**SETTINGS, "session_park_after": 120.0, "allocation_deadline": 8.0},
    )
    with ExtraRouter(fleet) as other:
        await asyncio.to_thread(fleet.wait_registered, 2)
        await asyncio.sleep(2 * SETTINGS["heartbeat_interval"])  # each router has seen the other's heartbeat
        async with contextlib.AsyncExitStack() as stack:
            held = []
            for name in ("idle-1", "idle-2"):
                switch = Switch(other.port)
                client = await stack.enter_async_context(switched_client(fleet, switch, VERSION, name=name))
                held.append(await status_of(client))
            assert {h["instance_id"] for h in held} == {fleet.instance_id(1), fleet.instance_id(2)}
            await asyncio.sleep(0.5)  # idle for longer than a waiter's grace
            waiter = await stack.enter_async_context(
                switched_client(fleet, Switch(fleet.settings.router_port), VERSION, name="waiter")
            )
            got = await status_of(waiter)
            assert got["instance_id"] in {h["instance_id"] for h in held}
            listed = await _sessions(fleet, other.router_url)
            parked = [listed[h["session"]] for h in held if listed[h["session"]]["state"] == "parked"]
            assert len(parked) == 1, listed
    await fleet.end_all_sessions()
