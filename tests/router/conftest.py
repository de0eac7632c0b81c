"""Helpers for the router tests: real MCP clients through the router's port.

Fleets come from tests/fleet.py (router and instances under real supervisord, the `exai up`
path) through the `fleet_factory` / `module_fleet_factory` fixtures of tests/conftest.py.
Clients are the SDK's own `Client` over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import mcp_types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.fakes.provider import FakeProvider
from tests.redis_server import OwnRedis

# What the router tests want from every fleet (tests/fleet.py, real supervisord): quick
# heartbeats so a dead instance leaves the registry fast, a short allocation deadline, no spares.
ROUTER_TEST_SETTINGS: dict[str, Any] = {
    "heartbeat_interval": 0.5,
    "heartbeat_ttl": 2.0,
    "allocation_deadline": 2.0,
    "autostart_spares": False,
    "log_level": "INFO",
}


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    """The fake LLM provider (a real HTTP server on loopback) for one test module's fleet."""
    with FakeProvider().running() as fake:
        yield fake


def glm_on(provider: FakeProvider) -> dict[str, Any]:
    """A fleet's settings for chat on the fake provider: GLM with a key, the default model."""
    return {"glm_api_key": "fake-key", "glm_api_url": provider.glm_url, "default_model": "glm-4.6"}


def instance_num(instance_id: str) -> int:
    """instance_03 -> 3"""
    return int(instance_id.rsplit("_", 1)[1])


@contextlib.asynccontextmanager
async def mcp_client(
    url: str,
    mode: str = "legacy",
    *,
    name: str = "tests",
    token: str | None = None,
    session_ids: list[str] | None = None,
    message_handler: Any = None,
    headers: dict[str, str] | None = None,
    on_request: Callable[[httpx2.Request], None] | None = None,
) -> AsyncIterator[Client]:
    """A real SDK client through the router (mode: 'legacy' handshake era or '2026-07-28').

    `session_ids` collects the Mcp-Session-Id of every request the client sends;
    `message_handler` sees what the server sends outside answers (notifications);
    `on_request` is called with each HTTP request as the client is about to send it.
    """
    headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}

    async def record(request: httpx2.Request) -> None:
        if session_ids is not None and (sid := request.headers.get("mcp-session-id")):
            session_ids.append(sid)
        if on_request is not None:
            on_request(request)

    try:
        async with (
            httpx2.AsyncClient(
                headers=headers, timeout=httpx2.Timeout(30.0, read=60.0), event_hooks={"request": [record]}
            ) as http,
            Client(
                streamable_http_client(url, http_client=http),
                mode=mode,  # type: ignore[arg-type]
                client_info=mcp_types.Implementation(name=name, version="1"),
                message_handler=message_handler,
            ) as client,
        ):
            yield client
    except BaseExceptionGroup as group:
        # anyio nests the real failure ten task groups deep; show it plainly.
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup):
            leaf = leaf.exceptions[0]
        raise leaf from None


async def status_of(client: Client) -> dict[str, Any]:
    result = await client.call_tool("status", {})
    assert not result.is_error, result
    assert result.structured_content is not None
    return dict(result.structured_content)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnRedis]:
    """A redis-server of the module's own (AOF on), for tests that kill and restart Redis."""
    server = OwnRedis(Path(tmp_path_factory.mktemp("own-redis")) / "data").start()
    yield server
    server.stop()


async def call(client: Client, tool: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tool call that must succeed; its structured result."""
    result = await client.call_tool(tool, args or {})
    assert not result.is_error, result
    assert result.structured_content is not None
    return dict(result.structured_content)


async def inbox_when_served(
    client: Client, group: str, *, limit: int, tries: int = 300
) -> list[dict[str, Any]]:
    """One page of `group`'s inbox, retried every 0.2 s while the session cannot be served (its
    instance restarting, or Redis down while it has to be bound again)."""
    for _ in range(tries):
        with contextlib.suppress(Exception):
            result = await client.call_tool("link_inbox", {"group": group, "limit": limit})
            if not result.is_error:
                return list(result.structured_content["events"])  # type: ignore[index]
        await asyncio.sleep(0.2)
    raise AssertionError(f"the session was not served again in {tries * 0.2:g}s")


async def error_of(client: Client, tool: str, args: dict[str, Any]) -> str:
    """A tool call that must fail; its error text."""
    result = await client.call_tool(tool, args)
    assert result.is_error, result
    return str(result.content[0].text)  # type: ignore[union-attr]
