"""Issue 14 at the router's door: hostile bytes, wrong methods and paths, slow clients, drains.

One real fleet (router + 2 instances under supervisord); raw sockets where the bytes matter.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, mcp_client, status_of

pytestmark = pytest.mark.timeout(120)

SLOW = 1.5  # EXAI_HEADER_TIMEOUT and EXAI_BODY_TIMEOUT of this module's router
INIT = (
    b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25",'
    b'"capabilities":{},"clientInfo":{"name":"raw"}}}'
)


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet]) -> Fleet:
    return module_fleet_factory(
        instances=2, max_instances=2, header_timeout=SLOW, body_timeout=SLOW, **ROUTER_TEST_SETTINGS
    )


async def raw(fleet: Fleet, request: bytes, *, timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is; (status, headers, body) of the answer."""
    port = int(fleet.router_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            length = int(headers.get("content-length", "0"))
            body = await reader.readexactly(length) if length else b""
        return status, headers, body
    finally:
        writer.close()


def http(method: str, path: str, headers: dict[str, bytes] | None = None, body: bytes = b"") -> bytes:
    out = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode()
    for k, v in (headers or {}).items():
        out += k + b": " + v + b"\r\n"
    if body or method == "POST":
        out += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    return out + b"\r\n" + body


MCP_HEADERS = {b"Content-Type": b"application/json", b"Accept": b"application/json, text/event-stream"}


def jsonrpc_error(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    assert data["jsonrpc"] == "2.0" and "error" in data, data
    return dict(data["error"])


# --- point 4: bytes that are not UTF-8 -------------------------------------------------------
@pytest.mark.parametrize("header", ["Authorization", "Mcp-Session-Id", "X-Exai-Session-Key"])
async def test_non_utf8_header_bytes_get_a_400_not_a_500(fleet: Fleet, header: str) -> None:
    headers = {**MCP_HEADERS, header.encode(): b"Bearer \xff\xfe\xc3("}
    for version in (b"2025-11-25", b"2026-07-28"):
        status, h, body = await raw(
            fleet, http("POST", "/mcp", {**headers, b"MCP-Protocol-Version": version}, INIT)
        )
        assert status == 400, body
        assert h["content-type"].startswith("application/json")
        assert header in jsonrpc_error(body)["message"]
    status, h, body = await raw(fleet, http("GET", "/admin/sessions", {b"Authorization": b"Bearer \xff"}))
    assert status == 400 and json.loads(body)["error"] == "bad_request"


# --- point 7: every route answers in its own format ------------------------------------------
async def test_wrong_methods_and_paths_get_bodies_in_the_routes_format(fleet: Fleet) -> None:
    status, h, body = await raw(fleet, http("PUT", "/mcp", MCP_HEADERS, INIT))
    assert status == 405 and "POST" in h["allow"]
    assert jsonrpc_error(body)["data"]["error"] == "method_not_allowed"
    token = f"Bearer {fleet.admin_token}".encode()
    for method, path, code in (
        ("GET", "/admin/nothing-here", 404),
        ("PUT", "/admin/sessions", 405),
        ("GET", "/nowhere", 404),
    ):
        status, h, body = await raw(fleet, http(method, path, {b"Authorization": token}))
        assert status == code, (method, path, body)
        assert h["content-type"].startswith("application/json"), (method, path)
        data = json.loads(body)
        assert data["error"] in ("route_not_found", "method_not_allowed") and data["message"].endswith(".")


async def test_admin_401_says_where_the_token_is(fleet: Fleet) -> None:
    status, body = await fleet.admin("GET", "/admin/sessions", token=None)
    assert status == 401 and "admin_token" in body["hint"] and "state folder" in body["hint"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="no-http-version"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, id="tls-hello"),
        pytest.param(b"POST /mcp HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", id="header-without-colon"),
        pytest.param(
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n", id="header-too-long"
        ),
        pytest.param(
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
            id="two-content-lengths",
        ),
        pytest.param(
            b"POST /mcp HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(b"GET /mcp HTTP/9.9\r\nHost: x\r\n\r\n", id="unknown-http-version"),
    ],
)
async def test_requests_that_break_http_framing_get_a_json_rpc_400(
    fleet: Fleet, request_bytes: bytes
) -> None:
    """aiohttp's parser refuses these before any handler runs; the answer is still the router's."""
    status, h, body = await raw(fleet, request_bytes)
    assert 400 <= status < 500, (status, body)
    assert h["content-type"].startswith("application/json"), (h, body)
    error = jsonrpc_error(body)
    assert error["data"]["error"] in ("bad_request", "payload_too_large"), error
    assert error["message"].endswith("."), error
    assert error["data"]["message"].endswith("."), error
    async with mcp_client(fleet.mcp_url, "legacy") as client:  # the router is fine afterwards
        await status_of(client)
    await fleet.end_all_sessions()


# --- point 9: slow clients -------------------------------------------------------------------
async def test_half_sent_headers_and_bodies_are_cut_off(fleet: Fleet) -> None:
    port = int(fleet.router_url.rsplit(":", 1)[1])
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(100)]
    try:
        for _, writer in conns:
            writer.write(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
        closed = await asyncio.gather(*(reader.read() for reader, _ in conns))  # EOF once the router closes
        assert all(data == b"" for data in closed)
    finally:
        for _, writer in conns:
            writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = http("POST", "/mcp", MCP_HEADERS, INIT).split(b"\r\n\r\n")[0]
        writer.write(
            head.replace(b"Content-Length: " + str(len(INIT)).encode(), b"Content-Length: 500") + b"\r\n\r\n"
        )
        writer.write(INIT[:20])  # and then nothing
        async with asyncio.timeout(SLOW * 10):
            answer = await reader.read()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer
    finally:
        writer.close()
    async with mcp_client(fleet.mcp_url, "legacy") as client:  # the router is fine
        await status_of(client)
    await fleet.end_all_sessions()


# --- point 5: draining can be undone ---------------------------------------------------------
async def _ready(fleet: Fleet) -> tuple[int, Any]:
    return await fleet.admin("GET", "/readyz", token=None)


async def test_a_drain_can_be_undone_and_a_restart_clears_it(fleet: Fleet) -> None:
    await fleet.wait_instances(2)
    ids = [fleet.instance_id(1), fleet.instance_id(2)]
    for iid in ids:
        assert (await fleet.admin("POST", f"/admin/instances/{iid}/drain"))[0] == 200
    status, body = await _ready(fleet)
    assert status == 503 and body["ready"] is False, body  # new sessions would get 503, so: not ready
    with pytest.raises(Exception, match=r"no_free_instance|No free instance|503"):
        async with mcp_client(fleet.mcp_url, "legacy") as client:
            await status_of(client)

    exai = str(Path(sys.executable).with_name("exai"))
    proc = await asyncio.create_subprocess_exec(
        exai, "undrain", ids[0], env=fleet.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b"takes new sessions again" in out, out
    status, body = await _ready(fleet)
    assert status == 200 and body["instances"] == 1, body
    async with mcp_client(fleet.mcp_url, "legacy") as client:
        assert (await status_of(client))["instance_id"] == ids[0]
    await fleet.end_all_sessions()

    await asyncio.to_thread(fleet.restart_instance, 2)  # a restarted process starts undrained
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        _, body = await fleet.admin("GET", "/admin/instances")
        second = [i for i in body["instances"] if i["id"] == ids[1]]
        if second and not second[0]["draining"] and second[0]["state"] == "ready":
            break
        assert loop.time() < deadline, body
        await asyncio.sleep(0.2)
    status, body = await _ready(fleet)
    assert status == 200 and body["instances"] == 2
    status, body = await fleet.admin("DELETE", f"/admin/instances/{ids[1]}/drain")
    assert status == 200 and body == {"undrained": ids[1], "was_draining": False}
    status, body = await fleet.admin("DELETE", "/admin/instances/no-such-instance/drain")
    assert status == 404 and body["error"] == "not_found"
