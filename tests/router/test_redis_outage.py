"""Redis faults under a real fleet (issue 14, point 3 and "a Redis restart under load").

The fleet runs on a Redis of this module's own (tests/redis_server.py, AOF on) so that the
tests can SIGKILL and restart it; the machine's shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as aioredis

from common.keys import Keys
from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet
from tests.redis_server import OwnRedis
from tests.router.conftest import ROUTER_TEST_SETTINGS, mcp_client, status_of

pytestmark = pytest.mark.timeout(180)

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw"}},
}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def fleet(own_redis: OwnRedis, module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=3,
        max_instances=3,
        redis_url=own_redis.url,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        **ROUTER_TEST_SETTINGS,
    )


async def _post(
    fleet: Fleet, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession() as http, http.post(fleet.mcp_url, json=body, headers=headers) as r:
        return r.status, dict(r.headers), json.loads(await r.text())


async def _until(check: Callable[[], Any], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.2)


async def test_redis_down_gives_503_with_retry_after_and_bound_sessions_keep_working(
    fleet: Fleet, own_redis: OwnRedis
) -> None:
    await fleet.wait_instances(3)
    async with mcp_client(fleet.mcp_url, "legacy") as client:
        st = await status_of(client)
        sid, iid = st["session"], st["instance_id"]
        own_redis.kill()
        try:
            for _ in range(3):  # the bound session never needs Redis on its request path
                assert (await status_of(client))["instance_id"] == iid
            chat = await client.call_tool("chat", {"prompt": "still there?"})
            assert not chat.is_error, chat.content

            status, headers, body = await _post(fleet, INIT, HEADERS)  # a new session needs the table
            assert status == 503 and int(headers["Retry-After"]) >= 1, body
            assert (
                body["error"]["data"]["error"] == "redis_unavailable" and "Redis" in body["error"]["message"]
            )
            stateless = {**HEADERS, "MCP-Protocol-Version": "2026-07-28"}
            status, headers, body = await _post(
                fleet, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, stateless
            )
            assert (
                status == 503
                and "Retry-After" in headers
                and body["error"]["data"]["error"] == "redis_unavailable"
            )
            status, admin = await fleet.admin("GET", "/admin/sessions")
            assert status == 503 and admin["error"] == "redis_unavailable"

            # DELETE is accepted now and finished when Redis returns.
            async with (
                aiohttp.ClientSession() as http,
                http.delete(fleet.mcp_url, headers={"Mcp-Session-Id": sid}) as r,
            ):
                assert r.status == 200
            status, _, body = await _post(
                fleet, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"},
                {**HEADERS, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"},
            )  # fmt: skip
            assert status in (404, 503), body  # ended: never served again
        finally:
            own_redis.start()
    keys = Keys(fleet.settings.redis_prefix)
    r = aioredis.Redis.from_url(own_redis.url, decode_responses=True)
    try:

        async def finished() -> bool:
            gone = not await r.exists(keys.session(sid))
            return gone and await r.get(keys.lease(iid)) != sid

        await _until(finished)
    finally:
        await r.aclose()
    status, body = await fleet.admin("GET", "/admin/sessions")
    assert status == 200 and sid not in {s["id"] for s in body["sessions"]}


async def test_a_redis_restart_under_load_moves_no_session_and_loses_no_turn(
    fleet: Fleet, own_redis: OwnRedis, provider: FakeProvider, pg_dsn: str
) -> None:
    await fleet.wait_instances(3)
    provider.reset(Behaviour(delay=0.2))
    calls: list[tuple[int, float, float, bool, str, str]] = []  # worker, start, end, ok, instance, text
    threads: dict[int, str] = {}  # worker -> its current thread
    answered: dict[str, int] = {}  # thread -> calls answered on it
    homes: dict[int, str] = {}
    stop = asyncio.Event()

    async def worker(n: int, mode: str) -> None:
        async with mcp_client(fleet.mcp_url, mode, name=f"load-{n}") as client:
            homes[n] = (await status_of(client))["instance_id"]
            while not stop.is_set():
                args: dict[str, Any] = {"prompt": f"turn from {n}"}
                if n in threads:
                    args["continuation_id"] = threads[n]
                started = time.monotonic()
                try:
                    result = await client.call_tool("chat", args)
                except Exception as exc:  # a transport failure counts as a failed call
                    calls.append((n, started, time.monotonic(), False, "", repr(exc)))
                    continue
                ended = time.monotonic()
                if result.is_error and "reached its limit" in str(result.content):
                    del threads[n]  # a full thread (10 calls): go on in a new one
                    continue
                if result.is_error or result.structured_content is None:
                    calls.append((n, started, ended, False, "", str(result.content)))
                    continue
                data = result.structured_content
                cid = threads.setdefault(n, data["continuation_id"])
                answered[cid] = answered.get(cid, 0) + 1
                calls.append((n, started, ended, True, data["metadata"]["instance_id"], ""))

    tasks = [
        asyncio.create_task(worker(n, mode)) for n, mode in enumerate(("legacy", "legacy", "2026-07-28"))
    ]
    try:
        await asyncio.sleep(3.0)
        killed = time.monotonic()
        own_redis.kill()
        await asyncio.sleep(3.0)
        await asyncio.to_thread(own_redis.start)
        await asyncio.sleep(4.0)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    assert len(homes) == 3 and len(set(homes.values())) == 3
    for n, started, ended, ok, inst, text in calls:
        if ok:
            assert inst == homes[n], f"worker {n}'s session moved from {homes[n]} to {inst}"
        else:
            assert started <= killed <= ended, f"a call that was not in flight at the kill failed: {text}"
    done = {n: sum(1 for c in calls if c[0] == n and c[3]) for n in homes}
    assert all(count >= 5 for count in done.values()), done
    # No thread lost a turn: Postgres ends up with two messages per answered call.
    conn = await asyncpg.connect(pg_dsn)
    try:
        loop = asyncio.get_running_loop()
        for cid, count in answered.items():
            deadline = loop.time() + 20
            while True:
                stored = await conn.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1", cid)
                if stored == 2 * count or loop.time() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert stored == 2 * count, (cid, stored, count)
    finally:
        await conn.close()
    # ... and a thread continued from a fresh session (another instance) sees every turn.
    async with mcp_client(fleet.mcp_url, "legacy", name="reader") as reader:
        for cid, count in answered.items():
            if count >= 10:
                continue  # full
            result = await reader.call_tool("chat", {"prompt": "how many?", "continuation_id": cid})
            assert not result.is_error, result.content
            assert result.structured_content is not None
            assert result.structured_content["metadata"]["thread_turns"] == 2 * count + 2


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_redis_dying_in_the_middle_of_a_chat_call(
    fleet: Fleet, own_redis: OwnRedis, provider: FakeProvider, pg_dsn: str, mode: str
) -> None:
    """Redis is SIGKILLed while a chat call waits on the provider: the call still answers (its
    turns go to the instance's spool and on to Postgres), and the thread continues after."""
    await fleet.wait_instances(3)
    gate = threading.Event()
    async with mcp_client(fleet.mcp_url, mode, name=f"midcall-{mode}") as client:
        first = await client.call_tool("chat", {"prompt": "before the outage"})
        assert not first.is_error, first.content
        assert first.structured_content is not None
        cid = first.structured_content["continuation_id"]
        provider.reset(Behaviour(gate=gate))
        try:
            call = asyncio.create_task(
                client.call_tool("chat", {"prompt": "during the outage", "continuation_id": cid})
            )
            await _until(lambda: asyncio.sleep(0, bool(provider.snapshot())))
            own_redis.kill()
            gate.set()
            result = await asyncio.wait_for(call, 60)
            assert not result.is_error, result.content
            assert result.structured_content is not None
            assert result.structured_content["continuation_id"] == cid
        finally:
            gate.set()
            provider.reset()
            await asyncio.to_thread(own_redis.start)
        again = await client.call_tool("chat", {"prompt": "after the outage", "continuation_id": cid})
        assert not again.is_error, again.content
        assert again.structured_content is not None
        assert again.structured_content["metadata"]["thread_turns"] == 6
    conn = await asyncpg.connect(pg_dsn)
    try:

        async def stored() -> bool:
            count = await conn.fetchval("SELECT count(*) FROM messages WHERE conversation_id = $1", cid)
            return bool(count == 6)

        await _until(stored)
    finally:
        await conn.close()
    await fleet.end_all_sessions()
