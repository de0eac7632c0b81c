"""The TypeScript SDK's Streamable HTTP client straight at the router (handshake era), not
through exai-bridge: another SDK's framing, its own connection handling, parallel calls of one
session, progress, cancellation and the session's end (tests/bridge/node/http_client.mjs).

Node must be on PATH (the test is skipped only when it is not); the SDK is installed into
tests/bridge/node/node_modules on first use (`npm ci`, from the committed package-lock.json).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bridge.conftest import TOKEN, NodeSteps, cancel_a_hanging_call, node_script
from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def node_client() -> Path:
    return node_script("http_client.mjs")


async def test_typescript_http_client_straight_at_the_router(
    fleet: Fleet, provider: FakeProvider, node_client: Path, tmp_path: Path
) -> None:
    steps = await NodeSteps.start(str(node_client), fleet.mcp_url, TOKEN, cwd=tmp_path)
    read, go = steps.read, steps.go
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

        await cancel_a_hanging_call(steps, fleet, provider, first["instance_id"])

        assert (await read())["wait"] == "provider back"
        await go()
        second = await read()
        assert second["step"] == "status2", second
        assert (second["status"]["session"], second["status"]["instance_id"]) == (
            first["session"], first["instance_id"],
        )  # fmt: skip
        assert (await read())["step"] == "done"
        assert await steps.finished() == 0
        status, body = await fleet.admin("GET", "/admin/sessions")  # DELETE ended it
        assert status == 200 and first["session"] not in {s["id"] for s in body["sessions"]}
    finally:
        await steps.kill()
