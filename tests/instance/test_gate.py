"""The instance's outermost ASGI app: calls go straight to the SDK, the rest through Starlette.

In-process: the gate is driven with hand-made ASGI messages, and `build_app` is called without
running its lifespan (nothing is opened), so these need neither Postgres nor Redis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import pytest
from mcp.server._otel import OpenTelemetryMiddleware
from opentelemetry import trace
from starlette.types import Message, Receive, Scope, Send

import instance.app as instance_app
from common.protocol import INTERNAL_TOKEN_HEADER, MCP_PATH
from common.settings import load_settings
from instance.app import InternalTokenGate, build_app
from instance.runtime import Identity, Runtime
from instance.timing import current_call

TOKEN = "gate-test-token"


class StubRuntime:
    """What the gate reads of the runtime: its state, the session binding and a take-over."""

    state = "ready"
    handover = None

    def observe(self, headers: Mapping[str, str]) -> bool:
        return True


def _scope(method: str, path: str, token: str = TOKEN) -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(INTERNAL_TOKEN_HEADER.lower().encode(), token.encode())],
    }


async def _drive(gate: InternalTokenGate, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await gate(scope, receive, send)
    return sent


def _gate(app: Any, mcp_handler: Any) -> InternalTokenGate:
    return InternalTokenGate(app, mcp_handler, runtime=cast(Runtime, StubRuntime()), token=TOKEN)


async def test_calls_go_to_the_sdk_handler_with_a_clock_and_the_rest_to_starlette() -> None:
    seen: list[tuple[str, str, bool]] = []

    def recorder(who: str) -> Any:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append((who, scope["method"], current_call.get() is not None))
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        return app

    gate = _gate(recorder("starlette"), recorder("sdk"))
    requests = [("POST", MCP_PATH), ("GET", MCP_PATH), ("DELETE", MCP_PATH), ("GET", "/internal/health")]
    for method, path in requests:
        await _drive(gate, _scope(method, path))
    assert seen == [
        ("sdk", "POST", True),
        ("starlette", "GET", False),
        ("starlette", "DELETE", False),
        ("starlette", "GET", False),
    ]
    refused = await _drive(gate, _scope("POST", MCP_PATH, token="wrong"))
    assert refused[0]["status"] == 401 and len(seen) == 4


async def test_a_call_that_fails_before_answering_gets_a_plain_500() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("handler broke")

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="handler broke"):  # uvicorn logs it, as before
        await _gate(failing, failing)(_scope("POST", MCP_PATH), receive, send)
    assert sent[0]["status"] == 500
    assert sent[1]["body"] == b"Internal Server Error"


async def test_a_call_that_fails_after_answering_gets_nothing_more() -> None:
    async def half(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("stream broke")

    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(RuntimeError, match="stream broke"):
        await _gate(half, half)(_scope("POST", MCP_PATH), receive, send)
    assert [m["type"] for m in sent] == ["http.response.start"]


def _otel_in(gate: Any) -> bool:
    server = gate.mcp_handler.__self__.app  # the session manager's low-level MCP server
    return any(isinstance(m, OpenTelemetryMiddleware) for m in server.middleware)


@pytest.mark.parametrize("installed", [False, True])
def test_the_sdk_span_middleware_runs_only_with_a_tracer_provider(
    monkeypatch: pytest.MonkeyPatch, installed: bool
) -> None:
    if installed:
        provider = trace.NoOpTracerProvider()
        monkeypatch.setattr(instance_app.trace, "get_tracer_provider", lambda: provider)
    settings = load_settings(internal_token=TOKEN, database_url=None, redis_url=None)
    gate, _runtime = build_app(settings, Identity(id="gate-test", host="127.0.0.1", port=1))
    assert _otel_in(gate) is installed
