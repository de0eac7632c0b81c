"""exai-bridge driven by the Python SDK's own stdio client, and by hand, through a real fleet.

A whole session per protocol era: tools, progress, cancellation, a router restart in the
middle and a failover to another instance (the client must not notice either), a session the
router forgot (the bridge opens a new one),
and the bridge's own exits and messages.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import mcp_types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.bridge.conftest import BRIDGE, TOKEN, bridge_env, instance_inflight, instance_num, until
from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet
from tests.ports import free_port
from tests.router.conftest import status_of

pytestmark = pytest.mark.timeout(180)

INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "raw", "version": "1"},
    },
}


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_python_stdio_client_through_the_bridge_across_a_router_restart(
    fleet: Fleet, provider: FakeProvider, mode: str, tmp_path: Path
) -> None:
    params = StdioServerParameters(
        command=BRIDGE, args=["--session", f"py-{mode}"], env=bridge_env(fleet), cwd=tmp_path
    )
    progress: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message or str(value))

    async with Client(
        params, mode=mode, client_info=mcp_types.Implementation(name=f"py-{mode}", version="1")
    ) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"chat", "status", "task_create"} <= tools
        first = await status_of(client)

        # Progress: the chat takes 3 s, the instance reports after 2 s.
        provider.reset(Behaviour(delay=3.0))
        result = await client.call_tool("chat", {"prompt": "take your time"}, progress_callback=on_progress)
        assert not result.is_error, result
        assert progress and "waiting for" in progress[0]

        # Cancellation: the client abandons a call the provider holds; the instance stops it.
        provider.reset(Behaviour(hang=True))
        call = asyncio.create_task(client.call_tool("chat", {"prompt": "never mind"}))

        async def running() -> bool:
            return await instance_inflight(fleet, first["instance_id"]) >= 1

        async def idle() -> bool:
            return await instance_inflight(fleet, first["instance_id"]) == 0

        await until(running)
        call.cancel()
        await until(idle)
        provider.reset()

        # The router restarts between two calls: the client does not notice.
        await asyncio.to_thread(fleet.restart_router)
        after_restart = await status_of(client)
        assert after_restart["session"] == first["session"]

        # The instance dies (kill -9, not restarted): the router moves the session elsewhere.
        num = instance_num(first["instance_id"])
        pid = await asyncio.to_thread(fleet.kill_instance, num, restart=False)

        async def gone() -> bool:  # the next call comes once the registry has dropped the pid
            _, body = await fleet.admin("GET", "/admin/instances")
            return all(str(i["pid"]) != str(pid) for i in body["instances"])

        await until(gone)
        moved = await status_of(client)
        assert moved["session"] == first["session"] and moved["instance_id"] != first["instance_id"]
        await asyncio.to_thread(fleet.start_instance, num)
        await fleet.wait_instances(2)

        # The router forgets the session (ended by the admin): the next call still works.
        status, _ = await fleet.admin("DELETE", f"/admin/sessions/{first['session']}")
        assert status == 200
        again = await status_of(client)
        assert again["session"] != first["session"]
        result = await client.call_tool("chat", {"prompt": "still there?"})
        assert not result.is_error, result


async def _exchange(proc: asyncio.subprocess.Process, *messages: dict[str, Any]) -> list[dict[str, Any]]:
    """Write `messages`; read one line per request among them."""
    assert proc.stdin is not None and proc.stdout is not None
    answers = []
    for message in messages:
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        await proc.stdin.drain()
        if "id" in message:
            answers.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)))
    return answers


async def _bridge(*args: str, env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_")}
    return await asyncio.create_subprocess_exec(
        BRIDGE,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **env},
        cwd=cwd,
    )


async def test_closing_stdin_exits_0_and_ends_the_session(fleet: Fleet, tmp_path: Path) -> None:
    proc = await _bridge(env=bridge_env(fleet), cwd=tmp_path)
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "status", "arguments": {}}}
    init, status = await _exchange(
        proc, INIT, {"jsonrpc": "2.0", "method": "notifications/initialized"}, call
    )
    assert init["result"]["protocolVersion"] == "2025-11-25"
    session = status["result"]["structuredContent"]["session"]
    _, body = await fleet.admin("GET", "/admin/sessions")
    assert session in {s["id"] for s in body["sessions"]}

    assert proc.stdin is not None
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    _, body = await fleet.admin("GET", "/admin/sessions")
    assert session not in {s["id"] for s in body["sessions"]}  # the bridge said goodbye


async def test_a_wrong_token_is_explained_on_stderr(fleet: Fleet, tmp_path: Path) -> None:
    proc = await _bridge("--token", "not-" + TOKEN, env=bridge_env(fleet), cwd=tmp_path)
    (answer,) = await _exchange(proc, INIT)
    assert answer["id"] == 0 and answer["error"]["data"]["error"] == "unauthorized"
    assert proc.stdin is not None
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert proc.stderr is not None
    stderr = (await proc.stderr.read()).decode()
    assert "HTTP 401" in stderr and "EXAI_BRIDGE_TOKEN" in stderr


async def test_a_router_that_is_down_is_explained_on_stderr_and_to_the_client(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/mcp"
    proc = await _bridge(url, env={"EXAI_BRIDGE_RETRY_SECONDS": "1"}, cwd=tmp_path)
    (answer,) = await _exchange(proc, INIT)
    assert answer["error"]["data"]["error"] == "router_unreachable"
    assert "exai up" in answer["error"]["message"]
    assert proc.stdin is not None
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert proc.stderr is not None
    stderr = (await proc.stderr.read()).decode()
    assert f"cannot reach the EXAI router at {url}" in stderr
