"""A 2026-07-28 `tools/call` served directly (instance/fastcall.py) answers what the SDK answers.

In-process: one instance app built by `build_app` (no Redis, no Postgres) with an extra `probe`
tool registered through the fleet's wrapper, driven with the same hand-made requests with its
direct path on and off (the gate's `calls`). The answers must be the same: status, content type
and body bytes (the JSON answer, or the SSE frames), for good calls, tool errors of every kind,
refusals (which the direct path leaves to the SDK), calls with a progress token (whose
notification turns the answer into an event stream) and calls it must not take (other `_meta`,
handshake era); a client that goes away cancels the tool either way; a call that
outlasts the SSE ping interval is answered as an event stream either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mcp.server import _streamable_http_modern as modern
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

from common import protocol as p
from common.errors import InvalidArgument
from common.settings import load_settings
from instance import fastcall
from instance.app import build_app
from instance.fastcall import DirectCalls
from instance.runtime import Identity
from instance.timing import chat_stages
from instance.tools import exai_tool
from tests.asgi import call_asgi

TOKEN = "fastcall-test-token"
MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
META_V = "io.modelcontextprotocol/protocolVersion"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


class Probe:
    """What the probe tool does, and what it saw."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = 0
        self.calls = 0


class App:
    def __init__(self, direct_calls: bool = True) -> None:
        settings = load_settings(
            internal_token=TOKEN,
            database_url=None,
            redis_url=None,
            log_level="WARNING",
            direct_calls=direct_calls,
        )
        self.gate, self.runtime = build_app(settings, Identity(id="fastcall-test", host="127.0.0.1", port=1))
        self.manager = self.gate.mcp_handler.__self__
        self.mcp = self.manager.app.get_request_handler("tools/call").handler.__self__
        self.calls = self.gate.calls
        assert isinstance(self.calls, DirectCalls) or not direct_calls
        self.probe = Probe()
        probe = self.probe

        @exai_tool(self.mcp, self.runtime, description="test probe")
        async def probe_tool(ctx: Context, mode: str, n: int = 0, text: str | None = None) -> dict[str, Any]:
            probe.calls += 1
            probe.started.set()
            if mode == "ok":
                return {"mode": mode, "n": n, "text": text, "nested": {"none": None, "list": [1, "é", None]}}
            if mode == "exai":
                raise InvalidArgument("n must be odd", hint="Pass an odd n.")
            if mode == "tool_error":
                raise ToolError("plain tool error")
            if mode == "crash":
                raise RuntimeError("boom")
            if mode == "mcp_error":
                raise MCPError(code=-32042, message="custom protocol error", data={"n": n})
            if mode == "log":
                await ctx.info("a log line")
                return {"mode": mode}
            if mode == "progress":
                await ctx.report_progress(1, 2, "half")
                return {"mode": mode}
            if mode == "sleep":
                try:
                    await asyncio.sleep(n / 1000)
                except asyncio.CancelledError:
                    probe.cancelled += 1
                    raise
                return {"mode": mode, "n": n}
            if mode == "stubborn":  # swallows its cancellation and answers anyway
                try:
                    await asyncio.sleep(n / 1000)
                except asyncio.CancelledError:
                    probe.cancelled += 1
                return {"mode": mode, "n": n}
            return {"mode": "other"}

    def headers(self, era: str = "stateless", name: str = "probe", **extra: str) -> list[tuple[bytes, bytes]]:
        base = {
            "host": "127.0.0.1:1",
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            p.INTERNAL_TOKEN_HEADER.lower(): TOKEN,
            p.SESSION_HEADER.lower(): "fastcall-session",
            p.ERA_HEADER.lower(): era,
        }
        if era == "stateless":
            base.update({"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": name})
        base.update({k.lower().replace("_", "-"): v for k, v in extra.items()})
        return [(k.encode(), v.encode()) for k, v in base.items()]

    async def both(self, headers: list[tuple[bytes, bytes]], body: Any) -> tuple[Any, Any, int]:
        """The answer with the direct path on, with it off, and whether the direct path took it."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        served = self.calls.served
        direct = await call_asgi(self.gate, headers, data)
        took = self.calls.served - served
        self.gate.calls = None
        try:
            sdk = await call_asgi(self.gate, headers, data)
        finally:
            self.gate.calls = self.calls
        return direct, sdk, took


def call(
    arguments: Any, name: str = "probe", rid: Any = 1, meta: Any = META, **params: Any
) -> dict[str, Any]:
    body_params: dict[str, Any] = {"name": name, **params}
    if arguments is not ...:
        body_params["arguments"] = arguments
    if meta is not ...:
        body_params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": body_params}


def same(direct: Any, sdk: Any) -> bool:
    """The direct path's answer is the SDK's: the same status and headers, and for JSON the same
    document (the direct path writes non-ASCII characters as UTF-8, common/jsonbytes.py, where
    the SDK's `json.dumps` escapes them; each length is its own body's)."""
    (status, headers, body), (sdk_status, sdk_headers, sdk_body) = direct, sdk
    if status != sdk_status or {**headers, "content-length": ""} != {**sdk_headers, "content-length": ""}:
        return False
    if "content-length" in headers and int(headers["content-length"]) != len(body):
        return False
    if headers.get("content-type") == "application/json":
        return bool(json.loads(body) == json.loads(sdk_body))
    return bool(body == sdk_body)


@contextlib.asynccontextmanager
async def running() -> AsyncIterator[App]:
    app = App()
    async with app.manager.run():
        app.runtime.set_state("ready")
        yield app


TAKEN = [
    ("ok", call({"mode": "ok", "n": 3, "text": "héllo"})),
    ("ok, string id", call({"mode": "ok"}, rid="req-é")),
    ("ok, large id", call({"mode": "ok"}, rid=123456789012345)),
    (
        "ok, no clientInfo",
        call({"mode": "ok"}, meta={k: v for k, v in META.items() if "clientInfo" not in k}),
    ),
    ("fleet error", call({"mode": "exai"})),
    ("tool error", call({"mode": "tool_error"})),
    ("crash", call({"mode": "crash"})),
    ("protocol error", call({"mode": "mcp_error", "n": 4})),
    ("log without opt-in", call({"mode": "log"})),
    ("progress without token", call({"mode": "progress"})),
    ("version tool", call({}, name="version")),
    ("version tool, no arguments", call(..., name="version")),
    ("chat without storage", call({"prompt": "hi"}, name="chat")),
]


@pytest.mark.parametrize(("what", "body"), TAKEN, ids=[t[0] for t in TAKEN])
async def test_plain_calls_are_answered_as_the_sdk_answers(what: str, body: dict[str, Any]) -> None:
    async with running() as app:
        name = body["params"]["name"]
        direct, sdk, took = await app.both(app.headers(name=name), body)
        assert took == 1, what
        assert same(direct, sdk), what
        assert direct[0] == 200
        assert direct[1]["content-type"] == "application/json"
        assert int(direct[1]["content-length"]) == len(direct[2])
        assert json.loads(direct[2])["id"] == body["id"]


LEFT_TO_THE_SDK: list[tuple[str, Any, dict[str, str]]] = [
    ("unknown tool", call({}, name="nope"), {}),
    ("unknown argument", call({"mode": "ok", "bogus": 1}), {}),
    ("wrong type", call({"mode": "ok", "n": "x"}), {}),
    ("number as a string", call({"mode": "ok", "n": "5"}), {}),
    ("missing argument", call({"n": 1}), {}),
    ("arguments not an object", call([1, 2]), {}),
    ("name not a string", call({}, name=7), {"mcp_name": "7"}),
    ("other _meta", call({"mode": "ok"}, meta={**META, "io.modelcontextprotocol/logLevel": "debug"}), {}),
    ("requestState", call({"mode": "ok"}, requestState="garbage"), {}),
    ("extra param", call({"mode": "ok"}, task={"ttl": 5}), {}),
    ("no _meta", call({"mode": "ok"}, meta=...), {}),
    ("_meta not an object", call({"mode": "ok"}, meta="x"), {}),
    ("unsupported version", call({"mode": "ok"}, meta={**META, META_V: "2099-01-01"}), {}),
    ("name header differs", call({"mode": "ok"}), {"mcp_name": "version"}),
    ("method header differs", call({"mode": "ok"}), {"mcp_method": "tools/list"}),
    ("json only", call({"mode": "ok"}), {"accept": "application/json"}),
    ("sse only", call({"mode": "ok"}), {"accept": "text/event-stream"}),
    ("wildcard accept", call({"mode": "ok"}), {"accept": "*/*"}),
    ("not json", call({"mode": "ok"}), {"content_type": "text/plain"}),
    ("json with charset", call({"mode": "ok"}), {"content_type": "application/json; charset=utf-8"}),
    ("Mcp-Param header", call({"mode": "ok"}), {"mcp_param_mode": "ok"}),
    ("bool id", call({"mode": "ok"}, rid=True), {}),
    ("null id", call({"mode": "ok"}, rid=None), {}),
    ("float id", call({"mode": "ok"}, rid=1.5), {}),
    ("bad jsonrpc", {**call({"mode": "ok"}), "jsonrpc": "1.0"}, {}),
    ("notification", {k: v for k, v in call({"mode": "ok"}).items() if k != "id"}, {}),
    ("batch", [call({"mode": "ok"})], {}),
    ("parse error", b'{"jsonrpc": "2.0", "id": 1,', {}),
]


@pytest.mark.parametrize(("what", "body", "extra"), LEFT_TO_THE_SDK, ids=[t[0] for t in LEFT_TO_THE_SDK])
async def test_anything_else_is_the_sdks_to_answer(what: str, body: Any, extra: dict[str, str]) -> None:
    async with running() as app:
        name = body["params"]["name"] if isinstance(body, dict) else "probe"
        direct, sdk, took = await app.both(app.headers(name=str(name), **extra), body)
        assert same(direct, sdk), what
        if what not in ("json with charset", "wildcard accept"):
            assert took == 0, what
        else:  # headers the SDK accepts as they are: the direct path takes the call
            assert took == 1, what


async def test_a_repeated_routing_header_is_the_sdks() -> None:
    async with running() as app:
        headers = [*app.headers(), (b"mcp-name", b"probe")]
        direct, sdk, took = await app.both(headers, call({"mode": "ok"}))
        assert (direct, took) == (sdk, 0)
        assert direct[0] == 400


async def test_the_handshake_era_is_the_sdks() -> None:
    async with running() as app:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t"}},
        }
        hs = app.headers("handshake", mcp_protocol_version=HANDSHAKE)
        status, headers, _ = await call_asgi(app.gate, hs, json.dumps(init).encode())
        assert status == 200
        hs = app.headers(
            "handshake", mcp_protocol_version=HANDSHAKE, mcp_session_id=headers["mcp-session-id"]
        )
        await call_asgi(
            app.gate, hs, json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode()
        )
        served = app.calls.served
        status, _, answer = await call_asgi(app.gate, hs, json.dumps(call({"mode": "ok"}, meta=...)).encode())
        assert status == 200 and b'"mode":"ok"' in answer.replace(b'\\"', b'"').replace(b" ", b"")
        assert app.calls.served == served


async def _disconnecting(app: App, body: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """A call whose client goes away once the tool has started: what was sent, and the probe's
    cancellations."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": p.MCP_PATH,
        "raw_path": p.MCP_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": app.headers(),
        "client": ("127.0.0.1", 5555),
        "server": ("127.0.0.1", 1),
        "state": {},
    }
    data = json.dumps(body).encode()
    scope["headers"] = [*scope["headers"], (b"content-length", str(len(data)).encode())]
    delivered = False
    sent: list[dict[str, Any]] = []
    app.probe.started = asyncio.Event()
    before = app.probe.cancelled

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": data, "more_body": False}
        await app.probe.started.wait()
        await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app.gate(scope, receive, send), 5)
    return sent, app.probe.cancelled - before


@pytest.mark.parametrize("mode", ["sleep", "stubborn"])
async def test_a_client_that_goes_away_cancels_the_tool_either_way(mode: str) -> None:
    async with running() as app:
        body = call({"mode": mode, "n": 3000})
        served = app.calls.served
        sent, cancelled = await _disconnecting(app, body)
        assert (sent, cancelled) == ([], 1)
        assert app.calls.served == served + 1
        app.gate.calls = None
        sent, cancelled = await _disconnecting(app, body)
        assert (sent, cancelled) == ([], 1)
        app.gate.calls = app.calls
        # The instance goes on serving.
        direct, sdk, took = await app.both(app.headers(), call({"mode": "ok"}))
        assert same(direct, sdk) and took == 1


def _frames(body: bytes) -> list[bytes]:
    return [frame for frame in body.split(b"\r\n\r\n") if frame]


async def test_a_long_call_becomes_an_event_stream_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(modern, "_SSE_PING_INTERVAL", 0.05)
    monkeypatch.setattr(fastcall, "PING_INTERVAL", 0.05)
    async with running() as app:
        direct, sdk, took = await app.both(app.headers(), call({"mode": "sleep", "n": 180}))
        assert took == 1
        for status, headers, body in (direct, sdk):
            assert status == 200
            assert headers["content-type"] == "text/event-stream"
            assert _frames(body)[0] == b": ping"
        assert direct[1] == sdk[1]
        assert _frames(direct[2])[-1] == _frames(sdk[2])[-1]
        assert _frames(direct[2])[-1].startswith(b"event: message\r\ndata: ")
        assert abs(len(_frames(direct[2])) - len(_frames(sdk[2]))) <= 1  # pings, as timing allows


async def test_chat_stages_are_recorded_on_the_direct_path() -> None:
    async with running() as app:
        before = {name: chat_stages.stages[name].count for name in ("sdk_in", "sdk_out", "request")}
        direct, sdk, took = await app.both(app.headers(name="chat"), call({"prompt": "hi"}, name="chat"))
        assert took == 1 and same(direct, sdk)
        for name, count in before.items():
            assert chat_stages.stages[name].count == count + 2, name


async def test_the_direct_path_steps_aside_for_other_middleware() -> None:
    async with running() as app:

        async def extra(ctx: Any, call_next: Any) -> Any:
            return await call_next(ctx)

        app.mcp.middleware.append(extra)
        direct, sdk, took = await app.both(app.headers(), call({"mode": "ok"}))
        assert (direct, took) == (sdk, 0)


def test_the_setting_turns_the_direct_path_off() -> None:
    assert App(direct_calls=False).gate.calls is None


async def test_metrics_count_the_direct_calls() -> None:
    async with running() as app:
        await app.both(app.headers(), call({"mode": "ok"}))
        status, _, body = await call_asgi(app.gate, app.headers(), b"", "GET", p.INTERNAL_METRICS)
        assert status == 200
        assert "exai_instance_tools_call_direct_total 1\n" in body.decode()


PROGRESS = [
    ("a notification", {"mode": "progress"}, "t1", True),
    ("no notification", {"mode": "ok"}, 5, True),
    ("a bool token", {"mode": "progress"}, True, None),
    ("a float token", {"mode": "progress"}, 1.5, None),
]


@pytest.mark.parametrize(("what", "arguments", "token", "taken"), PROGRESS, ids=[t[0] for t in PROGRESS])
async def test_calls_with_a_progress_token_are_answered_as_the_sdk_answers(
    what: str, arguments: dict[str, Any], token: Any, taken: bool | None
) -> None:
    async with running() as app:
        direct, sdk, took = await app.both(
            app.headers(), call(arguments, meta={**META, "progressToken": token})
        )
        assert same(direct, sdk), what
        if taken is not None:
            assert took == 1
        if what == "a notification":
            assert direct[1]["content-type"] == "text/event-stream"
            frames = _frames(direct[2])
            assert len(frames) == 2 and b'"notifications/progress"' in frames[0], frames
        elif what == "no notification":
            assert direct[1]["content-type"] == "application/json"
