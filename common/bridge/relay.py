"""The relay: each JSON-RPC message from the stdio client becomes a POST to the router, and every
message the router sends back (a JSON body, or the events of an SSE stream) becomes a line.

It is a relay, not an MCP server of its own, so it speaks whatever protocol version the client
and the router agree on. It adds only what HTTP needs and stdio does not have:

- the session: `X-Exai-Session-Key` on every request (one name per bridge process), and in the
  handshake era the router's `Mcp-Session-Id` from the client's `initialize`;
- the per-message headers of the 2026-07-28 era (`MCP-Protocol-Version`, `Mcp-Method`,
  `Mcp-Name`), read from the message itself;
- the bearer token;
- the handshake era's GET stream, which carries server-to-client notifications.

What the client never sees: a router that refuses connections for a while (restarting): a
request that could not connect is sent again until `retry_seconds` have passed; a session the
router no longer knows (ended, expired): the client's own `initialize` is replayed and the
request sent again. Parking and instance failover happen behind the router and need nothing here.

Cancellation follows each era's wire: in the handshake era `notifications/cancelled` is posted
like any notification; in 2026-07-28 it is spelled by closing the request's own POST. Either
way the request's POST is closed, which makes the router cancel the call upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from mcp.shared.inbound import NAME_BEARING_METHODS, encode_header_value
from mcp_types import PROTOCOL_VERSION_META_KEY

from common import protocol as p
from common.errors import BridgeError, ExaiError, RouterConnectionLost, RouterUnreachable

log = logging.getLogger(__name__)

ACCEPT = "application/json, text/event-stream"
# Requests that read and change nothing: re-sent when the connection broke after sending.
REPEATABLE = frozenset(
    {
        "ping", "server/discover", "tools/list", "prompts/list", "prompts/get", "resources/list",
        "resources/templates/list", "resources/read", "completion/complete", "subscriptions/listen",
    }
)  # fmt: skip
MAX_REPEATS = 3
CLOSE_TIMEOUT = 2.0  # the client is leaving: say goodbye to the router, but not for long

Write = Callable[[Any], Awaitable[None]]
Say = Callable[[str], None]


def _id_key(request_id: Any) -> str:
    return json.dumps(request_id)  # "1" and 1 are different ids


def modern_version(message: dict[str, Any]) -> str | None:
    """The protocol version a 2026-07-28-era message carries in `_meta` (None: handshake era)."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    version = meta.get(PROTOCOL_VERSION_META_KEY) if isinstance(meta, dict) else None
    return version if isinstance(version, str) else None


@dataclass
class Event:
    id: str | None
    data: str


async def sse_events(response: httpx.Response) -> AsyncIterator[Event]:
    """The events of a text/event-stream body (comments and keep-alive pings skipped)."""
    data: list[str] = []
    event_id: str | None = None
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield Event(event_id, "\n".join(data))
            data, event_id = [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
    if data:
        yield Event(event_id, "\n".join(data))


@dataclass
class Call:
    """A client request whose answer is still on its way."""

    task: asyncio.Task[None]
    modern: bool


@dataclass
class Relay:
    """One bridge process's link to the router: one session, any number of calls in flight."""

    url: str
    write: Write
    session: str
    token: str | None = None
    retry_seconds: float = 60.0
    say: Say = field(default=lambda text: None)
    http: httpx.AsyncClient = field(
        default_factory=lambda: httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=8),
        )
    )
    # Handshake era: the router's session id, the negotiated version, the client's initialize.
    sid: str | None = None
    version: str | None = None
    init: dict[str, Any] | None = None
    initialized: bool = False
    last_modern: str | None = None  # the newest 2026-07-28-era version the client used
    calls: dict[str, Call] = field(default_factory=dict)
    _reopen_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _listener: asyncio.Task[None] | None = None
    _router_down: bool = False
    _token_refused: bool = False

    # --- messages from the client --------------------------------------------------------------
    async def handle(self, message: Any) -> None:
        """Take one message the client wrote (requests run concurrently, the rest in order)."""
        if isinstance(message, list):  # a JSON-RPC batch (before 2025-06-18)
            for item in message:
                await self.handle(item)
            return
        if not isinstance(message, dict):
            await self.write(BridgeError("A JSON-RPC message must be an object.").to_jsonrpc(None))
            return
        method = message.get("method")
        if isinstance(method, str) and "id" in message:
            if method == "initialize":
                self.init = message
                self.sid = None
                await self._request(message)  # in line: what follows needs its session id
                return
            self._start_call(message)
        elif isinstance(method, str):
            if method == "notifications/cancelled" and self._cancel(message):
                return
            await self._deliver(message)
            if method == "notifications/initialized":
                self.initialized = True
                self._start_listener()
        else:  # the client's answer to a server request
            await self._deliver(message)

    def _start_call(self, message: dict[str, Any]) -> None:
        key = _id_key(message["id"])
        task = asyncio.create_task(self._request(message), name=f"call {key}")
        self.calls[key] = Call(task, modern=modern_version(message) is not None)

        def done(t: asyncio.Task[None]) -> None:
            if (call := self.calls.get(key)) is not None and call.task is t:
                del self.calls[key]

        task.add_done_callback(done)

    def _cancel(self, message: dict[str, Any]) -> bool:
        """Close the cancelled request's POST; True if the notification must not be posted."""
        params = message.get("params")
        request_id = params.get("requestId") if isinstance(params, dict) else None
        call = self.calls.pop(_id_key(request_id), None)
        if call is None:
            return self.last_modern is not None and self.sid is None
        call.task.cancel()
        return call.modern  # 2026-07-28: closing the POST is the cancellation

    async def _request(self, message: dict[str, Any]) -> None:
        request_id = message["id"]
        try:
            await self._post(message, request_id)
        except ExaiError as exc:
            await self.write(exc.to_jsonrpc(request_id))
        except ValueError as exc:  # the router's body was not JSON
            await self.write(
                BridgeError(f"The router sent a malformed message ({exc}).").to_jsonrpc(request_id)
            )

    async def _deliver(self, message: dict[str, Any]) -> None:
        """Post a notification or a response (the router answers 202); failures are only logged."""
        try:
            await self._post(message, None)
        except ExaiError as exc:
            self.say(f"exai-bridge: could not deliver {message.get('method') or 'a response'}: {exc}")

    # --- posting -------------------------------------------------------------------------------
    def _headers(self, message: dict[str, Any] | None) -> dict[str, str]:
        headers = {"Accept": ACCEPT, "Content-Type": "application/json", p.SESSION_KEY_HEADER: self.session}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        version = modern_version(message) if message is not None else None
        if version is not None and message is not None:
            self.last_modern = version
            method = str(message.get("method"))
            headers[p.MCP_PROTOCOL_VERSION] = version
            headers[p.MCP_METHOD] = method
            name_key = NAME_BEARING_METHODS.get(method)
            params = message.get("params") or {}
            if name_key is not None and isinstance(name := params.get(name_key), str):
                headers[p.MCP_NAME] = encode_header_value(name)
            return headers
        if self.sid and not (message is not None and message.get("method") == "initialize"):
            headers[p.MCP_SESSION_ID] = self.sid
            if self.version:
                headers[p.MCP_PROTOCOL_VERSION] = self.version
        return headers

    async def _post(
        self, message: dict[str, Any], request_id: Any, *, relay: bool = True, reopen: bool = True
    ) -> None:
        """POST `message` until it has been delivered once and, for a request, answered.

        `reopen=False` (used while reopening) passes a "session unknown" answer through.
        """
        body = json.dumps(message).encode()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_seconds
        delay = 0.05
        repeats = 0
        reopened = not reopen
        is_request = request_id is not None
        while True:
            headers = self._headers(message)
            sent_sid = headers.get(p.MCP_SESSION_ID)
            try:
                async with self.http.stream("POST", self.url, content=body, headers=headers) as resp:
                    self._connected()
                    if resp.status_code in (401, 403):
                        await self._refused(resp, request_id if is_request else None, relay=relay)
                        return
                    if resp.status_code == 404 and sent_sid and not reopened:
                        # The router no longer knows the session: open it again, then resend.
                        await resp.aread()
                        reopened = True
                        await self._reopen(sent_sid)
                        continue
                    answered = await self._answer(message, resp, request_id, relay=relay)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:  # nothing was sent
                if loop.time() + delay > deadline:
                    raise RouterUnreachable(
                        f"The EXAI router at {self.url} did not accept a connection for "
                        f"{self.retry_seconds:g}s ({exc or exc.__class__.__name__})."
                    ) from None
                self._disconnected(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            except httpx.TransportError as exc:
                answered = False
                log.debug("connection to the router broke: %r", exc)
            if answered or not is_request:
                return
            if str(message.get("method")) in REPEATABLE and repeats < MAX_REPEATS:
                repeats += 1
                continue
            raise RouterConnectionLost("The connection to the EXAI router broke before the answer arrived.")

    async def _answer(
        self, message: dict[str, Any], resp: httpx.Response, request_id: Any, *, relay: bool
    ) -> bool:
        """Relay the response body; True once the request's answer (or the notification's ack) is through."""
        if message.get("method") == "initialize" and resp.status_code < 400:
            self.sid = resp.headers.get(p.MCP_SESSION_ID) or self.sid
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if request_id is None:
            text = (await resp.aread()).decode(errors="replace")
            if resp.status_code >= 400:
                log.debug("router answered %d to a notification: %s", resp.status_code, text[:300])
            return True
        if ctype == "text/event-stream":
            answered = False
            async for event in sse_events(resp):
                if not event.data:
                    continue
                out = json.loads(event.data)
                if isinstance(out, dict) and out.get("id") == request_id and "method" not in out:
                    answered = True
                    self._note_answer(message, out)
                if relay:
                    await self.write(out)
            return answered
        text = (await resp.aread()).decode(errors="replace")
        if ctype == "application/json" and text.strip():
            out = json.loads(text)
            if isinstance(out, dict) and "error" in out and out.get("id") is None:
                out["id"] = request_id  # the router refused before reading the id
            if isinstance(out, dict):
                self._note_answer(message, out)
            if relay:
                await self.write(out)
            return True
        error = BridgeError(
            f"The router answered HTTP {resp.status_code} without a JSON-RPC message "
            f"({ctype or 'no content type'}): {text[:200]!r}."
        )
        if relay:
            await self.write(error.to_jsonrpc(request_id))
        return True

    def _note_answer(self, message: dict[str, Any], answer: dict[str, Any]) -> None:
        if message.get("method") == "initialize" and isinstance(result := answer.get("result"), dict):
            version = result.get("protocolVersion")
            self.version = version if isinstance(version, str) else self.version

    async def _refused(self, resp: httpx.Response, request_id: Any, *, relay: bool) -> None:
        text = (await resp.aread()).decode(errors="replace")
        try:
            out = json.loads(text)
            why = out["error"]["message"]
        except (ValueError, KeyError, TypeError):
            out, why = None, text[:200]
        if not self._token_refused:
            self._token_refused = True
            self.say(
                f"exai-bridge: the router refused this bridge (HTTP {resp.status_code}: {why}). "
                "Set EXAI_BRIDGE_TOKEN (or --token) to one of the tokens in the router's EXAI_AUTH_TOKENS."
            )
        if request_id is None or not relay:
            return
        if isinstance(out, dict) and "error" in out:
            out["id"] = request_id
            await self.write(out)
        else:
            await self.write(
                BridgeError(f"The router refused the request ({resp.status_code}).").to_jsonrpc(request_id)
            )

    def _disconnected(self, exc: Exception) -> None:
        if not self._router_down:
            self._router_down = True
            self.say(
                f"exai-bridge: cannot reach the EXAI router at {self.url} ({exc or exc.__class__.__name__}); "
                f"waiting up to {self.retry_seconds:g}s per request. "
                "Is the fleet running? Start it with `exai up`."
            )

    def _connected(self) -> None:
        if self._router_down:
            self._router_down = False
            self.say(f"exai-bridge: the router at {self.url} answers again")

    # --- the session ---------------------------------------------------------------------------
    async def _reopen(self, stale: str) -> None:
        """Replay the client's initialize (and initialized) for a new session, once per loss."""
        async with self._reopen_lock:
            if self.sid != stale or self.init is None:
                return
            self.say(f"exai-bridge: the router no longer knows session {stale[:8]}; opening a new one")
            self.sid = None
            await self._post(self.init, self.init["id"], relay=False, reopen=False)
            if self.sid is None:
                raise BridgeError("The router did not open a new session for the replayed initialize.")
            if self.initialized:
                note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                await self._post(note, None, reopen=False)

    def _start_listener(self) -> None:
        if self._listener is None and self.sid is not None:
            self._listener = asyncio.create_task(self._listen(), name="notification stream")

    async def _listen(self) -> None:
        """The handshake era's GET stream: server-to-client messages, resumed after a break."""
        loop = asyncio.get_running_loop()
        last_id: str | None = None
        delay = 0.2
        while True:
            sid = self.sid
            if sid is None:
                await asyncio.sleep(0.2)
                continue
            headers = self._headers(None)
            headers["Accept"] = "text/event-stream"
            if last_id:
                headers[p.LAST_EVENT_ID] = last_id
            opened = loop.time()
            try:
                async with self.http.stream("GET", self.url, headers=headers) as resp:
                    if resp.status_code == 405:
                        return  # this server offers no stream
                    if resp.status_code == 404:  # the router forgot the session
                        await resp.aread()
                        with contextlib.suppress(ExaiError):
                            await self._reopen(sid)
                    elif resp.status_code == 200:
                        async for event in sse_events(resp):
                            last_id = event.id or last_id
                            if event.data:
                                try:
                                    await self.write(json.loads(event.data))
                                except ValueError:
                                    log.warning("skipped a malformed event: %r", event.data[:200])
                    else:
                        await resp.aread()
            except httpx.TransportError as exc:
                log.debug("notification stream broke: %r", exc)
            if self.sid != sid:
                last_id = None
            delay = 0.2 if loop.time() - opened > 5 else min(delay * 2, 5.0)
            await asyncio.sleep(delay)

    # --- leaving -------------------------------------------------------------------------------
    async def close(self) -> None:
        """The client is gone: stop calls and the stream, end the session on the router."""
        if self._listener is not None:
            self._listener.cancel()
        for call in list(self.calls.values()):
            call.task.cancel()
        pending = [c.task for c in self.calls.values()] + ([self._listener] if self._listener else [])
        await asyncio.gather(*pending, return_exceptions=True)
        headers = self._headers(None)
        if self.sid is None and self.last_modern is not None:
            headers[p.MCP_PROTOCOL_VERSION] = self.last_modern  # the stateless session, by its key
        if self.sid is not None or self.last_modern is not None:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.delete(self.url, headers=headers, timeout=CLOSE_TIMEOUT)
        await self.http.aclose()
