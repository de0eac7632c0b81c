"""Sessions outlive their instances: parking, resuming, fencing, bad protocol input.

One fleet under real supervisord (tests/fleet.py) with four instances and a park time of one
second serves the module; clients are the SDK's own `Client`, both eras, through the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import httpx2
import mcp_types
import pytest
import redis.asyncio as aioredis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, glm_on, mcp_client, status_of

pytestmark = pytest.mark.timeout(240)

PARK_AFTER = 1.0
SESSIONS = 200
_V = "io.modelcontextprotocol/protocolVersion"


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    settings = {
        **ROUTER_TEST_SETTINGS,
        "allocation_deadline": 60.0,  # the many-sessions test queues ~200 resumes on 4 instances
        "session_park_after": PARK_AFTER,
        "log_level": "WARNING",
    }
    return module_fleet_factory(
        instances=4,
        max_instances=4,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        default_model="glm-4.6",
        **settings,
    )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet, provider: FakeProvider) -> AsyncIterator[None]:
    provider.reset()
    yield
    provider.reset()
    await fleet.end_all_sessions()


async def _sessions(fleet: Fleet) -> dict[str, Any]:
    status, body = await fleet.admin("GET", "/admin/sessions")
    assert status == 200
    return dict(body)


async def _until(pred: Callable[[], Any], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.1)


class _NoDelete(Exception):
    pass


@contextlib.asynccontextmanager
async def _client(url: str, mode: str, name: str, *, send_delete: bool) -> AsyncIterator[Client]:
    """An SDK client; with send_delete=False its goodbye never leaves (a client that crashed,
    or one that, like many, never sends DELETE)."""

    async def drop_delete(request: httpx2.Request) -> None:
        if request.method == "DELETE" and not send_delete:
            raise _NoDelete

    async with (
        httpx2.AsyncClient(
            timeout=httpx2.Timeout(30.0, read=90.0), event_hooks={"request": [drop_delete]}
        ) as http,
        Client(
            streamable_http_client(url, http_client=http),
            mode=mode,  # type: ignore[arg-type]
            client_info=mcp_types.Implementation(name=name, version="1"),
        ) as client,
    ):
        yield client


async def test_200_sessions_park_between_calls_and_resume_on_4_instances(fleet: Fleet) -> None:
    """Both eras, a quarter of the clients (half of the handshake ones) never send DELETE;
    every call succeeds, each session's two calls see the same session, and between them
    every session is parked. At most four sessions work at any moment (one per instance):
    more would be waiting for an instance, which is the capacity test's subject."""
    working = asyncio.Semaphore(4)
    first_done = 0
    second_go = asyncio.Event()
    results: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    modes = ["legacy" if i % 2 == 0 else "2026-07-28" for i in range(SESSIONS)]

    async def one(i: int) -> None:
        nonlocal first_done
        async with contextlib.AsyncExitStack() as stack:
            async with working:
                client = await stack.enter_async_context(
                    _client(fleet.mcp_url, modes[i], f"many-{i}", send_delete=i % 4 != 0)
                )
                a = await status_of(client)
            first_done += 1
            await second_go.wait()
            async with working:
                b = await status_of(client)
            results[i] = (a, b)

    tasks = [asyncio.create_task(one(i)) for i in range(SESSIONS)]
    try:

        async def first_round() -> bool:
            failed = [t for t in tasks if t.done() and t.exception()]
            if failed:
                raise AssertionError(f"{len(failed)} sessions failed") from failed[0].exception()
            return first_done == SESSIONS

        await _until(first_round, timeout=150)

        async def all_parked() -> bool:
            body = await _sessions(fleet)
            return bool(body["counts"]["parked"] == SESSIONS)

        await _until(all_parked, timeout=30)  # the pause: past the park time, nothing bound
        listed = (await _sessions(fleet))["sessions"]
        assert all(s["state"] == "parked" and s["instance"] is None for s in listed)
        _, instances = await fleet.admin("GET", "/admin/instances")
        assert [i["session"] for i in instances["instances"]] == [None] * 4
        second_go.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 150)
    finally:
        second_go.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    assert len(results) == SESSIONS
    for a, b in results.values():
        assert a["session"] == b["session"]
        assert a["bound_session"] == a["session"] and b["bound_session"] == b["session"]
    assert len({a["session"] for a, _ in results.values()}) == SESSIONS
    assert {a["instance_id"] for a, _ in results.values()} <= {fleet.instance_id(n) for n in range(1, 5)}

    # Handshake clients that sent DELETE are gone; the others (and every stateless one) stay,
    # parked, until they expire.
    left = {s["id"]: s for s in (await _sessions(fleet))["sessions"]}
    for i, (a, _) in results.items():
        deleted = modes[i] == "legacy" and i % 4 != 0
        assert (a["session"] in left) != deleted, (i, modes[i])
    kept = [s for s in left.values() if s["id"] in {a["session"] for a, _ in results.values()}]
    assert all(s["parks"] >= 1 and s["resumes"] >= 1 for s in kept)
    _, metrics = await fleet.admin("GET", "/metrics")
    assert "exai_router_sessions_resumed_total" in metrics
    assert 'exai_router_sessions_by_state{state="parked"}' in metrics


async def test_a_parked_handshake_session_keeps_its_thread(fleet: Fleet, provider: FakeProvider) -> None:
    async with mcp_client(fleet.mcp_url, "legacy", name="thread-keeper") as client:
        first = await client.call_tool("chat", {"prompt": "remember the word walnut"})
        assert not first.is_error, first
        cid = (first.structured_content or {})["continuation_id"]
        before = await status_of(client)

        async def parked() -> bool:
            _, body = await fleet.admin("GET", f"/admin/sessions/{before['session']}")
            return bool(body["state"] == "parked")

        await _until(parked)
        second = await client.call_tool("chat", {"prompt": "what was the word?", "continuation_id": cid})
        assert not second.is_error, second
        assert any("walnut" in str(m.get("content")) for m in provider.snapshot()[-1].messages)
        after = await status_of(client)
        assert after["session"] == before["session"] and after["bound_session"] == before["session"]


_BAD_INPUT = [
    # (headers, body, what)
    ({"MCP-Protocol-Version": "2099-01-01"}, {"method": "tools/list"}, "unknown version"),
    ({"MCP-Protocol-Version": "2026-07-28"}, {"method": "initialize"}, "initialize, stateless era"),
    (
        {"MCP-Protocol-Version": "2025-11-25"},
        {
            "method": "tools/list",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}},
        },
        "stateless request, handshake version",
    ),
    (
        {},
        {
            "method": "tools/list",
            "params": {"_meta": {"io.modelcontextprotocol/protocolVersion": "1999-12-31"}},
        },
        "unknown version in _meta",
    ),
]


@pytest.mark.parametrize(("headers", "body", "what"), _BAD_INPUT, ids=[b[2] for b in _BAD_INPUT])
async def test_bad_protocol_input_gets_400_and_binds_nothing(
    fleet: Fleet, headers: dict[str, str], body: dict[str, Any], what: str
) -> None:
    message = {"jsonrpc": "2.0", "id": 5, **body}
    if body["method"] == "initialize":
        message["params"] = {"protocolVersion": "2026-07-28", "capabilities": {}, "clientInfo": {"name": "x"}}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            fleet.mcp_url,
            data=json.dumps(message),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                **headers,
            },
        ) as r,
    ):
        assert r.status == 400, what
        answer = await r.json()
    assert answer["id"] == 5
    assert answer["error"]["data"]["error"] == "unsupported_protocol_version"
    assert "2025-11-25" in answer["error"]["message"] and "2026-07-28" in answer["error"]["message"]
    assert (await _sessions(fleet))["sessions"] == []
    _, instances = await fleet.admin("GET", "/admin/instances")
    assert all(i["session"] is None for i in instances["instances"])


async def test_a_lost_lease_never_hands_a_busy_instance_to_another_session(
    fleet: Fleet, provider: FakeProvider
) -> None:
    """Issue: Redis lost session A's lease while A's chat ran; session B must not get (and
    reset) A's instance, and A's call must complete."""
    provider.reset(Behaviour(delay=3.0))
    redis = aioredis.Redis.from_url(fleet.settings.redis_url or "", decode_responses=True)
    try:
        async with (
            mcp_client(fleet.mcp_url, "legacy", name="lease-a") as a,
            mcp_client(fleet.mcp_url, "2026-07-28", name="lease-b") as b,
        ):
            sa = await status_of(a)
            # A is on the first instance the allocator looks at, so B would be handed it.
            assert sa["instance_id"] == fleet.instance_id(1)
            call = asyncio.create_task(a.call_tool("chat", {"prompt": "slow one"}))
            await _until(lambda: asyncio.sleep(0, bool(provider.snapshot())))
            assert await redis.delete(fleet.keys.lease(sa["instance_id"])) == 1

            sb = await status_of(b)
            assert sb["instance_id"] != sa["instance_id"]
            result = await asyncio.wait_for(call, 30)
            assert not result.is_error, result
            again = await status_of(a)
            assert (again["session"], again["instance_id"]) == (sa["session"], sa["instance_id"])
        _, metrics = await fleet.admin("GET", "/metrics")
        line = next(
            ln for ln in metrics.splitlines() if ln.startswith("exai_router_leases_reconciled_total ")
        )
        assert float(line.split()[1]) >= 1
    finally:
        await redis.aclose()


def _counter(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name))


async def test_a_waiting_session_gets_an_idle_sessions_instance_handed_over(
    fleet_factory: Callable[..., Fleet], provider: FakeProvider
) -> None:
    """A full fleet: the waiting session is given the longest-idle session's instance straight
    away (the lease moved in Redis, no reset between); the instance changes sessions on the
    new one's first request, and the idle session, handshake era or not, resumes elsewhere
    by the same hand-over, its conversation intact."""
    fleet = await asyncio.to_thread(
        fleet_factory,
        instances=2,
        max_instances=2,
        **glm_on(provider),
        **{**ROUTER_TEST_SETTINGS, "session_park_after": 120.0},  # only pressure parks here
    )
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(mcp_client(fleet.mcp_url, "legacy", name="idle-a"))
        b = await stack.enter_async_context(mcp_client(fleet.mcp_url, "2026-07-28", name="idle-b"))
        first = await a.call_tool("chat", {"prompt": "remember the word walnut"})
        assert not first.is_error, first
        thread = (first.structured_content or {})["continuation_id"]
        a1 = await status_of(a)
        b1 = await status_of(b)
        assert a1["instance_id"] != b1["instance_id"]  # the fleet is full
        await asyncio.sleep(0.4)  # both idle past the router's grace: `a` the longest

        c = await stack.enter_async_context(mcp_client(fleet.mcp_url, "2026-07-28", name="waiting-c"))
        c1 = await status_of(c)
        assert c1["instance_id"] == a1["instance_id"] and c1["bound_session"] == c1["session"]
        _, metrics = await fleet.admin("GET", "/metrics")
        assert _counter(metrics, "exai_router_handovers_total") == 1
        assert _counter(metrics, 'exai_router_sessions_parked_total{reason="pressure"}') == 1
        _, listed = await fleet.admin("GET", "/admin/instances")
        by_id = {i["id"]: i for i in listed["instances"]}
        assert by_id[a1["instance_id"]]["session"] == c1["session"]  # registered after the answer

        await asyncio.sleep(0.4)  # now `b` is the longest idle: `a` comes back on its instance
        resumed = await a.call_tool(
            "chat", {"prompt": "which word did I ask you to remember?", "continuation_id": thread}
        )
        assert not resumed.is_error, resumed
        a2 = await status_of(a)
        assert a2["session"] == a1["session"] and a2["instance_id"] == b1["instance_id"]
        await asyncio.sleep(0.4)
        b2 = await status_of(b)  # and `b` on the one `c` left idle
        assert b2["session"] == b1["session"] and b2["instance_id"] == a1["instance_id"]
        _, metrics = await fleet.admin("GET", "/metrics")
        assert _counter(metrics, "exai_router_handovers_total") == 3
        assert _counter(metrics, 'exai_router_upstream_errors_total{kind="fenced"}') == 0
    # The resumed thread carried the first exchange: its prompt reached the provider again.
    second = [h for h in provider.snapshot() if "which word did I ask" in json.dumps(h.body)]
    assert second and "walnut" in json.dumps(second[-1].body)
