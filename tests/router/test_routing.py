"""End to end through the router's port: isolation, failover, restart, backpressure, DELETE.

One fleet under real supervisord (tests/fleet.py: five `exai-instance` processes with the fake
LLM provider, and `exai-router`) serves the whole module; every test leaves it with five free
instances.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from instance.timing import CHAT_STAGES
from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, instance_num, mcp_client, status_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=5,
        max_instances=5,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        default_model="glm-4.6",
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet) -> AsyncIterator[None]:
    yield
    await fleet.end_all_sessions()


async def _sessions(fleet: Fleet) -> list[dict[str, Any]]:
    status, body = await fleet.admin("GET", "/admin/sessions")
    assert status == 200
    return list(body["sessions"])


async def test_five_clients_of_both_eras_each_get_their_own_instance(fleet: Fleet) -> None:
    modes = ["legacy", "2026-07-28", "legacy", "2026-07-28", "legacy"]
    seen: list[dict[str, Any]] = []
    gate = asyncio.Event()
    ready = asyncio.Semaphore(0)
    moved: list[bool] = []

    async def one(i: int, mode: str) -> None:
        async with mcp_client(fleet.mcp_url, mode, name=f"client-{i}") as client:
            mine = {"mode": mode, **await status_of(client)}
            seen.append(mine)
            ready.release()
            await gate.wait()  # stay open until all five are counted
            again = await status_of(client)
            assert again["session"] == mine["session"] and again["bound_session"] == mine["session"]
            moved.append(again["instance_id"] != mine["instance_id"])

    tasks = [asyncio.create_task(one(i, m)) for i, m in enumerate(modes)]
    for _ in modes:
        await asyncio.wait_for(ready.acquire(), 60)
    try:
        instances = {s["instance_id"] for s in seen}
        assert len(instances) == 5, seen
        sessions = await _sessions(fleet)
        assert len(sessions) == 5
        by_id = {s["id"]: s for s in sessions}
        for st in seen:
            # The status tool reports the router's session id; the admin API agrees on the instance.
            assert by_id[st["session"]]["instance"] == st["instance_id"]
            assert by_id[st["session"]]["era"] == ("handshake" if st["mode"] == "legacy" else "stateless")
        assert {s["era"] for s in sessions} == {"handshake", "stateless"}

        # A sixth session while the five are idle (open, nothing in flight): served at once,
        # because the longest-idle session is parked to make room (503 is only for sessions
        # that work at the same moment: tests/router/test_capacity.py).
        async with mcp_client(fleet.mcp_url, "legacy", name="6th") as sixth:
            s6 = await status_of(sixth)
        assert s6["instance_id"] in instances
        states = {s["id"]: s["state"] for s in await _sessions(fleet)}
        assert sum(1 for st in seen if states.get(st["session"]) == "parked") == 1
    finally:
        gate.set()
        await asyncio.gather(*tasks)
    assert sum(moved) <= 1  # only the parked session may resume on another instance
    # Handshake clients sent DELETE on close: their sessions are gone; stateless ones remain.
    remaining = await _sessions(fleet)
    assert {s["era"] for s in remaining} <= {"stateless"}


async def test_kill_9_moves_a_handshake_session_and_its_thread_continues(fleet: Fleet) -> None:
    sent_ids: list[str] = []
    async with mcp_client(fleet.mcp_url, "legacy", name="failover", session_ids=sent_ids) as client:
        before = await status_of(client)
        first = await client.call_tool("chat", {"prompt": "remember the word walnut"})
        assert not first.is_error, first
        cid = (first.structured_content or {})["continuation_id"]

        # kill -9, and supervisord does not bring it back (like an instance it gave up on).
        await asyncio.to_thread(fleet.kill_instance, instance_num(before["instance_id"]), restart=False)

        after = await status_of(client)
        assert after["session"] == before["session"]
        assert after["instance_id"] != before["instance_id"]
        second = await client.call_tool("chat", {"prompt": "what was the word?", "continuation_id": cid})
        assert not second.is_error, second
        assert (second.structured_content or {})["continuation_id"] == cid
        # The client never saw another session id.
        assert set(sent_ids) == {before["session"]}

    await asyncio.to_thread(fleet.start_instance, instance_num(before["instance_id"]))
    await fleet.wait_instances(5)
    _, body = await fleet.admin("GET", "/metrics")
    assert "exai_router_failovers_total" in body


async def test_router_restart_keeps_sessions(fleet: Fleet) -> None:
    sent_ids: list[str] = []
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="restart-a", session_ids=sent_ids) as a,
        mcp_client(fleet.mcp_url, "2026-07-28", name="restart-b") as b,
    ):
        sa, sb = await status_of(a), await status_of(b)
        await asyncio.to_thread(fleet.restart_router)
        sa2, sb2 = await status_of(a), await status_of(b)
        assert (sa2["session"], sa2["instance_id"]) == (sa["session"], sa["instance_id"])
        assert (sb2["session"], sb2["instance_id"]) == (sb["session"], sb["instance_id"])
        assert set(sent_ids) == {sa["session"]}


async def test_delete_ends_the_session_and_resets_the_instance(fleet: Fleet) -> None:
    async with mcp_client(fleet.mcp_url, "legacy", name="deleter") as client:
        st = await status_of(client)
        assert st["bound_session"] == st["session"]
    assert st["session"] not in {s["id"] for s in await _sessions(fleet)}
    _, body = await fleet.admin("GET", "/admin/instances")
    inst = next(i for i in body["instances"] if i["id"] == st["instance_id"])
    assert inst["session"] is None  # lease released
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{inst['port']}/internal/health",
            headers={"X-Exai-Internal-Token": fleet.internal_token},
        ) as r,
    ):
        assert (await r.json())["session"] == ""  # reset before anyone else gets it


async def test_unknown_or_foreign_session_id_is_404(fleet: Fleet) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            fleet.mcp_url,
            data=json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}),
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json, text/event-stream",
                "Mcp-Session-Id": "not-a-session",
                "MCP-Protocol-Version": "2025-11-25",
            },
        ) as r,
    ):
        assert r.status == 404
        body = await r.json()
        assert body["id"] == 7 and body["error"]["data"]["error"] == "session_not_found"


async def test_stateless_sessions_key_on_name_and_client(fleet: Fleet) -> None:
    async with mcp_client(fleet.mcp_url + "/s/alpha", "2026-07-28", name="x") as a1:
        s1 = await status_of(a1)
    async with mcp_client(fleet.mcp_url + "/s/alpha", "2026-07-28", name="y") as a2:
        s2 = await status_of(a2)
    assert s1["session"] == s2["session"]  # the explicit name wins over clientInfo
    async with mcp_client(fleet.mcp_url, "2026-07-28", name="y") as b:
        s3 = await status_of(b)
    assert s3["session"] != s1["session"] and s3["instance_id"] != s1["instance_id"]
    sessions = {s["id"]: s for s in await _sessions(fleet)}
    assert sessions[s1["session"]]["key"].endswith("/name/alpha")
    assert sessions[s3["session"]]["client"] == "y"


async def test_json_answers_carry_content_length_and_sse_answers_stream(fleet: Fleet) -> None:
    """A 2026-07-28 JSON answer leaves the router in one piece with Content-Length (no chunked
    framing); a handshake-era SSE answer is still streamed, and both carry the whole answer."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "lengthy", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    call = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": "version", "arguments": {}, "_meta": meta},
    }
    headers = {
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": "version",
    }
    async with aiohttp.ClientSession() as http:
        for _ in range(2):  # the first call opens the session, the second finds it bound
            async with http.post(fleet.mcp_url, json=call, headers=headers) as r:
                raw = await r.read()
                assert r.status == 200, raw
                assert r.headers["Content-Type"].startswith("application/json")
                assert int(r.headers["Content-Length"]) == len(raw)
                assert "Transfer-Encoding" not in r.headers
                answer = json.loads(raw)
                assert answer["id"] == 7 and not answer["result"].get("isError"), answer

        init = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "streamy", "version": "1"},
            },
        }
        hs = {"Accept": "application/json, text/event-stream"}
        async with http.post(fleet.mcp_url, json=init, headers=hs) as r:
            assert r.status == 200, await r.text()
            sid = r.headers["Mcp-Session-Id"]
            await r.read()
        hs = {**hs, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-06-18"}
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        async with http.post(fleet.mcp_url, json=note, headers=hs) as r:
            assert r.status == 202
        call = {
            "jsonrpc": "2.0",
            "id": 8,
            "method": "tools/call",
            "params": {"name": "version", "arguments": {}},
        }
        async with http.post(fleet.mcp_url, json=call, headers=hs) as r:
            text = await r.text()
            assert r.status == 200, text
            if r.headers["Content-Type"].startswith("text/event-stream"):
                assert "Content-Length" not in r.headers
                data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
                answer = json.loads(data[-1])
            else:
                assert int(r.headers["Content-Length"]) == len(text.encode())
                answer = json.loads(text)
            assert answer["id"] == 8 and not answer["result"].get("isError"), answer


async def test_chat_stage_timings_are_exposed(fleet: Fleet) -> None:
    """After a chat call, its stages show in the `status` tool and the instance's
    /internal/metrics; the router's /metrics splits proxied calls into router and instance time."""
    async with mcp_client(fleet.mcp_url, "2026-07-28", name="stages") as client:
        first = await client.call_tool("chat", {"prompt": "time me"})
        assert not first.is_error, first
        assert first.structured_content is not None
        cid = first.structured_content["continuation_id"]
        second = await client.call_tool("chat", {"prompt": "and again", "continuation_id": cid})
        assert not second.is_error, second
        st = await status_of(client)
    stages = st["chat_stages"]
    for name in CHAT_STAGES:
        assert stages[name]["count"] >= 2, (name, stages)
    assert stages["total"]["p50_ms"] >= stages["provider"]["p50_ms"] > 0, stages

    port = fleet.instance_port(instance_num(st["instance_id"]))
    for _ in range(100):  # the flusher writes the turns in the background, after the answers
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{port}/internal/metrics",
                headers={"X-Exai-Internal-Token": fleet.internal_token},
            ) as r,
        ):
            assert r.status == 200
            text = await r.text()
        counters = dict(
            line.split(" ", 1)
            for line in text.splitlines()
            if line.startswith("exai_instance_") and "{" not in line
        )
        if int(counters["exai_instance_spool_flushed_total"]) >= 4:
            break
        await asyncio.sleep(0.1)
    assert 'exai_instance_chat_stage_seconds_count{stage="storage_append"}' in text
    assert 'exai_instance_chat_stage_seconds_count{stage="fleet"}' in text
    assert int(counters["exai_instance_spool_flushed_total"]) >= 4, text  # two chats: 4 turns at least
    assert {
        "exai_instance_thread_cache_checks_total",
        "exai_instance_thread_cache_marks_applied_total",
        "exai_instance_link_events_spooled_total",
        "exai_instance_redis_batched_total",
        "exai_instance_redis_line_total",
    } <= set(counters), text
    # The continued chat read its thread and its notes without a round trip, from the copies
    # the tracking connection keeps trusted (instance/storage/tracking.py), or else from Redis
    # at once: on the storage's direct line (once it is up), or in one pipelined round trip.
    together = int(counters["exai_instance_redis_batched_total"]) + int(
        counters["exai_instance_redis_line_total"]
    )
    # With tracking up, the chats' thread commands went on the tracking connection instead
    # (its appends are counted; the continued chat's first read of a thread it started is a
    # read there, not yet a hit from memory).
    tracked = int(counters["exai_instance_thread_tracked_appends_total"])
    assert tracked >= 2 or together >= 2, text

    status, metrics = await fleet.admin("GET", "/metrics", token=None)  # no token needed
    assert status == 200
    assert 'exai_router_call_stage_seconds_count{stage="router"}' in metrics
    assert 'exai_router_call_stage_seconds_count{stage="instance"}' in metrics
    # ... and each instance's chat stages, labelled with the instance, on the same page
    assert metrics.count("# TYPE exai_instance_chat_stage_seconds summary") == 1, metrics
    iid = st["instance_id"]
    for name in CHAT_STAGES:
        line = f'exai_instance_chat_stage_seconds_count{{instance="{iid}",stage="{name}"}} '
        found = [ln for ln in metrics.splitlines() if ln.startswith(line)]
        assert found and int(found[0].split()[-1]) >= 2, (name, found)
    assert f'exai_instance_chat_stage_seconds{{instance="{iid}",stage="provider",quantile="0.5"}}' in metrics
