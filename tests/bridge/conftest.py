"""A fleet with client tokens for the exai-bridge tests, and helpers to watch an instance.

The bridge runs as the real console script (`.venv/bin/exai-bridge`), started by the SDKs' own
stdio transports (Python and TypeScript) or by the test directly.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests import node
from tests.conftest import _fleet_maker
from tests.fakes.provider import Behaviour, FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, instance_num

BRIDGE = str(Path(sys.executable).parent / "exai-bridge")
TOKEN = "bridge-test-token"
NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="package")
def provider() -> Iterator[FakeProvider]:
    """The fake LLM provider (a real HTTP server on loopback) for the bridge tests' fleet."""
    with FakeProvider().running() as fake:
        yield fake


@pytest.fixture(scope="package")
def fleet(
    pg_dsn: str,
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
    provider: FakeProvider,
) -> Iterator[Fleet]:
    """One fleet for every bridge test module (each fleet costs seconds to start)."""
    with _fleet_maker(pg_dsn, redis_url, f"{redis_prefix}b", tmp_path_factory) as make:
        yield make(
            instances=2,
            max_instances=2,
            glm_api_key="fake-key",
            glm_api_url=provider.glm_url,
            provider_max_retries=0,
            auth_tokens=[f"tester={TOKEN}"],
            **ROUTER_TEST_SETTINGS,
        )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet, provider: FakeProvider) -> AsyncIterator[None]:
    yield
    provider.reset()
    await fleet.end_all_sessions()


def bridge_env(fleet: Fleet, **extra: str) -> dict[str, str]:
    return {"EXAI_BRIDGE_URL": fleet.mcp_url, "EXAI_BRIDGE_TOKEN": TOKEN, **extra}


async def instance_inflight(fleet: Fleet, instance_id: str) -> int:
    port = fleet.instance_port(instance_num(instance_id))
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{port}/internal/health",
            headers={"X-Exai-Internal-Token": fleet.internal_token},
        ) as r,
    ):
        return int((await r.json())["inflight"])


async def until(pred: Callable[[], Any], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await pred():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def node_script(name: str) -> Path:
    """A script of tests/bridge/node, once the TypeScript SDK is installed beside it (`npm ci`)."""
    node.installed(NODE_DIR, "node_modules/@modelcontextprotocol/sdk", timeout=300)
    return NODE_DIR / name


class NodeSteps:
    """A node test client that prints one JSON object per step and waits for a "go" line on
    its stdin where the test has to set something up first."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc = proc
        self._stdin, self._stdout = proc.stdin, proc.stdout

    @classmethod
    async def start(cls, *args: str, cwd: Path, env: dict[str, str] | None = None) -> NodeSteps:
        proc = await asyncio.create_subprocess_exec(
            "node", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=cwd
        )
        return cls(proc)

    async def read(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self._stdout.readline(), 90)
        assert line, "the TypeScript client exited early"
        return dict(json.loads(line))

    async def go(self) -> None:
        self._stdin.write(b"go\n")
        await self._stdin.drain()

    async def finished(self) -> int:
        return await asyncio.wait_for(self.proc.wait(), 30)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def cancel_a_hanging_call(
    steps: NodeSteps, fleet: Fleet, provider: FakeProvider, instance_id: str
) -> None:
    """The client's cancellation step: the provider hangs, the client starts a call and, once
    the instance runs it, cancels it; the instance must stop the call (notifications/cancelled)."""
    assert (await steps.read())["wait"] == "hanging provider"
    provider.reset(Behaviour(hang=True))
    await steps.go()
    assert (await steps.read())["wait"] == "call running"

    async def running() -> bool:
        return await instance_inflight(fleet, instance_id) >= 1

    async def idle() -> bool:
        return await instance_inflight(fleet, instance_id) == 0

    await until(running)
    await steps.go()
    cancelled = await steps.read()
    assert cancelled["outcome"].startswith("rejected"), cancelled
    await until(idle)
    provider.reset()
