"""Security and input checks at the router's door, against a real router with client tokens.

The router here requires EXAI_AUTH_TOKENS (alice, bob); one instance behind it, both under
real supervisord (tests/fleet.py).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fleet import Fleet
from tests.ports import free_port
from tests.router.conftest import ROUTER_TEST_SETTINGS, mcp_client, status_of

pytestmark = pytest.mark.timeout(90)

ALICE, BOB = "tok-alice-123", "tok-bob-456"
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet]) -> Fleet:
    return module_fleet_factory(
        instances=1,
        max_instances=1,
        auth_tokens=[f"alice={ALICE}", f"bob={BOB}"],
        max_body_bytes=4096,
        **ROUTER_TEST_SETTINGS,
    )


async def _post(
    fleet: Fleet, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as http,
        http.post(fleet.mcp_url, data=data, headers=headers or {}) as r,
    ):
        text = await r.text()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return r.status, dict(r.headers), parsed


def _bearer(token: str) -> dict[str, str]:
    return {**ACCEPT, "Authorization": f"Bearer {token}"}


async def test_mcp_requires_a_known_token(fleet: Fleet) -> None:
    status, _, body = await _post(fleet, INIT, ACCEPT)
    assert status == 401 and body["error"]["data"]["error"] == "unauthorized"
    status, _, body = await _post(fleet, INIT, _bearer("nope"))
    assert status == 401


async def test_a_session_answers_only_its_principal(fleet: Fleet) -> None:
    async with mcp_client(fleet.mcp_url, "legacy", token=ALICE) as alice:
        st = await status_of(alice)
        assert st["principal"] == "alice"
        req = {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}
        headers = {**_bearer(BOB), "Mcp-Session-Id": st["session"], "MCP-Protocol-Version": "2025-11-25"}
        status, _, body = await _post(fleet, req, headers)
        assert status == 404 and body["id"] == 5
        await status_of(alice)  # alice is unaffected


async def test_foreign_origin_is_refused_and_local_origin_allowed(fleet: Fleet) -> None:
    status, _, body = await _post(fleet, INIT, {**_bearer(ALICE), "Origin": "http://evil.example"})
    assert status == 403 and body["error"]["data"]["error"] == "forbidden"
    status, headers, _ = await _post(fleet, INIT, {**_bearer(ALICE), "Origin": "http://localhost:3000"})
    assert status == 200 and "Mcp-Session-Id" in headers
    await fleet.end_all_sessions()


async def test_oversized_and_malformed_bodies_get_jsonrpc_errors(fleet: Fleet) -> None:
    big = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"pad": "x" * 5000}}
    status, _, body = await _post(fleet, big, _bearer(ALICE))
    assert status == 413 and body["error"]["data"]["error"] == "payload_too_large"

    status, _, body = await _post(fleet, b'{"jsonrpc": "2.0", "id": 3, "meth', _bearer(ALICE))
    assert status == 400 and body["error"]["code"] == -32700

    status, _, body = await _post(fleet, b"[1, 2, 3]", _bearer(ALICE))
    assert status == 400 and body["error"]["code"] == -32600

    status, _, body = await _post(fleet, INIT, {**_bearer(ALICE), "Content-Type": "text/plain"})
    assert status == 400 and body["error"]["code"] == -32600


async def test_an_oversized_body_in_one_write_gets_413_on_the_fast_path(fleet: Fleet) -> None:
    """A whole request a little over EXAI_MAX_BODY_BYTES, in one write on a keep-alive
    connection: the fast path's size (router/fastpath.py) lets it in, and the proxy still
    refuses it with the same JSON-RPC 413; a call within the limit is answered after it."""
    port = int(fleet.router_url.rsplit(":", 1)[1])

    def request(body: bytes) -> bytes:
        head = (
            "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            "Accept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-11-25\r\n"
            f"Authorization: Bearer {ALICE}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body

    async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = int(
            next(ln.split(":", 1)[1] for ln in head.split("\r\n") if ln.lower().startswith("content-length"))
        )
        return int(head.split()[1]), json.loads(await reader.readexactly(length))

    async def fast_count() -> float:
        _, text = await fleet.admin("GET", "/metrics")
        line = [ln for ln in text.splitlines() if ln.startswith("exai_router_fast_path_requests_total ")]
        return float(line[0].split()[1]) if line else 0.0

    before = await fast_count()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        big = {"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"pad": "x" * 5000}}
        writer.write(request(json.dumps(big).encode()))
        async with asyncio.timeout(20):
            status, body = await answer(reader)
        assert status == 413 and body["error"]["data"]["error"] == "payload_too_large", body
        assert body["id"] is None or body["id"] == 2
        assert "4096" in body["error"]["message"], body
        assert await fast_count() == before + 1  # refused by the proxy, on the fast path
    finally:
        writer.close()
    status, _, body = await _post(fleet, INIT, _bearer(ALICE))  # the door still opens
    assert status == 200, body
    await fleet.end_all_sessions()


async def test_admin_endpoints_with_curl(fleet: Fleet) -> None:
    """`curl` on every admin endpoint: no token -> 401, wrong token -> 401, right token -> 2xx."""
    base = fleet.router_url
    async with mcp_client(fleet.mcp_url, "legacy", token=ALICE) as client:
        st = await status_of(client)
        sid, iid = st["session"], st["instance_id"]
        endpoints = [
            ("GET", "/admin/openapi.json"),
            ("GET", "/admin/sessions"),
            ("GET", f"/admin/sessions/{sid}"),
            ("GET", "/admin/instances"),
        ]

        async def curl(method: str, path: str, token: str | None) -> tuple[int, Any]:
            argv = ["curl", "-s", "-w", "\n%{http_code}", "-X", method, base + path]
            if token:
                argv += ["-H", f"Authorization: Bearer {token}"]
            proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
            out, _ = await proc.communicate()
            text, _, code = out.decode().rpartition("\n")
            return int(code), json.loads(text) if text.strip() else None

        for method, path in [
            *endpoints,
            ("POST", f"/admin/instances/{iid}/drain"),
            ("DELETE", f"/admin/sessions/{sid}"),
        ]:
            assert (await curl(method, path, None))[0] == 401, path
            assert (await curl(method, path, "wrong"))[0] == 401, path
        for method, path in endpoints:
            code, body = await curl(method, path, fleet.admin_token)
            assert code == 200, (path, body)
        code, body = await curl("GET", f"/admin/sessions/{sid}", fleet.admin_token)
        assert body["instance"] == iid and body["principal"] == "alice" and body["total"] >= 1
        code, body = await curl("GET", "/admin/instances", fleet.admin_token)
        row = next(i for i in body["instances"] if i["id"] == iid)
        assert row["session"] == sid and row["heartbeat_age"] < 5 and row["port"] > 0
        code, body = await curl("GET", "/admin/openapi.json", fleet.admin_token)
        assert body["openapi"].startswith("3.") and "/admin/sessions/{id}" in body["paths"]

        code, body = await curl("DELETE", f"/admin/sessions/{sid}", fleet.admin_token)
        assert code == 200 and body == {"ended": sid}
        assert (await curl("GET", f"/admin/sessions/{sid}", fleet.admin_token))[0] == 404

        code, body = await curl("POST", f"/admin/instances/{iid}/drain", fleet.admin_token)
        assert code == 200 and body == {"draining": iid}
        code, body = await curl("GET", "/admin/instances", fleet.admin_token)
        assert next(i for i in body["instances"] if i["id"] == iid)["draining"] is True
        # The only instance is drained: not ready, until the drain is undone.
        assert (await _plain(base + "/readyz"))[0] == 503
        code, body = await curl("DELETE", f"/admin/instances/{iid}/drain", fleet.admin_token)
        assert code == 200 and body == {"undrained": iid, "was_draining": True}

    for path in ("/healthz", "/readyz", "/metrics"):
        code, _ = await asyncio.wait_for(_plain(base + path), 10)
        assert code == 200, path
    _, metrics = await _plain(base + "/metrics")
    for name in (
        "exai_router_sessions",
        "exai_router_instances",
        "exai_router_request_seconds_bucket",
        "exai_router_allocation_waits_total",
        "exai_router_upstream_errors_total",
    ):
        assert name in metrics


async def _plain(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.text()


def _run_router(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = str(Path(sys.executable).parent / "exai-router")
    return subprocess.run([exe], env=env, capture_output=True, text=True, timeout=30)


async def test_public_bind_without_tokens_and_busy_port_fail_in_one_line(fleet: Fleet) -> None:
    env = {k: v for k, v in fleet.environment().items() if k != "EXAI_AUTH_TOKENS"}
    env.update(EXAI_ROUTER_HOST="0.0.0.0", EXAI_ROUTER_PORT=str(free_port()))
    done = await asyncio.to_thread(_run_router, env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "EXAI_AUTH_TOKENS" in done.stderr

    env = {**fleet.environment(), "EXAI_ROUTER_PORT": str(fleet.settings.router_port)}
    done = await asyncio.to_thread(_run_router, env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "exai-router: error:" in done.stderr
