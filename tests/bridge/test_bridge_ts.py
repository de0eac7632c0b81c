"""exai-bridge driven by the TypeScript SDK's stdio client (tests/bridge/node/client.mjs).

Node must be on PATH (the test is skipped only when it is not); the SDK is installed into
tests/bridge/node/node_modules on first use (`npm ci`, from the committed package-lock.json).
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests import node
from tests.bridge.conftest import BRIDGE, bridge_env, instance_inflight, until
from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(240)

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    node.installed(NODE_DIR, "node_modules/@modelcontextprotocol/sdk", timeout=300)
    return NODE_DIR / "client.mjs"


async def test_typescript_stdio_client_through_the_bridge_across_a_router_restart(
    fleet: Fleet, provider: FakeProvider, node_client: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_")}
    env.update(bridge_env(fleet, EXAI_BRIDGE_SESSION="ts-stdio"))
    proc = await asyncio.create_subprocess_exec(
        "node", str(node_client), BRIDGE,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
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
        assert (await read())["step"] == "connected"
        tools = await read()
        assert {"chat", "status"} <= set(tools["names"])
        first = (await read())["status"]

        assert (await read())["wait"] == "slow provider"
        provider.reset(Behaviour(delay=3.0))
        await go()
        slow = await read()
        assert slow["step"] == "progress" and not slow["isError"] and slow["progress"], slow

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
        await until(idle)  # the instance stopped the call
        provider.reset()

        assert (await read())["wait"] == "router restarted"
        await asyncio.to_thread(fleet.restart_router)
        await go()
        second = await read()
        assert second["step"] == "status2" and second["status"]["session"] == first["session"]
        assert (await read())["step"] == "done"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
