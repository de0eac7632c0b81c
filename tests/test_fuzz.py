"""Fuzzing the fleet from outside: raw HTTP at /mcp and /admin, JSON-RPC inside a live session.

Whatever arrives, the router and its instances must answer: no 5xx, no hang, every answer
well-formed for its route (a JSON-RPC error object on /mcp, the admin JSON shape elsewhere,
`[code] what happened. what to do.` for tool errors), and no process restarted by the end.

Bounded for CI (EXAI_FUZZ_EXAMPLES examples per target, default 40, each request with a
timeout). For a release check run a long one:

    EXAI_FUZZ_EXAMPLES=3000 .venv/bin/python -m pytest -q tests/test_fuzz.py

Header values and paths never carry CR, LF or other control bytes, and no header comes twice:
those break HTTP framing (or its singleton-header rule), and aiohttp's parser answers them with
its own plain-text 400 before any route is chosen.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS

pytestmark = pytest.mark.timeout(600)

EXAMPLES = int(os.environ.get("EXAI_FUZZ_EXAMPLES", "40"))
REQUEST_TIMEOUT = 30.0
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # each request has its own timeout; a hang fails the example
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
ERROR_SHAPE = re.compile(r"\[[a-z_]+\] [^\n]+[.?!]", re.DOTALL)
TOOLS = [
    "chat", "task_create", "task_update", "task_get", "task_list", "note_write", "note_read",
    "note_list", "note_delete", "listmodels", "version", "status",
]  # fmt: skip


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider().running() as fake:
        yield fake


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Iterator[Fleet]:
    fl = module_fleet_factory(
        instances=2,
        max_instances=2,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        max_body_bytes=65536,
        **ROUTER_TEST_SETTINGS,
    )
    before = {p.name: p.pid for p in fl.processes()}
    yield fl
    after = {p.name: p.pid for p in fl.processes()}
    assert after == before, f"a process restarted during fuzzing: {before} -> {after}"


# --- raw HTTP ----------------------------------------------------------------------------------
async def _exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(REQUEST_TIMEOUT):
            data = await reader.read()  # Connection: close
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 "), data[:200]
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return int(lines[0].split()[1]), headers, body


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def _request(method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    out = f"{method} {path} HTTP/1.1\r\n".encode() + b"Host: 127.0.0.1\r\nConnection: close\r\n"
    once = {k.lower(): (k, v) for k, v in headers}  # the last value of a header wins
    for k, v in once.values():
        out += k + b": " + v + b"\r\n"
    return out + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body


def _port(fleet: Fleet) -> int:
    return int(fleet.router_url.rsplit(":", 1)[1])


def _check_mcp_answer(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status < 500 or (status == 503 and "retry-after" in headers), (status, body[:300])
    ctype = headers.get("content-type", "")
    if status >= 400:
        assert ctype.startswith("application/json"), (status, ctype, body[:200])
        data = json.loads(body)
        assert data["jsonrpc"] == "2.0" and isinstance(data["error"]["code"], int), data
        assert isinstance(data["error"]["message"], str) and data["error"]["message"], data
    elif body and ctype.startswith("application/json"):
        json.loads(body)
    elif body:
        assert ctype.startswith("text/event-stream"), (status, ctype)
        for event in _sse_messages(body):
            _check_jsonrpc(event)


def _sse_messages(body: bytes) -> list[dict[str, Any]]:
    out = []
    for line in re.split(r"\r\n|\r|\n", body.decode("utf-8")):  # SSE's line ends, not str.splitlines's
        if line.startswith("data:") and line[5:].strip():
            out.append(json.loads(line[5:]))
    return out


def _check_jsonrpc(message: dict[str, Any]) -> None:
    assert message.get("jsonrpc") == "2.0", message
    if "error" in message:
        assert isinstance(message["error"]["code"], int) and isinstance(message["error"]["message"], str)
        return
    result = message.get("result")
    if isinstance(result, dict) and result.get("isError"):
        texts = [c.get("text", "") for c in result.get("content", []) if c.get("type") == "text"]
        for text in texts:
            assert ERROR_SHAPE.fullmatch(text), text


# Header values: printable latin-1 plus raw high bytes (not UTF-8), never control bytes.
header_values = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c >= 0x20 and c != 0x7F))
header_names = st.sampled_from(
    [b"Authorization", b"Mcp-Session-Id", b"MCP-Protocol-Version", b"Content-Type", b"Accept",
     b"X-Exai-Session-Key", b"Origin", b"Last-Event-ID", b"Mcp-Method", b"X-Whatever"]
)  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
ARGUMENT_NAMES = st.sampled_from(
    ["prompt", "name", "key", "body", "task_id", "expected_version", "continuation_id", "files", "scope",
     "state", "model", "importance", "metadata", "parent_task_id"]
)  # fmt: skip
versions = st.sampled_from([b"2025-11-25", b"2025-06-18", b"2026-07-28", b"1999-01-01", b""])


@st.composite
def jsonrpc_bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["request", "junk-json", "bytes", "tool"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "junk-json":
        return json.dumps(draw(json_values)).encode()
    msg: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "1.0"]))}
    if draw(st.booleans()):
        msg["id"] = draw(st.integers() | st.text(max_size=10) | st.none())
    if kind == "tool":
        msg["method"] = "tools/call"
        msg["params"] = {
            "name": draw(st.sampled_from(TOOLS) | st.text(max_size=12)),
            "arguments": draw(st.dictionaries(ARGUMENT_NAMES | st.text(max_size=8), json_values, max_size=4)),
        }
    else:
        msg["method"] = draw(
            st.sampled_from(["initialize", "ping", "tools/list", "resources/list", "prompts/list"])
            | st.text(max_size=20)
        )
        if draw(st.booleans()):
            msg["params"] = draw(json_values)
    return json.dumps(msg).encode()


@FUZZ
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "DELETE", "PUT", "PATCH", "OPTIONS"]),
    path=st.sampled_from(["/mcp", "/mcp/", "/mcp/s/fuzz", "/mcp/s/%FF%FE", "/mcp/x"]),
    headers=st.lists(st.tuples(header_names, header_values), max_size=5),
    version=versions,
    body=jsonrpc_bodies(),
)
def test_fuzz_raw_http_at_mcp(
    fleet: Fleet, method: str, path: str, headers: list[tuple[bytes, bytes]], version: bytes, body: bytes
) -> None:
    base = [(b"Content-Type", b"application/json"), (b"Accept", b"application/json, text/event-stream")]
    if version:
        base.append((b"MCP-Protocol-Version", version))
    if method == "GET":
        # A GET that names a live session opens its notification stream, which is meant to stay open.
        headers = [h for h in headers if h[0] != b"Mcp-Session-Id"]
    status, answer_headers, answer = asyncio.run(
        _exchange(_port(fleet), _request(method, path, base + headers, body))
    )
    _check_mcp_answer(status, answer_headers, answer)
    if status < 300:
        asyncio.run(fleet.end_all_sessions())  # keep instances free for the next example


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH"]),
    path=st.sampled_from(
        ["/admin/sessions", "/admin/sessions/x", "/admin/instances", "/admin/instances/instance_01/drain",
         "/admin/instances/%FF/drain", "/admin/openapi.json", "/admin", "/admin/", "/admin/nope/deeper",
         "/healthz", "/readyz", "/metrics", "/", "/favicon.ico"]
    ),
    auth=st.sampled_from(["admin", "none", "wrong", "garbage"]),
    headers=st.lists(st.tuples(header_names, header_values), max_size=3),
    body=st.binary(max_size=100),
)  # fmt: skip
def test_fuzz_raw_http_at_admin(
    fleet: Fleet, method: str, path: str, auth: str, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    hdrs = [h for h in headers if h[0] != b"Authorization"]
    if auth == "admin":
        hdrs.append((b"Authorization", f"Bearer {fleet.admin_token}".encode()))
    elif auth == "wrong":
        hdrs.append((b"Authorization", b"Bearer wrong"))
    elif auth == "garbage":
        hdrs.append((b"Authorization", b"\xff\xfe garbage"))
    status, answer_headers, answer = asyncio.run(_exchange(_port(fleet), _request(method, path, hdrs, body)))
    assert status < 500 or (path == "/readyz" and status == 503), (status, answer[:300])
    if path == "/metrics" and status == 200:
        return
    assert answer_headers.get("content-type", "").startswith("application/json"), (path, status, answer[:200])
    data = json.loads(answer)
    if status >= 400 and path != "/readyz":
        assert isinstance(data["error"], str) and data["message"].endswith("."), data
    if method == "POST" and "drain" in path and status == 200:  # undo, so instances stay usable
        asyncio.run(fleet.admin("DELETE", path))


# --- JSON-RPC inside a live session -------------------------------------------------------------
@pytest.fixture(scope="module")
def live_session(fleet: Fleet) -> str:
    async def open_session() -> str:
        init = {
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "fuzz"}},
        }  # fmt: skip
        hdrs = [(b"Content-Type", b"application/json"), (b"Accept", b"application/json, text/event-stream")]
        status, headers, _ = await _exchange(
            _port(fleet), _request("POST", "/mcp", hdrs, json.dumps(init).encode())
        )
        assert status == 200, status
        sid = headers["mcp-session-id"]
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        hdrs += [(b"Mcp-Session-Id", sid.encode()), (b"MCP-Protocol-Version", b"2025-11-25")]
        await _exchange(_port(fleet), _request("POST", "/mcp", hdrs, note))
        return sid

    return asyncio.run(open_session())


@FUZZ
@given(body=jsonrpc_bodies())
def test_fuzz_jsonrpc_inside_a_live_session(fleet: Fleet, live_session: str, body: bytes) -> None:
    hdrs = [
        (b"Content-Type", b"application/json"),
        (b"Accept", b"application/json, text/event-stream"),
        (b"Mcp-Session-Id", live_session.encode()),
        (b"MCP-Protocol-Version", b"2025-11-25"),
    ]
    status, headers, answer = asyncio.run(_exchange(_port(fleet), _request("POST", "/mcp", hdrs, body)))
    _check_mcp_answer(status, headers, answer)
