"""A plain 2026-07-28 `tools/call` served by the SDK's own handler, without its per-request scaffolding.

For one `tools/call` the SDK's Streamable HTTP entry (mcp/server/_streamable_http_modern.py)
validates the request, then runs the handler as a sibling task in an anyio task group, with a
second task watching for the client going away and a zero-buffer stream for notifications; the
kernel (`serve_one`) builds a runner, composes the middleware chain and closes the connection's
exit stack under a shielded timeout; and the answer is built as a response model, dumped and
encoded. Measured in-process (tests/bench/bench_sdk_call.py) that scaffolding was about half of
the SDK's share of a chat call.

`DirectCalls` serves the common case itself, with the SDK's own pieces for everything that
decides an answer: the request's checks (`JSONRPCRequest`, the routing headers, the envelope
ladder, the version's request schema, the handler's params model), the context the tool gets
(the runner's `_make_context`), the handler (`MCPServer._handle_call_tool`, so tool errors,
their logging and the result's conversion are the SDK's), the result's wire form (the runner's
`_serialize`: sieve, `resultType`, the `serverInfo` stamp) and the guard's checks and error
wording (instance/tools/guard.py). What it does itself is the scaffolding, to the same effect:
the handler runs in the request's task; a client that goes away cancels it and gets nothing
(as the SDK's watcher does); a notification, or `_SSE_PING_INTERVAL` seconds of silence,
commits the answer to `text/event-stream` with the SDK's frames and pings; otherwise the answer
is the same `application/json` body the SDK writes.

Only a request the SDK would answer with a plain result takes this path: anything else (not a
2026-07-28 `tools/call`, a body or header the SDK would refuse, any other `_meta` than the
envelope's and a progress token, an `Mcp-Param-*` header, a tool the guard refuses or that does not
exist) goes to the SDK with its body replayed, and so does
every request while tracing is on or if the middleware chain is not the one this was built for.
tests/instance/test_fastcall.py sends the same requests both ways and compares the answers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp_types import ErrorData, JSONRPCError, JSONRPCRequest, JSONRPCResponse
from mcp_types import methods as _methods
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from common import jsonbytes
from instance.request_body import ReadAhead
from instance.tools.guard import ArgumentGuard

log = logging.getLogger(__name__)

try:  # private parts of the SDK (mcp>=2.3,<3): if a release moves one, every call goes to the SDK
    from mcp.server import runner as _runner
    from mcp.server._streamable_http_modern import (
        _SSE_HEADERS,
        _SingleExchangeDispatchContext,
        _sse_event,
        _write,
    )
    from mcp.server._streamable_http_modern import _SSE_PING_INTERVAL as PING_INTERVAL
    from mcp.server.connection import Connection
    from mcp.server.request_state import RequestStateBoundary
    from mcp.server.streamable_http import check_accept_headers
    from mcp.shared.exceptions import MCPError
    from mcp.shared.inbound import (
        InboundModernRoute,
        classify_inbound_request,
        find_duplicated_routing_header,
    )
    from mcp.shared.jsonrpc_dispatcher import progress_token_from_params
    from mcp.shared.message import ServerMessageMetadata
    from mcp.shared.transport_context import TransportContext

    AVAILABLE = all(hasattr(_runner, n) for n in ("ServerRunner", "_extract_meta", "aclose_shielded"))
except ImportError:  # pragma: no cover
    AVAILABLE = False

METHOD = "tools/call"
_MODERN = frozenset(v.encode() for v in MODERN_PROTOCOL_VERSIONS)
_ENVELOPE_META = frozenset(
    {
        "io.modelcontextprotocol/protocolVersion",
        "io.modelcontextprotocol/clientInfo",
        "io.modelcontextprotocol/clientCapabilities",
        "progressToken",
    }
)
"""The `_meta` keys a request may carry and still take this path: the envelope's, which the
SDK reads into the connection, and a progress token (whose notifications commit the answer
to an event stream here as there); anything else (a log level, say) is the SDK's."""
_PARAMS = frozenset({"name", "arguments", "_meta"})
_ROUTING = frozenset({b"mcp-protocol-version", b"mcp-method", b"mcp-name"})


class DirectCalls:
    """Serves a plain 2026-07-28 `tools/call` with the SDK's handler in the request's task."""

    def __init__(
        self,
        mcp: MCPServer[Any],
        mcp_handler: ASGIApp,
        middleware: Callable[[], bool],
        boundary: Any,
        guard: ArgumentGuard,
        lifespan_state: Callable[[], Any],
        max_body: int,
    ) -> None:
        self._mcp = mcp
        self._server = mcp._lowlevel_server
        self._mcp_handler = mcp_handler
        self._middleware_ok = middleware
        self._boundary = boundary
        self._guard = guard
        self._lifespan_state = lifespan_state
        self.max_body = max_body
        self.served = 0
        """Calls answered here (the rest went to the SDK)."""

    @staticmethod
    def boundary_ok(middleware: Any) -> bool:
        """Whether `middleware` is the SDK's requestState boundary, whose part in a call without
        `requestState` this path plays (sealing an `input_required` result's state)."""
        if not AVAILABLE:
            return False
        return isinstance(middleware, RequestStateBoundary) and hasattr(middleware, "_seal_result")

    @staticmethod
    def wanted(scope: Mapping[str, Any]) -> bool:
        """Whether a request says (by its routing headers) it is a 2026-07-28 `tools/call` and
        carries nothing that only the SDK handles (`Mcp-Param-*`, a repeated routing header)."""
        method = version = None
        seen = 0
        for name, value in scope["headers"]:
            if name in _ROUTING:
                seen += 1
                if name == b"mcp-method":
                    method = value
                elif name == b"mcp-protocol-version":
                    version = value
            elif name.startswith(b"mcp-param-"):
                return False
        return method == b"tools/call" and version in _MODERN and seen == 3

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ahead = await ReadAhead.read(receive, self.max_body)  # a larger body: the SDK's 413
        # (no lifespan state: the session manager is not running, and the SDK says so)
        if ahead.whole and AVAILABLE and self._middleware_ok() and self._lifespan_state() is not None:
            body = ahead.body
            try:
                call = await self._plain_call(scope, body)
            except Exception:  # a fault here must not cost the call: the SDK answers it
                log.exception("the direct tools/call path failed to read a request; the SDK answers it")
                call = None
            if call is not None:
                self.served += 1
                await _Exchange(self, scope, receive, send, body, *call).run()
                return

        await self._mcp_handler(scope, ahead.replay, send)

    async def _plain_call(self, scope: Scope, body: bytes) -> tuple[Any, ...] | None:
        """The request, its envelope and the handler's params if the SDK would run the handler
        on them and the guard lets the call through; None sends the request to the SDK."""
        headers = first_values(scope)  # (ASGI gives the names in lowercase)
        content_type = headers.get("content-type")
        if content_type is None or not content_type.lower().startswith("application/json"):
            return None
        has_json, has_sse = check_accept_headers(_HeadersOnly(headers))  # type: ignore[arg-type]
        if not (has_json and has_sse):
            return None
        if scope.get("headers") and len(body) != _content_length(scope, len(body)):
            return None
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(decoded, dict) or "id" not in decoded:
            return None
        try:
            req = JSONRPCRequest.model_validate(decoded)
        except ValidationError:
            return None
        if req.method != METHOD:
            return None
        raw = ((n.decode("latin-1"), "") for n, _ in scope["headers"] if n in _ROUTING)
        if find_duplicated_routing_header(raw) is not None:
            return None
        verdict = classify_inbound_request(decoded, headers=headers)
        if not isinstance(verdict, InboundModernRoute):
            return None
        params = req.params
        if not isinstance(params, dict):
            return None
        if not params.keys() <= _PARAMS:  # requestState, inputResponses, a task: the SDK's
            return None
        meta = params.get("_meta")
        if not isinstance(meta, dict) or not meta.keys() <= _ENVELOPE_META:
            return None
        name = params.get("name")
        if not isinstance(name, str) or self._mcp._tool_manager.get_tool(name) is None:
            return None
        entry = self._server.get_request_handler(METHOD)
        if entry is None:
            return None
        try:
            _methods.validate_client_request(METHOD, verdict.protocol_version, params)
            typed = entry.params_type.model_validate(params, by_name=False)
        except (ValidationError, KeyError):
            return None
        if not self._guard.loaded:
            await self._guard.load()
        if self._guard.refusal(name, params.get("arguments")) is not None:
            return None
        return req, verdict, entry, typed


def first_values(scope: Scope) -> dict[str, str]:
    """A request's headers as a plain dict: the first value of each name, decoded as Starlette
    decodes them (its `Headers` answers a lookup so, scanning the raw list every time)."""
    plain: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in plain:
            plain[key] = value.decode("latin-1")
    return plain


class _HeadersOnly:
    """What `check_accept_headers` reads of a request: its headers."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


def _content_length(scope: Scope, default: int) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return default


class _Exchange:
    """One call served: the handler in this task, the answer as the SDK's entry writes it."""

    def __init__(
        self,
        calls: DirectCalls,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
        req: Any,
        verdict: Any,
        entry: Any,
        typed: Any,
    ) -> None:
        self.calls = calls
        self.scope = scope
        self.receive = receive
        self.asgi_send = send
        self.body = body
        self.req = req
        self.verdict = verdict
        self.entry = entry
        self.typed = typed
        self.lock = asyncio.Lock()
        self.committed = False  # answering as text/event-stream
        self.finished = False
        self.disconnected = False
        self.timer: asyncio.TimerHandle | None = None
        self.pinging: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        req, verdict = self.req, self.verdict
        request = Request(self.scope, self.receive)
        request._body = self.body  # what the SDK's entry leaves on it, having read the body
        connection = Connection.from_envelope(
            verdict.protocol_version, verdict.client_info, verdict.client_capabilities
        )
        dctx = _SingleExchangeDispatchContext(
            transport=TransportContext(
                kind="streamable-http", can_send_request=False, headers=request.headers
            ),
            request_id=req.id,
            message_metadata=ServerMessageMetadata(request_context=request),
            progress_token=progress_token_from_params(req.params),
        )
        dctx.sink = _Sink(self)  # type: ignore[assignment]  # a notification commits SSE
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(PING_INTERVAL, self._ping_soon)
        watcher = asyncio.ensure_future(self._watch(task))
        message: JSONRPCResponse | JSONRPCError | dict[str, Any]
        try:
            try:
                message = await self._handle(connection, dctx)
            finally:
                self.finished = True
                self.timer.cancel()
                watcher.cancel()
                if _has_exit_callbacks(connection):
                    await _runner.aclose_shielded(connection)
        except asyncio.CancelledError:
            if self.disconnected and task.uncancel() == 0:
                return  # the client went away: nothing to answer, as with the SDK
            raise
        if self.disconnected:  # the handler outlived its cancellation; the client is gone all the same
            task.uncancel()
            return
        async with self.lock:  # a ping being written finishes first
            for pinging in self.pinging:
                pinging.cancel()
            if self.committed:
                if isinstance(message, dict):
                    message = JSONRPCResponse(jsonrpc="2.0", id=req.id, result=message)
                await self.asgi_send(
                    {"type": "http.response.body", "body": _sse_event(message), "more_body": False}
                )
            elif isinstance(message, dict):
                await self._write_result(message)
            else:
                await _write(message, self.scope, self.receive, self.asgi_send)

    async def _handle(self, connection: Any, dctx: Any) -> dict[str, Any] | JSONRPCError:
        """`serve_one` and `_to_jsonrpc_response` for one tools/call, less the middleware
        composition: the chain here is the SDK's requestState boundary (which, for a call
        without state, only seals an `input_required` result's), the tools/list cache (which
        passes a call on) and the guard, whose checks passed already; their parts in the
        answer are applied below, innermost first."""
        params = self.req.params
        runner = _runner.ServerRunner(self.calls._server, connection, self.calls._lifespan_state())
        meta = _runner._extract_meta(params)
        try:
            ctx = runner._make_context(dctx, METHOD, params, meta, connection.protocol_version)
            result = await self.entry.handler(ctx, self.typed)
            if isinstance(result, ErrorData):
                raise MCPError.from_error_data(result)
            wire = runner._serialize(METHOD, connection.protocol_version, result)
            wire = ArgumentGuard.shape(wire, params["name"])
            wire = self.calls._boundary._seal_result(ctx, wire, None)
            return dict(wire)
        except Exception as exc:
            return JSONRPCError(jsonrpc="2.0", id=self.req.id, error=_runner.modern_error_data(exc))

    async def _write_result(self, result: dict[str, Any]) -> None:
        """The SDK's `_write` of a `JSONRPCResponse` around `result`: a result dict dumps as
        itself (already the wire form), so it is encoded directly."""
        try:
            encoded = jsonbytes.dumps({"jsonrpc": "2.0", "id": self.req.id, "result": result})
        except (TypeError, ValueError):  # not plain JSON: the SDK's own dump decides
            await _write(
                JSONRPCResponse(jsonrpc="2.0", id=self.req.id, result=result),
                self.scope,
                self.receive,
                self.asgi_send,
            )
            return
        await self.asgi_send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-length", str(len(encoded)).encode()),
                    (b"content-type", b"application/json"),
                ],
            }
        )
        await self.asgi_send({"type": "http.response.body", "body": encoded})

    async def _watch(self, task: asyncio.Task[Any]) -> None:
        """The SDK's disconnect watcher: a client that goes away cancels the handler."""
        try:
            while (await self.receive()).get("type") != "http.disconnect":
                pass  # pragma: no cover
        except Exception:  # a server that cannot tell: as if the client stayed
            log.debug("the disconnect watcher's receive failed", exc_info=True)
            return
        if not self.finished:
            self.disconnected = True
            task.cancel()

    async def send_event(self, event: bytes | None) -> None:
        async with self.lock:
            if self.finished:
                return
            if not self.committed:
                self.committed = True
                await self.asgi_send(
                    {"type": "http.response.start", "status": 200, "headers": list(_SSE_HEADERS)}
                )
            await self.asgi_send(
                {"type": "http.response.body", "body": event or b": ping\r\n\r\n", "more_body": True}
            )
            if self.timer is not None:
                self.timer.cancel()
            self.timer = asyncio.get_running_loop().call_later(PING_INTERVAL, self._ping_soon)

    def _ping_soon(self) -> None:
        if self.finished:
            return
        task = asyncio.ensure_future(self.send_event(None))
        self.pinging.add(task)
        task.add_done_callback(self.pinging.discard)


class _Sink:
    """Where the SDK's dispatch context sends a notification's SSE frame (its `sink`)."""

    def __init__(self, exchange: _Exchange) -> None:
        self._exchange = exchange

    async def send(self, event: bytes) -> None:
        await self._exchange.send_event(event)


def _has_exit_callbacks(connection: Any) -> bool:
    """Whether the connection's exit stack holds anything to unwind (if it cannot be told, yes)."""
    return bool(getattr(connection.exit_stack, "_exit_callbacks", True))
