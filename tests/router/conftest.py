"""Fixtures for the router tests: real instance processes, a real router process, real MCP clients.

`Fleet` starts `exai-instance` and `exai-router` as subprocesses on free ports with their own
Redis prefix, so a test can kill -9 an instance or restart the router exactly as an operator
would. Clients are the SDK's own `Client` over HTTP through the router's port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import mcp_types
import pytest
import redis.asyncio as aioredis
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import free_port

BIN = Path(sys.executable).parent
ADMIN_TOKEN = "admin-" + secrets.token_hex(8)
INTERNAL_TOKEN = "internal-" + secrets.token_hex(8)


async def _wait_port(port: int, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        except OSError:
            if loop.time() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout}s") from None
            await asyncio.sleep(0.1)


class Fleet:
    """Instance and router processes for one test module."""

    def __init__(self, env: dict[str, str], logs: Path, redis_url: str, prefix: str) -> None:
        self.env = env
        self.logs = logs
        self.redis_url = redis_url
        self.prefix = prefix
        self.router_port = int(env["EXAI_ROUTER_PORT"])
        self.base_port = int(env["EXAI_INSTANCE_BASE_PORT"])
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}/mcp"

    async def _spawn(self, name: str, argv: list[str], extra: dict[str, str] | None = None) -> None:
        log = await asyncio.to_thread(open, self.logs / f"{name}.log", "ab")
        try:
            self.procs[name] = await asyncio.create_subprocess_exec(
                *argv,
                env={**self.env, **(extra or {})},
                stdout=log,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            log.close()

    async def start_instance(self, num: int) -> None:
        await self._spawn(
            f"instance_{num:02d}", [str(BIN / "exai-instance")], {"EXAI_INSTANCE_NUM": str(num)}
        )

    async def start_router(self, **extra: str) -> None:
        await self._spawn("router", [str(BIN / "exai-router")], extra)
        await _wait_port(self.router_port)

    async def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    async def wait_instances(self, n: int, timeout: float = 40.0) -> list[dict[str, Any]]:
        """Until the router's admin API lists `n` ready instances."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status, body = await self.admin("GET", "/admin/instances")
            ready = [i for i in body.get("instances", []) if i["state"] == "ready"] if status == 200 else []
            if len(ready) >= n:
                return ready
            if loop.time() > deadline:
                raise TimeoutError(f"only {len(ready)} of {n} instances ready: {body}")
            await asyncio.sleep(0.2)

    async def admin(self, method: str, path: str, token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, f"http://127.0.0.1:{self.router_port}{path}", headers=headers) as r,
        ):
            ctype = r.headers.get("Content-Type", "")
            return r.status, (await r.json() if "json" in ctype else await r.text())

    async def end_all_sessions(self) -> None:
        status, body = await self.admin("GET", "/admin/sessions")
        if status == 200:
            for s in body["sessions"]:
                await self.admin("DELETE", f"/admin/sessions/{s['id']}")

    async def close(self) -> None:
        for name in list(self.procs):
            await self.stop(name)
        client = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
        async for key in client.scan_iter(match=f"{self.prefix}:*", count=500):
            await client.delete(key)
        await client.aclose()


@pytest.fixture(scope="module")
async def make_fleet(
    pg_dsn: str, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Callable[..., Any]]:
    """Factory: `await make_fleet(instances=5, **env)` -> a started Fleet (closed at module end)."""
    fleets: list[Fleet] = []

    async def make(instances: int = 5, start_router: bool = True, **env: str) -> Fleet:
        prefix = f"{redis_prefix}r{secrets.token_hex(3)}"
        state = tmp_path_factory.mktemp("fleet")
        base = free_port()
        while base + instances + 1 > 65000:
            base = free_port()
        full = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("EXAI_", "GLM_", "KIMI_"))},
            "DATABASE_URL": pg_dsn,
            "REDIS_URL": redis_url,
            "EXAI_REDIS_PREFIX": prefix,
            "EXAI_STATE_DIR": str(state),
            "EXAI_ROUTER_PORT": str(free_port()),
            "EXAI_INSTANCE_BASE_PORT": str(base - 1),
            "EXAI_INTERNAL_TOKEN": INTERNAL_TOKEN,
            "EXAI_ADMIN_TOKEN": ADMIN_TOKEN,
            "EXAI_HEARTBEAT_INTERVAL": "0.5",
            "EXAI_HEARTBEAT_TTL": "2",
            "EXAI_ALLOCATION_DEADLINE": "2",
            "EXAI_AUTOSTART_SPARES": "false",
            "EXAI_LOG_LEVEL": "INFO",
            **env,
        }
        fleet = Fleet(full, state, redis_url, prefix)
        fleets.append(fleet)
        # Ports base .. base+instances-1 must be free; take them as given (free_port is random).
        await asyncio.gather(*(fleet.start_instance(n) for n in range(1, instances + 1)))
        if start_router:
            await fleet.start_router()
            if instances:
                await fleet.wait_instances(instances)
        return fleet

    yield make
    for fleet in fleets:
        await fleet.close()


@contextlib.asynccontextmanager
async def mcp_client(
    url: str,
    mode: str = "legacy",
    *,
    name: str = "tests",
    token: str | None = None,
    session_ids: list[str] | None = None,
) -> AsyncIterator[Client]:
    """A real SDK client through the router (mode: 'legacy' handshake era or '2026-07-28').

    `session_ids` collects the Mcp-Session-Id of every request the client sends.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def record(request: httpx2.Request) -> None:
        if session_ids is not None and (sid := request.headers.get("mcp-session-id")):
            session_ids.append(sid)

    try:
        async with (
            httpx2.AsyncClient(
                headers=headers, timeout=httpx2.Timeout(30.0, read=60.0), event_hooks={"request": [record]}
            ) as http,
            Client(
                streamable_http_client(url, http_client=http),
                mode=mode,  # type: ignore[arg-type]
                client_info=mcp_types.Implementation(name=name, version="1"),
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
