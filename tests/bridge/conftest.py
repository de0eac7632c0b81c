"""A fleet with client tokens for the exai-bridge tests, and helpers to watch an instance.

The bridge runs as the real console script (`.venv/bin/exai-bridge`), started by the SDKs' own
stdio transports (Python and TypeScript) or by the test directly.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import _fleet_maker
from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, instance_num

BRIDGE = str(Path(sys.executable).parent / "exai-bridge")
TOKEN = "bridge-test-token"


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
