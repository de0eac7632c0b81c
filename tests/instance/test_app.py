"""The instance as the router sees it: internal token, /internal/*, registry, SIGTERM drain."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
import redis.asyncio as aioredis

from common.keys import Keys
from common.protocol import FENCED_HEADER, INTERNAL_TOKEN_HEADER, REGISTRY_FIELDS, SESSION_HEADER
from tests.fakes.provider import Behaviour, FakeProvider
from tests.instance.conftest import ERAS, INTERNAL_TOKEN, InstanceProc, SpawnInstance, connect, new_session


@pytest.mark.parametrize("token", [None, "wrong"])
def test_requests_without_the_internal_token_are_refused(instance_a: InstanceProc, token: str | None) -> None:
    headers = {INTERNAL_TOKEN_HEADER: token} if token else {}
    for method, path in (("POST", "/mcp"), ("GET", "/internal/health"), ("POST", "/internal/reset")):
        r = httpx.request(method, instance_a.url + path, headers=headers, json={}, timeout=5)
        assert r.status_code == 401
        body = r.json()
        assert body["jsonrpc"] == "2.0" and body["error"]["data"]["error"] == "unauthorized"


@pytest.mark.parametrize("mode", ERAS)
async def test_sdk_client_with_wrong_token_fails(instance_a: InstanceProc, mode: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 - the SDK surfaces the 401 as its own error type
        async with connect(instance_a, mode, token="wrong") as client:
            await client.call_tool("version", {})


@pytest.mark.parametrize("mode", ERAS)
async def test_version_and_status_report_the_bound_session(instance_a: InstanceProc, mode: str) -> None:
    session = new_session()
    async with connect(instance_a, mode, session=session) as client:
        version = (await client.call_tool("version", {})).structured_content
        status = (await client.call_tool("status", {})).structured_content
        health = (await asyncio.to_thread(instance_a.internal, "GET", "/internal/health")).json()
    assert version and version["instance_id"] == instance_a.id and version["version"]
    assert status and status["bound_session"] == session and status["session"] == session
    assert status["providers"]["glm"]["max_concurrency"] >= 1
    assert "backlog" in status["storage"] and status["storage"]["available"]
    assert health["session"] == session and health["id"] == instance_a.id


async def test_registry_heartbeat_reset_and_drain(
    spawn_instance: SpawnInstance, redis_client: aioredis.Redis, keys: Keys
) -> None:
    instance_a = spawn_instance()
    key = keys.instance(instance_a.id)
    entry = await redis_client.hgetall(key)
    assert set(entry) == set(REGISTRY_FIELDS)
    assert entry["port"] == str(instance_a.port) and entry["state"] == "ready"
    assert instance_a.id in await redis_client.smembers(keys.instances())
    assert 0 < await redis_client.pttl(key) <= 2000
    beat = float(entry["heartbeat"])
    await asyncio.sleep(1.2)
    assert float(await redis_client.hget(key, "heartbeat") or 0) > beat

    session = new_session()
    async with connect(instance_a, "legacy", session=session) as client:
        await client.call_tool("version", {})
        # The entry follows the answer (instance/after_answer.py): wait for it.
        for _ in range(100):
            if await redis_client.hget(key, "session") == session:
                break
            await asyncio.sleep(0.05)
        assert await redis_client.hget(key, "session") == session
        # Fencing: another session's request and a reset that does not name this session are
        # refused; the reset that names it is done.
        other = await asyncio.to_thread(
            instance_a.internal, "POST", "/mcp",
            headers={SESSION_HEADER: new_session(), "Content-Type": "application/json"},
            content=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
        )  # fmt: skip
        assert other.status_code == 409 and other.headers.get(FENCED_HEADER) == "1"
        assert other.json()["error"]["data"]["error"] == "instance_fenced"
        refused = await asyncio.to_thread(instance_a.internal, "POST", "/internal/reset")
        assert refused.status_code == 409
        assert await redis_client.hget(key, "session") == session
        reset = (
            await asyncio.to_thread(
                instance_a.internal, "POST", "/internal/reset", headers={SESSION_HEADER: session}
            )
        ).json()
        assert reset["session"] == ""
    await asyncio.sleep(0.3)
    assert await redis_client.hget(key, "session") == ""

    assert instance_a.internal("POST", "/internal/drain").json()["state"] == "draining"
    await asyncio.sleep(0.3)
    assert await redis_client.hget(key, "state") == "draining"


async def test_sigterm_finishes_in_flight_calls_then_deregisters(
    fake: FakeProvider, spawn_instance: SpawnInstance, redis_client: aioredis.Redis, keys: Keys
) -> None:
    inst = spawn_instance()
    fake.default = Behaviour(delay=2.0)
    async with connect(inst, "2026-07-28", session=new_session()) as client:
        await client.list_tools()  # the SDK validates results against a cached tool list
        call = asyncio.create_task(client.call_tool("chat", {"prompt": "finish me"}))
        for _ in range(50):
            if fake.snapshot():
                break
            await asyncio.sleep(0.05)
        inst.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert await redis_client.hget(keys.instance(inst.id), "state") == "stopping"
        async with httpx.AsyncClient(timeout=5) as http:
            refused = await http.post(
                inst.url + "/mcp", headers={INTERNAL_TOKEN_HEADER: INTERNAL_TOKEN}, json={}
            )
        assert refused.status_code == 503 and refused.json()["error"]["data"]["error"] == "shutting_down"
        result = await call
    assert not result.is_error and "finish me" in result.structured_content["content"]  # type: ignore[index]
    started = time.monotonic()
    code = await asyncio.to_thread(inst.wait, 20)
    assert code == 0, inst.log()
    assert time.monotonic() - started < 10
    assert not await redis_client.exists(keys.instance(inst.id))
    assert inst.id not in await redis_client.smembers(keys.instances())
    assert "Traceback" not in inst.log()


def test_config_errors_are_one_line(spawn_instance: SpawnInstance, tmp_path: object) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_")}
    env["EXAI_INTERNAL_TOKEN"] = "x"
    out = subprocess.run(
        [sys.executable, "-m", "instance.main"], env=env, capture_output=True, text=True, timeout=30, cwd="/"
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "EXAI_INSTANCE_PORT" in out.stderr
