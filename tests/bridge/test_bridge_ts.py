"""exai-bridge driven by the TypeScript SDK's stdio client (tests/bridge/node/client.mjs).

Node must be on PATH (the test is skipped only when it is not); the SDK is installed into
tests/bridge/node/node_modules on first use (`npm ci`, from the committed package-lock.json).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.bridge.conftest import BRIDGE, NodeSteps, bridge_env, cancel_a_hanging_call, node_script
from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def node_client() -> Path:
    return node_script("client.mjs")


async def test_typescript_stdio_client_through_the_bridge_across_a_router_restart(
    fleet: Fleet, provider: FakeProvider, node_client: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXAI_")}
    env.update(bridge_env(fleet, EXAI_BRIDGE_SESSION="ts-stdio"))
    steps = await NodeSteps.start(str(node_client), BRIDGE, env=env, cwd=tmp_path)
    read, go = steps.read, steps.go
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

        await cancel_a_hanging_call(steps, fleet, provider, first["instance_id"])

        assert (await read())["wait"] == "router restarted"
        await asyncio.to_thread(fleet.restart_router)
        await go()
        second = await read()
        assert second["step"] == "status2" and second["status"]["session"] == first["session"]
        assert (await read())["step"] == "done"
        assert await steps.finished() == 0
    finally:
        await steps.kill()
