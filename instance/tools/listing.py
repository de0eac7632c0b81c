"""`tools/list` answered from a cache: the SDK builds the answer once per protocol version.

The SDK builds a `tools/list` answer from scratch on every call: a model per tool, the list
dumped, validated against the version's result schema and dumped again (the sieve), then
stamped. For this server's ~30 tools that is an ~84 KB answer and ~5 ms of CPU on the event
loop, every time, for an answer that only changes if the tool set does.

`ToolListCache` sits in the server's middleware chain (where the SDK lets a middleware answer
a request itself, envelope included): the first `tools/list` of a protocol version goes
through the SDK as before and its wire form (what the SDK's own pipeline returned: sieved,
`resultType` and the `serverInfo` stamp in place) is kept; a repeat gets a copy of it.

What the SDK checks before it calls its handler still runs on a repeat, so refusals are the
SDK's own, as before: the request's params against the version's request schema and the
handler's params model, and the handshake gate (no listing before `initialize`). Only a plain
listing is served from the cache: params holding anything but `_meta` (a `cursor`, say) go
to the SDK every time. The kept answer is tied to the tool set it listed (the registered
`Tool` objects, by identity): adding, removing or replacing a tool rebuilds it (changing a
registered `Tool` object in place would not; nothing here does).

`ListAnswers` goes one step further for the 2026-07-28 era, whose requests stand alone: the
instance's gate (instance/app.py) keeps the answer's bytes, per request less its JSON-RPC id,
and answers a repeat without asking the SDK at all. With tracing on (the SDK's span
middleware in the chain) it is not used: every request gets its span.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp_types import methods as _methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import Message

METHOD = "tools/list"
ToolSet = tuple[Any, ...]
_HANDSHAKE = frozenset(HANDSHAKE_PROTOCOL_VERSIONS)


class ToolListCache:
    """The wire form of `tools/list` per protocol version, for as long as the tool set stands."""

    def __init__(self, mcp: MCPServer[Any]) -> None:
        self._mcp = mcp
        self._answers: dict[str, tuple[ToolSet, dict[str, Any]]] = {}
        self.hits = 0
        self.misses = 0

    def tool_set(self) -> ToolSet:
        """What a kept answer depends on: the registered tools, in order (compared by identity;
        a kept answer holds them, so no other object can take one's identity meanwhile)."""
        manager = getattr(self._mcp, "_tool_manager", None)
        if manager is None:  # pragma: no cover - an SDK without it: never serve from the cache
            return ()
        return tuple(manager.list_tools())

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = ctx.params
        if ctx.method != METHOD:
            return await call_next(ctx)
        if params is not None and (not isinstance(params, Mapping) or any(k != "_meta" for k in params)):
            return await call_next(ctx)
        version = ctx.protocol_version
        tools = self.tool_set()
        kept = self._answers.get(version)
        if kept is None or not same_tools(kept[0], tools) or not tools or not _accepted(ctx):
            self.misses += 1
            result = await call_next(ctx)
            if tools and isinstance(result, dict) and not result.get("isError") and _accepted(ctx):
                self._answers[version] = (tools, _copy(result))
            return result
        # What `ServerRunner._on_request` checks before calling the handler, in its order: the
        # version's request schema, then the handler's params model (both raise as they did).
        _methods.validate_client_request(METHOD, version, params)
        entry = self._mcp._lowlevel_server.get_request_handler(METHOD)
        if entry is None:  # pragma: no cover - the handler was removed: the SDK answers
            return await call_next(ctx)
        entry.params_type.model_validate({} if params is None else params, by_name=False)
        self.hits += 1
        return _copy(kept[1])


def same_tools(a: ToolSet, b: ToolSet) -> bool:
    """The same tools, the same objects, in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _accepted(ctx: ServerRequestContext[Any, Any]) -> bool:
    """Whether the connection is past the handshake gate (always, in the 2026-07-28 era); when
    this cannot be told, False: the SDK answers, and decides."""
    connection = getattr(ctx.session, "_connection", None)
    return bool(getattr(connection, "initialize_accepted", False))


def _copy(result: dict[str, Any]) -> dict[str, Any]:
    """A copy the pipeline may own: the top level and its `_meta` (the SDK stamps a fresh
    `_meta` per answer); the tool entries are shared, and nothing downstream writes to them."""
    out = dict(result)
    meta = out.get("_meta")
    if isinstance(meta, dict):
        out["_meta"] = dict(meta)
    return out


_ID_AT = b'{"jsonrpc":"2.0","id":'
_KEY_HEADERS = frozenset(
    {b"accept", b"content-type", b"mcp-protocol-version", b"mcp-method", b"mcp-name", b"host", b"origin"}
)
"""What the SDK reads of a 2026-07-28 request's headers before its handlers run (its era
routing, Content-Type, Accept, the routing headers and their duplicates, Host/Origin when
DNS-rebinding protection is on), all of which a kept answer is keyed by."""

MAX_KEPT = 32
"""Distinct requests kept (in practice one per client library: their envelopes differ)."""


class ListAnswers:
    """2026-07-28 `tools/list` answers kept as the bytes the SDK wrote, per request.

    Behind `ToolListCache` a repeat still costs the SDK's JSON-RPC answer: the result
    validated into a response model, dumped and JSON-encoded, ~2 ms for ~84 KB. This keeps
    the answer itself: the first request goes through the SDK and its answer is recorded; a
    later request that is the same but for its JSON-RPC id (the same body otherwise, the same
    headers the SDK reads, the same tool set) gets the recorded answer with its own id. Only a
    plain 200 JSON answer whose bytes are the SDK's envelope around the request's id is kept;
    anything else (an error, an SSE answer, a body the SDK would refuse) is answered by the
    SDK every time.
    """

    def __init__(self, listing: ToolListCache, max_body: int) -> None:
        self._listing = listing
        self.max_body = min(max_body, 65536)
        """The largest request body looked at (larger ones go to the SDK unread)."""
        self._kept: dict[tuple[Any, ...], tuple[ToolSet, list[tuple[bytes, bytes]], bytes]] = {}
        self.hits = 0

    @staticmethod
    def wanted(scope: Mapping[str, Any]) -> bool:
        """Whether a request says (by its routing header) it is a 2026-07-28 `tools/list`."""
        method = version = None
        for name, value in scope["headers"]:  # the first of each, as the SDK's era routing reads it
            if name == b"mcp-method" and method is None:
                method = value
            elif name == b"mcp-protocol-version" and version is None:
                version = value
        return method == b"tools/list" and version is not None and version.decode("latin-1") not in _HANDSHAKE

    def key(self, scope: Mapping[str, Any], body: bytes) -> tuple[tuple[Any, ...], Any] | None:
        """The request's key and its id, or None if its answer is not to be kept."""
        if len(body) > self.max_body:
            return None
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(decoded, dict) or decoded.get("method") != METHOD:
            return None
        rid = decoded.get("id")
        if type(rid) is not int and type(rid) is not str:  # a bool, a float: the SDK decides
            return None
        rest = {k: v for k, v in decoded.items() if k != "id"}
        headers = tuple((k, v) for k, v in scope["headers"] if k in _KEY_HEADERS)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length != str(len(body)).encode():
            return None
        return (scope["method"], headers, json.dumps(rest, sort_keys=False, separators=(",", ":"))), rid

    def answer(self, key: tuple[Any, ...], rid: Any) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
        kept = self._kept.get(key)
        if kept is None or not same_tools(kept[0], self._listing.tool_set()):
            return None
        _, headers, rest = kept
        body = _ID_AT + json.dumps(rid).encode() + rest
        self.hits += 1
        return [*headers, (b"content-length", str(len(body)).encode())], body

    def tool_set(self) -> ToolSet:
        return self._listing.tool_set()

    def keep(self, key: tuple[Any, ...], rid: Any, tools: ToolSet, sent: list[Message]) -> None:
        """Record the SDK's answer to `key` if it is a whole 200 JSON answer around `rid`."""
        if len(sent) != 2 or sent[0]["type"] != "http.response.start" or sent[0]["status"] != 200:
            return
        end = sent[1]
        if end["type"] != "http.response.body" or end.get("more_body", False):
            return
        headers = [(k, v) for k, v in sent[0].get("headers", []) if k.lower() != b"content-length"]
        if (b"content-type", b"application/json") not in headers:
            return
        head = _ID_AT + json.dumps(rid).encode()
        body = bytes(end.get("body", b""))
        if not body.startswith(head + b',"result":'):
            return
        if not tools or not same_tools(tools, self._listing.tool_set()):  # it changed meanwhile
            return
        if key not in self._kept and len(self._kept) >= MAX_KEPT:
            self._kept.pop(next(iter(self._kept)))
        self._kept[key] = (tools, headers, body[len(head) :])
