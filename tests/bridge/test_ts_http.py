"""The TypeScript SDK's Streamable HTTP client straight at the router (handshake era), not
through exai-bridge: another SDK's framing, its own connection handling, parallel calls of one
session, progress, cancellation and the session's end (tests/bridge/node/http_client.mjs).

Node must be on PATH (the test is skipped only when it is not); the SDK is installed into
tests/bridge/node/node_modules on first use (`npm ci`, from the committed package-lock.json).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests import node
from tests.bridge.conftest import TOKEN, instance_inflight, until
from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(240)

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    node.installed(NODE_DIR, "node_modules/@modelcontextprotocol/sdk", timeout=300)
    return NODE_DIR / "http_client.mjs"


async def test_typescript_http_client_straight_at_the_router(
    fleet: Fleet, provider: FakeProvider, node_client: Path, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        "node", str(node_client), fleet.mcp_url, TOKEN,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def read() -> dict[str, Any]:
        line = await asyncio.wait_for(stdout.readline(), 90)
        assert line, "the TypeScript client exited early"
        return dict(json.loads(line))

    async def go() -> None:
        stdin.write(b"go\n")
        await stdin.drain()

    try:
        connected = await read()
        assert connected["step"] == "connected" and connected["session"], connected
        tools = await read()
        assert {"chat", "status", "task_create"} <= set(tools["names"])
        first = (await read())["status"]
        assert first["session"] == connected["session"]

        parallel = await read()
        assert parallel["step"] == "parallel"
        for n, answer in enumerate(parallel["answers"]):
            assert f"parallel {n}" in answer, parallel

        assert (await read())["wait"] == "slow provider"
        provider.reset(Behaviour(delay=3.0))
        await go()
        slow = await read()
        assert slow["step"] == "progress" and not slow["isError"], slow
        assert "take your time" in slow["content"] and slow["progress"], slow

        assert (await read())["wait"] == "hanging provider"
        provider.reset(Behaviour(hang=True))
        await go()
        assert (await read())["wait"] == "call running"

        async def running() -> bool:
            return await instance_inflight(fleet, first["instance_id"]) >= 1

        async def idle() -> bool:
            return await instance_inflight(fleet, first["instance_id"]) == 0

        await until(running)
        await go()
        cancelled = await read()
        assert cancelled["outcome"].startswith("rejected"), cancelled
        await until(idle)  # the instance stopped the call (notifications/cancelled)
        provider.reset()

        assert (await read())["wait"] == "provider back"
        await go()
        second = await read()
        assert second["step"] == "status2", second
        assert (second["status"]["session"], second["status"]["instance_id"]) == (
            first["session"], first["instance_id"],
        )  # fmt: skip
        assert (await read())["step"] == "done"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        status, body = await fleet.admin("GET", "/admin/sessions")  # DELETE ended it
        assert status == 200 and first["session"] not in {s["id"] for s in body["sessions"]}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
