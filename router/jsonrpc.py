"""JSON-RPC bodies the router reads and writes.

The router parses each POSTed message once (it must: the method picks the route, `_meta`
names the client, the id goes into any error it has to report) and answers every failure
with a JSON-RPC error body, so MCP clients surface the router's explanation to the user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from common.errors import BadRequest, ExaiError, ParseError

CLIENT_INFO_META_KEY = "io.modelcontextprotocol/clientInfo"
PROTOCOL_VERSION_META_KEY = "io.modelcontextprotocol/protocolVersion"


@dataclass(frozen=True, slots=True)
class Message:
    """The parts of one JSON-RPC message the router routes on."""

    id: Any
    method: str | None
    params: dict[str, Any] | None

    @property
    def is_request(self) -> bool:
        return self.method is not None and self.id is not None

    @property
    def meta(self) -> dict[str, Any]:
        meta = (self.params or {}).get("_meta")
        return meta if isinstance(meta, dict) else {}

    def client_name(self) -> str | None:
        """clientInfo.name from `_meta` (stateless era) or initialize params (handshake era)."""
        info = self.meta.get(CLIENT_INFO_META_KEY)
        if info is None and self.method == "initialize":
            info = (self.params or {}).get("clientInfo")
        name = info.get("name") if isinstance(info, dict) else None
        return name if isinstance(name, str) and name else None


# json.loads' own scanner (C), called straight: what loads adds around it for a text that
# starts with "{" (type checks, two whitespace regex matches, a wrapper) is a third of its cost
# on a small body.
_scan = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_SPACE = " \t\n\r"


def _loads_object(text: str) -> Any:
    """json.loads(text) for a text that starts with "{": the same value, the same refusals."""
    try:
        data, end = _scan(text, 0)
    except StopIteration:
        raise json.JSONDecodeError("Expecting value", text, 0) from None
    if end != len(text) and text[end:].strip(_JSON_SPACE):
        raise json.JSONDecodeError("Extra data", text, end)
    return data


def parse_message(body: bytes) -> Message:
    """One JSON-RPC request, notification or response object; batches are not part of MCP."""
    try:
        if body[:1] == b"{" and body[1:2] != b"\0":
            # UTF-8 for certain (json.loads would detect it): decoded as json.loads does
            data = _loads_object(body.decode("utf-8", "surrogatepass"))
        else:
            data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ParseError(f"Parse error: the body is not valid JSON ({exc.__class__.__name__}).") from None
    if not isinstance(data, dict) or data.get("jsonrpc") != "2.0":
        raise BadRequest("Invalid request: the body must be one JSON-RPC 2.0 object.")
    method = data.get("method")
    if method is not None and not isinstance(method, str):
        raise BadRequest("Invalid request: 'method' must be a string.")
    if method is None and "result" not in data and "error" not in data:
        raise BadRequest("Invalid request: a JSON-RPC message needs a method, a result or an error.")
    params = data.get("params")
    if params is not None and not isinstance(params, dict):
        raise BadRequest("Invalid request: 'params' must be an object.", request_id=data.get("id"))
    return Message(id=data.get("id"), method=method, params=params)


def error_response(
    exc: ExaiError,
    request_id: Any = None,
    *,
    status: int | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An application/json JSON-RPC error with the error's HTTP status (the SDK client reads both)."""
    return web.Response(
        status=status or exc.http_status,
        body=json.dumps(exc.to_jsonrpc(request_id)).encode(),
        content_type="application/json",
        headers=headers,
    )


def is_jsonrpc_type(content_type: str) -> bool:
    """Whether a response body of this type carries JSON-RPC (JSON or SSE events)."""
    kind = content_type.split(";")[0].strip().lower()
    return kind in ("application/json", "text/event-stream")


_REFUSALS = {
    405: "This method is not allowed for this session",
    406: "Not Acceptable: the client must accept both application/json and text/event-stream",
    415: "Unsupported Media Type: Content-Type must be application/json",
}


def instance_refusal(status: int, reason: str, detail: str) -> BadRequest:
    """An instance's non-JSON 4xx/5xx answer, as an error the client can read."""
    what = _REFUSALS.get(status) or f"The instance refused the request ({status} {reason})".strip()
    detail = " ".join(detail.split())[:300]
    return BadRequest(f"{what}{': ' + detail if detail else ''}")


def sse_error_event(exc: ExaiError, request_id: Any) -> bytes:
    """The same error as one SSE event, for a stream whose headers already went out."""
    data = json.dumps(exc.to_jsonrpc(request_id), separators=(",", ":"))
    return f"event: message\r\ndata: {data}\r\n\r\n".encode()
