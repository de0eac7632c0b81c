"""The /mcp proxy: HTTP relaying for both MCP eras; sessions bind through router/binding.py.

Request bodies are single JSON-RPC messages capped at EXAI_MAX_BODY_BYTES; the router reads
each one (the method decides the route, `_meta` names the client, and a call that never
reached a dead instance must be re-sent). A JSON answer of known, small length (the 2026-07-28
era's usual answer) is read whole and sent in one write with Content-Length; every other body
(SSE, large or unsized) is copied chunk by chunk as it arrives, which keeps SSE events and
keep-alive pings flowing. Every GET is served by router/streams.py, never relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from common import protocol as p
from common.errors import (
    BadRequest,
    CallCut,
    ExaiError,
    InstanceLost,
    MethodNotAllowed,
    NoFreeInstance,
    PayloadTooLarge,
    RequestTimeout,
    SessionNotFound,
)
from router import prebuilt
from router.allocation import Allocator
from router.binding import CONTROL_TIMEOUT, MAX_ATTEMPTS, Bindings
from router.jsonrpc import (
    Message,
    error_response,
    instance_refusal,
    is_jsonrpc_type,
    parse_message,
    sse_error_event,
)
from router.leases import Leases
from router.metrics import Bound, Histogram, Metrics
from router.opening import NoneFree, Opened, Outcome, Taken
from router.registry import Instance, Registry
from router.security import Guard
from router.sessions import Call, Session, SessionTable, new_session_id
from router.sseresponse import ResponseWatch
from router.upstream import Lost, NotSent, Relay, Response, header_block
from router.versions import era_of

if TYPE_CHECKING:
    from router.express import Sent
    from router.streams import Hub

log = logging.getLogger(__name__)

__all__ = ["CONTROL_TIMEOUT", "Proxy"]

# Never forwarded upstream: hop-by-hop, the client's credentials and browser context (the
# router has checked them), and any X-Exai-* a client made up.
_DROP_REQUEST = frozenset(
    {
        "host", "connection", "keep-alive", "proxy-authorization", "te", "trailer", "transfer-encoding",
        "upgrade", "content-length", "authorization", "origin", "cookie", "accept-encoding",
        "mcp-session-id", "expect",
    }
)  # fmt: skip
_DROP_RESPONSE = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "server", "date", "mcp-session-id", "content-encoding"}
)
_DROP_RESPONSE_RAW = frozenset(name.encode() for name in (*_DROP_RESPONSE, "content-length"))
# Client header names (as sent) -> forwarded upstream or not; a client sends the same few names
# on every call, so each name is judged once.
_FORWARD_NAME: dict[bytes, bool] = {}


def client_fields(raw: tuple[tuple[bytes, bytes], ...]) -> bytes:
    """The client's headers that go upstream, as header lines (bytes as the client sent them)."""
    out = []
    for name, value in raw:
        keep = _FORWARD_NAME.get(name)
        if keep is None:
            low = name.lower()
            keep = low.decode("latin-1") not in _DROP_REQUEST and not low.startswith(b"x-exai-")
            if len(_FORWARD_NAME) < 1024:
                _FORWARD_NAME[name] = keep
        if keep:
            if b"\r" in value or b"\n" in value or b"\0" in value:
                raise ValueError(f"header {name.decode('latin-1')} has a line break in its value")
            out.append(b"%s: %s\r\n" % (name, value))
    return b"".join(out)


def _answer_fields(upstream: Response, session_id: str | None, always: bool) -> tuple[bytes, str, int | None]:
    """An instance's answer headers to relay (header lines, without hop-by-hop ones and without
    Content-Length), its Content-Type and its Content-Length. `session_id` (handshake era)
    replaces the instance's Mcp-Session-Id, and is added even when the instance sent none if
    `always`."""
    memo = upstream.memo  # kept with the answer's head on its connection (router/upstream.py)
    if memo is not None:
        kept = memo.get((session_id, always))
        if kept is not None:
            return kept[0], kept[1], upstream.length
    out = []
    seen = always
    ctype = ""
    length: int | None = None
    for name, value in upstream.raw_headers:
        low = name.lower()
        if low == b"content-type":
            ctype = value.decode("latin-1")
        elif low in _DROP_RESPONSE_RAW:
            if low == b"content-length" and value.isdigit():
                length = int(value)
            elif low == b"mcp-session-id":
                seen = True
            continue
        out.append(b"%s: %s\r\n" % (name, value))
    if session_id is not None and seen:
        out.append(b"Mcp-Session-Id: %s\r\n" % session_id.encode())
    fields = b"".join(out)
    if memo is not None and len(memo) < 64:
        memo[(session_id, always)] = (fields, ctype)
    return fields, ctype, length


def key_of(principal: str, name: str | None, client: str, request: web.Request) -> str:
    """A stateless session's key: explicit name, else clientInfo.name, else the client address."""
    if name:
        return f"{principal}/name/{name}"
    if client:
        return f"{principal}/client/{client}"
    return f"{principal}/addr/{request.remote}"


_SILENT_HINT = (
    "The instance may still be working on it; raise EXAI_UPSTREAM_READ_TIMEOUT if calls "
    "legitimately stay silent this long. Retry the call if it is safe to repeat."
)


def _lost(target: Instance, exc: BaseException, read_timeout: float | None) -> InstanceLost:
    if isinstance(exc, Lost) and exc.silent and read_timeout:
        return InstanceLost(
            f"Instance {target.id} sent nothing for {read_timeout:g}s while handling this request.",
            hint=_SILENT_HINT,
        )
    why = str(exc) if isinstance(exc, Lost) else exc.__class__.__name__
    return InstanceLost(f"Instance {target.id} stopped answering while handling this request ({why}).")


# Requests that read and change nothing: repeating one after an ambiguous failure is harmless.
_REPEATABLE_METHODS = frozenset(
    {
        "ping", "server/discover", "tools/list", "prompts/list", "prompts/get", "resources/list",
        "resources/templates/list", "resources/read", "completion/complete",
    }
)  # fmt: skip

# JSON answers up to this size are read whole and sent with Content-Length in one write;
# larger ones (and SSE) are copied chunk by chunk as they arrive.
JSON_WHOLE_MAX = 1 << 20

STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, 10.0, 60.0)


def _call_of(msg: Message | None) -> Call:
    """What a request in flight is, for the report of a scale-down that cut it."""
    method = (msg.method or "response") if msg is not None else "DELETE"
    name = (msg.params or {}).get("name") if msg is not None and msg.method == "tools/call" else None
    return Call(method=method, name=name if isinstance(name, str) else "", task=asyncio.current_task())


def _safe_to_repeat(msg: Message | None) -> bool:
    if msg is None or msg.method is None:
        return False
    return msg.id is None or msg.method in _REPEATABLE_METHODS  # notifications, reads


class Proxy:
    """Holds the pieces a proxied request needs; the aiohttp handlers are its methods."""

    def __init__(
        self,
        *,
        http: aiohttp.ClientSession,
        relay: Relay | None = None,
        table: SessionTable,
        registry: Registry,
        leases: Leases,
        allocator: Allocator,
        guard: Guard,
        metrics: Metrics,
        internal_token: str,
        max_body_bytes: int,
        read_timeout: float = 120.0,
        body_timeout: float = 30.0,
    ) -> None:
        self.http = http  # control requests (DELETE, admin)
        self.relay = relay if relay is not None else Relay()  # proxied calls (router/upstream.py)
        self.read_timeout = read_timeout
        self.table = table
        self.registry = registry
        self.leases = leases
        self.allocator = allocator
        self.guard = guard
        self.metrics = metrics
        self.internal_token = internal_token
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout  # a client trickling its body is cut off after this
        self.bindings = Bindings(
            http=http,
            table=table,
            registry=registry,
            leases=leases,
            allocator=allocator,
            metrics=metrics,
            internal_token=internal_token,
        )
        self.stage_seconds = Histogram(
            "exai_router_call_stage_seconds",
            "A proxied call's time by stage: router (the router's own work before and after the "
            "instance) and instance (from sending the call to its answer: whole JSON answers until "
            "read, streamed answers until their headers).",
            STAGE_BUCKETS,
        )
        metrics.add(self.stage_seconds)
        self._stage_instance = self.stage_seconds.labelled(stage="instance")
        self._stage_router = self.stage_seconds.labelled(stage="router")
        self._request_seconds: dict[tuple[str, str], Bound] = {}
        self._creating: dict[str, asyncio.Lock] = {}
        # session id -> (what the header block depends on, the block): see _request_head
        self._heads: dict[str, tuple[tuple[Any, ...], bytes]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self.notifications: Hub | None = None  # notification streams held here (router/streams.py)

    # --- entry -----------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        msg: Message | None = None
        body: bytes | None = None
        try:
            self.guard.check_origin(request)
            principal = self.guard.principal(request)
            if request.method == "POST":
                body = await self._read_body(request)
                msg = parse_message(body)
            elif request.method not in ("GET", "DELETE"):
                raise MethodNotAllowed(
                    f"{request.method} is not allowed on /mcp",
                    hint="Use POST, GET or DELETE.",
                    allow="GET, POST, DELETE",
                )
            if era_of(request.headers.get(p.MCP_PROTOCOL_VERSION), msg) == "stateless":
                return await self._stateless(request, principal, body, msg, started)
            return await self._handshake(request, principal, body, msg, started)
        except ExaiError as exc:
            return self._refused(exc, msg)

    async def take_up(
        self, request: web.Request, sess: Session, body: bytes, msg: Message, started: float, first: Sent
    ) -> web.StreamResponse:
        """Carry on with a call router/express.py sent (`handle`, from its forwarding on)."""
        try:
            return await self._forward(request, sess, body, msg, started, first=first)
        except ExaiError as exc:
            return self._refused(exc, msg)

    def _refused(self, exc: ExaiError, msg: Message | None) -> web.Response:
        if isinstance(exc, NoFreeInstance):
            retry = str(exc.details.get("retry_after", self.allocator.retry_after))
            return error_response(exc, msg.id if msg else None, headers={"Retry-After": retry})
        if isinstance(exc, MethodNotAllowed):
            return error_response(exc, None, headers={"Allow": str(exc.details.get("allow", "POST"))})
        return error_response(exc, msg.id if msg else exc.details.get("request_id"))

    async def _read_body(self, request: web.Request) -> bytes:
        ctype = request.headers.get("Content-Type", "")
        if not ctype.split(";")[0].strip().lower() == "application/json":
            raise BadRequest("Unsupported Media Type: Content-Type must be application/json.")
        limit = self.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise PayloadTooLarge(f"Request body of {request.content_length} bytes exceeds {limit} bytes.")
        content = request.content
        if content.is_eof():
            # The usual case: the whole body came with the headers; no timer, no waiting.
            data = content.read_nowait(-1)
            if len(data) > limit:
                raise PayloadTooLarge(f"Request body exceeds {limit} bytes (EXAI_MAX_BODY_BYTES).")
            return data
        buf = bytearray()
        try:
            async with asyncio.timeout(self.body_timeout):
                async for chunk in request.content.iter_any():
                    buf += chunk
                    if len(buf) > limit:
                        raise PayloadTooLarge(f"Request body exceeds {limit} bytes (EXAI_MAX_BODY_BYTES).")
        except TimeoutError:
            raise RequestTimeout(
                f"The request body did not arrive within {self.body_timeout:g}s ({len(buf)} bytes came)"
            ) from None
        return bytes(buf)

    # --- handshake era ---------------------------------------------------------------------
    async def _handshake(
        self, request: web.Request, principal: str, body: bytes | None, msg: Message | None, started: float
    ) -> web.StreamResponse:
        sid = request.headers.get(p.MCP_SESSION_ID)
        if sid is None:
            if body is not None and msg is not None and msg.method == "initialize" and msg.id is not None:
                return await self._open_handshake(request, principal, body, msg, started)
            raise BadRequest("Bad Request: Missing session ID (send initialize first).")
        sess = await self.table.fetch(sid)
        if sess is None or sess.ended or sess.principal != principal or sess.era != "handshake":
            raise SessionNotFound("Session not found.")
        version = request.headers.get(p.MCP_PROTOCOL_VERSION)
        if version and version != sess.protocol_version:
            sess.protocol_version = version
        if request.method == "DELETE":
            return await self._delete(request, sess, started)
        if request.method == "GET":
            if self.notifications is None:
                raise MethodNotAllowed("GET streams are not served by this router", allow="POST, DELETE")
            return await self.notifications.serve_get(request, sess)
        return await self._forward(request, sess, body, msg, started)

    async def _open_handshake(
        self, request: web.Request, principal: str, body: bytes, msg: Message, started: float
    ) -> web.StreamResponse:
        params = msg.params or {}
        sess = Session(
            id=new_session_id(),
            era="handshake",
            principal=principal,
            client=msg.client_name() or "",
            init_body=body.decode(),
            protocol_version=str(params.get("protocolVersion", "")),
            client_addr=request.remote or "",
        )
        self.bindings.bind(sess, *await self.allocator.allocate(sess.id))
        try:
            return await self._forward(request, sess, body, msg, started, opening=True)
        finally:
            if not sess.upstream_sid and not sess.ended:
                # initialize failed or the client went away: the instance is free again.
                self._spawn(self.bindings.end(sess, "failed-open", persisted=False))

    async def _delete(self, request: web.Request, sess: Session, started: float) -> web.StreamResponse:
        target = await self.bindings.target(sess)  # None when parked: nothing to tell an instance
        status = 200
        if target is not None:
            headers = self._upstream_headers(request, sess)
            headers[p.MCP_SESSION_ID] = sess.upstream_sid
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.delete(
                    target.base_url + p.MCP_PATH, headers=headers, timeout=CONTROL_TIMEOUT
                ):
                    pass
        await self.bindings.end(sess, "delete")
        self.metrics.request_seconds.observe(time.perf_counter() - started, route="/mcp", method="DELETE")
        return web.Response(status=status, headers={p.MCP_SESSION_ID: sess.id})

    # --- stateless era ---------------------------------------------------------------------
    def session_key(self, request: web.Request, principal: str, msg: Message | None) -> tuple[str, str]:
        """(key, client name): explicit name, else clientInfo.name, else the client address."""
        name = request.match_info.get("name") or request.headers.get(p.SESSION_KEY_HEADER)
        client = (msg.client_name() if msg else None) or ""
        return key_of(principal, name, client, request), client

    async def _stateless(
        self, request: web.Request, principal: str, body: bytes | None, msg: Message | None, started: float
    ) -> web.StreamResponse:
        key, client = self.session_key(request, principal, msg)
        hub = self.notifications
        if (
            hub is not None
            and msg is not None
            and msg.method == "subscriptions/listen"
            and msg.id is not None
        ):
            return await hub.serve_listen(request, principal, key, client, msg)
        if hub is not None and request.method == "GET":
            # The 2026-07-28 transport has no GET, except to resume a listen stream held here.
            if (resume := hub.listen_resume(request)) is None:
                raise MethodNotAllowed(
                    "GET is not allowed here: 2026-07-28 sessions use POST only "
                    "(GET only resumes a subscriptions/listen stream)",
                    allow="POST",
                )
            return await hub.resume_listen(request, principal, *resume)
        if request.method == "POST":
            sess = self.table.by_key.get(key)  # not cached here: the opening script looks in Redis
        else:
            sess = await self.table.fetch_by_key(key)
        if request.method == "GET" or sess is None or sess.ended:
            if request.method != "POST":
                # The 2026-07-28 transport has only POST (DELETE ends a session that exists).
                raise MethodNotAllowed(
                    f"{request.method} is not allowed here: 2026-07-28 sessions use POST only", allow="POST"
                )
            sess = await self._open_stateless(request, principal, key, client)
        if request.method == "DELETE":
            await self.bindings.end(sess, "delete")
            return web.Response(status=204)
        return await self._forward(request, sess, body, msg, started)

    async def _open_stateless(self, request: web.Request, principal: str, key: str, client: str) -> Session:
        """The session of `key`: cached here, opened by another router (found in Redis), or
        opened now, in one Redis round trip when a known instance is free (router/opening.py)."""
        lock = self._creating.setdefault(key, asyncio.Lock())
        async with lock:
            sess = self.table.by_key.get(key)  # opened here meanwhile?
            if sess is not None and not sess.ended:
                return sess
            sess = Session(
                id=new_session_id(),
                era="stateless",
                principal=principal,
                client=client,
                key=key,
                client_addr=request.remote or "",
            )
            opening, bindings = self.bindings.opening, self.bindings
            got: Outcome | None = None
            try:
                got = await opening.open(sess, self.allocator.known())
                if isinstance(got, NoneFree):  # the slow path: reconcile, park, wait, spares
                    leased = await self.allocator.allocate(sess.id, known_first=False)
                    bindings.bind(sess, *leased)
                    # Seen now, not when the wait began: the record's last-seen time is what
                    # other routers judge idleness by, and the session's first call (maybe
                    # through another router too) is only starting.
                    sess.last_seen = time.time()
                    got = await opening.open(sess, (), given=leased)
                    if isinstance(got, Taken):  # another router opened it meanwhile
                        await bindings.end(sess, "lost-race", persisted=False)
                if isinstance(got, Taken):
                    other = await self.table.fetch(got.session_id)
                    if other is None:
                        raise SessionNotFound("Session is being opened elsewhere; retry.")
                    return other
                assert isinstance(got, Opened)
                bindings.opened(sess, got)
            except BaseException as exc:
                if not sess.ended and not isinstance(got, Taken):
                    await asyncio.shield(bindings.undo_open(sess, exc))
                raise
            finally:
                if self._creating.get(key) is lock and not getattr(lock, "_waiters", None):
                    del self._creating[key]  # nobody else is waiting to open this key
            return sess

    # --- forwarding ------------------------------------------------------------------------
    def _request_head(
        self,
        request: web.Request,
        sess: Session,
        target: Instance,
        body: bytes,
        opening: bool,
        block: bytes | None = None,
        with_body: bool = False,
    ) -> bytes:
        """The request line and headers of a proxied call, as bytes ready to send (and the
        body after them if `with_body`).

        The part that only depends on the session and its binding (request line, Host, the
        router's own headers) is built once per binding and kept; the client's headers are
        added per call (`block`: the caller has them as header lines already)."""
        upstream_sid = sess.upstream_sid if not opening else ""
        # (host, port) stand for target.base_url, which is made of them
        shape = (
            request.method, target.host, target.port, sess.fence, sess.client, upstream_sid, sess.principal
        )  # fmt: skip
        cached = self._heads.get(sess.id)
        try:
            if cached is not None and cached[0] == shape:
                fixed = cached[1]
            else:
                lines = [
                    (p.INTERNAL_TOKEN_HEADER, self.internal_token),
                    (p.SESSION_HEADER, sess.id),
                    (p.PRINCIPAL_HEADER, sess.principal),
                    (p.ERA_HEADER, sess.era),
                    (p.FENCE_HEADER, str(sess.fence)),
                ]
                if sess.client:
                    lines.append((p.CLIENT_HEADER, sess.client))
                if upstream_sid:
                    lines.append((p.MCP_SESSION_ID, upstream_sid))
                netloc = target.base_url[7:]  # after "http://"
                fixed = f"{request.method} {p.MCP_PATH} HTTP/1.1\r\nHost: {netloc}\r\n".encode()
                fixed += header_block(lines)
                if len(self._heads) >= 4096:
                    self._heads.clear()  # ended sessions' entries go too; rebuilt on next use
                self._heads[sess.id] = (shape, fixed)
            if block is None:
                block = client_fields(request.raw_headers)
        except ValueError as exc:
            raise BadRequest(f"Bad Request: {exc}.") from None
        length = b"Content-Length: %d\r\n\r\n" % len(body)
        return b"".join((fixed, block, length, body) if with_body else (fixed, block, length))

    def _upstream_headers(self, request: web.Request, sess: Session) -> dict[str, str]:
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in _DROP_REQUEST and not k.lower().startswith("x-exai-")
        }
        headers[p.INTERNAL_TOKEN_HEADER] = self.internal_token
        headers[p.SESSION_HEADER] = sess.id
        headers[p.PRINCIPAL_HEADER] = sess.principal
        headers[p.ERA_HEADER] = sess.era
        headers[p.FENCE_HEADER] = str(sess.fence)
        if sess.client:
            headers[p.CLIENT_HEADER] = sess.client
        return headers

    async def _forward(
        self,
        request: web.Request,
        sess: Session,
        body: bytes | None,
        msg: Message | None,
        started: float,
        *,
        opening: bool = False,
        first: Sent | None = None,
    ) -> web.StreamResponse:
        """Send the call (again, to another instance, when it never arrived) and relay the answer.

        `first` is a call router/express.py already sent (its bookkeeping done): its answer is
        taken up here, as the first attempt's, when it needs more than a whole JSON answer."""
        # GET streams never come here: router/streams.py serves every GET; DELETE neither.
        relay, read_timeout = self.relay, self.read_timeout
        body = body or b""
        if first is None:
            sess.inflight += 1
            call = _call_of(msg)
            sess.calls[id(call)] = call
            sess.total += 1
            sess.routed_here = True
            self.table.touch(sess)
        else:
            call = first.call
            call.task = asyncio.current_task()
        bindings = self.bindings
        try:
            for attempt in range(MAX_ATTEMPTS):
                taken, first = first, None
                if taken is not None:
                    generation, target, sent = taken.generation, taken.target, taken.sent
                    if call.cut:  # a scale-down cut it before this task took it up
                        taken.upstream.close()
                        raise asyncio.CancelledError
                else:
                    generation = sess.generation
                    found = await bindings.target(sess)
                    if found is None:
                        await bindings.rebind(sess, generation, "instance gone from registry")
                        continue
                    target = found
                    head = self._request_head(request, sess, target, body, opening)
                    sent = time.perf_counter()
                try:
                    if taken is not None:
                        upstream = await relay.resume(taken.upstream, read_timeout)
                    else:
                        upstream = await relay.send(target.host, target.port, head, body, read_timeout)
                except NotSent as exc:
                    # Nothing reached the instance: move the session and send it again.
                    self.metrics.upstream_errors.inc(kind="connect")
                    self.registry.mark_suspect(target)
                    log.warning("instance %s refused session %s: %s", target.id, sess.id[:8], exc)
                    if opening:
                        await bindings.reopen(sess, target)
                    else:
                        await bindings.rebind(sess, generation, "connection refused")
                    continue
                except Lost as exc:
                    # The request went out and the instance vanished: it may have run.
                    self.metrics.upstream_errors.inc(kind="lost")
                    if _safe_to_repeat(msg) and attempt < MAX_ATTEMPTS - 1:
                        await bindings.check_and_rebind(sess, generation, target)
                        continue
                    self._spawn(bindings.check_and_rebind(sess, generation, target))
                    raise _lost(target, exc, read_timeout) from None
                fenced = upstream.status == 409 and upstream.headers.get(p.FENCED_HEADER)
                if fenced and attempt < MAX_ATTEMPTS - 1:
                    # The instance serves another session (Redis lost its lease): it ran nothing.
                    upstream.release()
                    self.metrics.upstream_errors.inc(kind="fenced")
                    if opening:
                        await bindings.reopen(sess, target)
                    else:
                        await bindings.rebind(sess, generation, "instance serves another session")
                    continue
                if (
                    upstream.status == 404
                    and sess.era == "handshake"
                    and sess.upstream_sid
                    and not opening
                    and attempt < MAX_ATTEMPTS - 1
                ):
                    # The instance restarted or was reset and no longer knows the session;
                    # it refused before running anything, so rebuild the session and resend.
                    upstream.release()
                    self.metrics.upstream_errors.inc(kind="session-unknown")
                    await bindings.rebind(sess, generation, "instance lost the session", keep=True)
                    continue
                return await self._relay(
                    request, sess, msg, upstream, target, started, opening=opening, call=call, sent=sent
                )
            raise InstanceLost("Could not reach a working instance for this session after several tries.")
        except asyncio.CancelledError:
            if not call.cut:
                raise
            return await self._cut(call, msg)
        finally:
            sess.inflight -= 1
            sess.calls.pop(id(call), None)
            self.table.touch(sess)

    async def _cut(self, call: Call, msg: Message | None) -> web.StreamResponse:
        """Answer a call that a scale-down cut (its instance is being stopped)."""
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        error = CallCut(f"The fleet was scaled down while this call ({call.describe()}) was running.")
        rid = msg.id if msg is not None else None
        resp = call.response
        if resp is None:
            return error_response(error, rid)
        if resp.headers.get("Content-Type", "").startswith("text/event-stream") and rid is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write(sse_error_event(error, rid))
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp

    async def _relay(
        self,
        request: web.Request,
        sess: Session,
        msg: Message | None,
        upstream: Response,
        target: Instance,
        started: float,
        *,
        opening: bool,
        call: Call | None = None,
        sent: float | None = None,
    ) -> web.StreamResponse:
        """Copy the upstream response to the client as it arrives."""
        answered = time.perf_counter()
        sent = answered if sent is None else sent
        extra: bytes | None = None  # the response came before the instance's end (see below)
        try:
            if opening:
                upstream_sid = upstream.headers.get(p.MCP_SESSION_ID)
                if upstream.status < 400 and upstream_sid:
                    sess.upstream_sid = upstream_sid
                    await self.table.save(sess)
            if upstream.status >= 400 and not is_jsonrpc_type(upstream.headers.get("Content-Type", "")):
                # The SDK answers some refusals (406, 405 …) with an empty body: say what it meant.
                detail = (await upstream.read_some(1024)).decode("utf-8", "replace")
                refusal = instance_refusal(upstream.status, upstream.reason or "", detail)
                return error_response(refusal, msg.id if msg else None, status=upstream.status)
            resp: web.StreamResponse
            if prebuilt.usable(request):
                # The usual case: the router frames the answer itself (router/prebuilt.py).
                sid = sess.id if sess.era == "handshake" else None
                fields, ctype, length = _answer_fields(upstream, sid, bool(sess.upstream_sid))
                if (
                    length is not None and length <= JSON_WHOLE_MAX and ctype.startswith("application/json")
                ) or upstream.status in (204, 304):
                    # A whole JSON answer: status line, headers and body in one write.
                    body = await self._read_whole(sess, upstream, target)
                    self._observe(request, started)
                    resp = prebuilt.Raw.whole(request, upstream.status, upstream.reason, ctype, fields, body)
                    self._stages(started, sent, answered)
                    return resp
                # Streamed: the headers go with the first chunk when it is already here.
                resp = prebuilt.Raw.stream(
                    request, upstream.status, upstream.reason, ctype, fields, flush=not upstream.has_data
                )
            else:
                headers: CIMultiDict[str] = CIMultiDict(
                    (k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
                )
                if sess.era == "handshake" and (sess.upstream_sid or p.MCP_SESSION_ID in upstream.headers):
                    headers[p.MCP_SESSION_ID] = sess.id
                length = upstream.content_length
                if (
                    length is not None
                    and length <= JSON_WHOLE_MAX
                    and headers.get("Content-Type", "").startswith("application/json")
                ):
                    # A whole JSON answer: one write with Content-Length, no chunked framing.
                    return await self._whole(request, sess, upstream, target, headers, (started, sent))
                resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
                await resp.prepare(request)
            if call is not None:
                call.response = resp
            self._observe(request, started)
            self._stages(started, sent, answered)
            last = b""
            watch = None
            if (
                msg is not None
                and msg.is_request
                and upstream.headers.get("Content-Type", "").startswith("text/event-stream")
            ):
                watch = ResponseWatch(msg.id)  # the answer ends with the response's event
            try:
                async for chunk in upstream.iter_chunks(self.read_timeout):
                    if upstream.at_eof:
                        last = chunk  # the end: it goes out with the end marker, in one write
                        break
                    cut = watch.feed(chunk) if watch is not None else None
                    if cut is not None:
                        # the response's event, with the end marker; the instance's end is read after
                        last, extra = chunk[:cut], chunk[cut:]
                        break
                    await resp.write(chunk)
            except Lost as exc:  # gone, or silent for longer than EXAI_UPSTREAM_READ_TIMEOUT
                self.metrics.upstream_errors.inc(kind="lost-midstream")
                log.warning("instance %s dropped a response for session %s: %r", target.id, sess.id[:8], exc)
                sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
                if msg is not None and msg.is_request and sse:
                    if exc.silent:
                        lost = _lost(target, exc, self.read_timeout)
                    else:
                        lost = InstanceLost(f"Instance {target.id} stopped while handling this request.")
                    with contextlib.suppress(ConnectionError):
                        await resp.write(sse_error_event(lost, msg.id))
                self._spawn(self.bindings.check_and_rebind(sess, sess.generation, target))
            except ConnectionError:
                # The client went away; closing upstream tells the instance to cancel the call.
                upstream.close()
                return resp
            with contextlib.suppress(ConnectionError):
                await resp.write_eof(last)
            return resp
        finally:
            if extra is not None:
                upstream.drain(extra)
            elif upstream.at_eof:
                upstream.release()
            else:
                upstream.close()  # never return a half-read connection to the pool

    async def _whole(
        self,
        request: web.Request,
        sess: Session,
        upstream: Response,
        target: Instance,
        headers: CIMultiDict[str],
        clock: tuple[float, float],
    ) -> web.Response:
        """Read a JSON answer whole (its length is known and small) and send it in one write."""
        headers.popall("Content-Length", None)  # web.Response sets it from the body
        body = await self._read_whole(sess, upstream, target)
        started, sent = clock
        answered = time.perf_counter()
        self._observe(request, started)
        resp = web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)
        self._stages(started, sent, answered)
        return resp

    async def _read_whole(self, sess: Session, upstream: Response, target: Instance) -> bytes:
        """A JSON answer's whole body (its length is known and small)."""
        try:
            return await upstream.read(self.read_timeout)
        except Lost as exc:
            # Headers came, the body did not: the instance may have run the call.
            self.metrics.upstream_errors.inc(kind="lost-midstream")
            log.warning("instance %s dropped a response for session %s: %r", target.id, sess.id[:8], exc)
            self._spawn(self.bindings.check_and_rebind(sess, sess.generation, target))
            raise _lost(target, exc, self.read_timeout) from None

    def _stages(self, started: float, sent: float, answered: float, now: float = 0.0) -> None:
        self._stage_instance.observe(answered - sent)
        self._stage_router.observe((sent - started) + ((now or time.perf_counter()) - answered))

    def _observe(self, request: web.Request, started: float, now: float = 0.0) -> None:
        elapsed = (now or time.perf_counter()) - started
        resource = request.match_info.route.resource
        key = (resource.canonical if resource is not None else "/mcp", request.method)
        series = self._request_seconds.get(key)
        if series is None:
            series = self._request_seconds[key] = self.metrics.request_seconds.labelled(
                route=key[0], method=key[1]
            )
        series.observe(elapsed)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        relieving = self.bindings.relieving
        background = [*self._background, *([relieving] if relieving is not None else [])]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self.bindings.opening.close()
