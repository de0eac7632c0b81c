"""The instance's ASGI app: the SDK's Streamable HTTP app (both MCP eras) behind the internal token.

`build_app` wires one `Runtime` into an MCPServer whose lifespan opens Redis, storage and the
providers, registers the instance, and undoes all of it on shutdown. The same Starlette app
serves `/mcp` (handshake and 2026-07-28 clients alike) and the router's `/internal/*` calls,
behind `InternalTokenGate`, which hands each call (`POST /mcp`) to the SDK's handler directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.inbound import x_mcp_header_map
from opentelemetry import trace  # the SDK's own dependency
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import __version__, gcpauses, loopwatch
from common.errors import ConfigError, ExaiError, InstanceFenced, ShuttingDown, Unauthorized
from common.keys import Keys
from common.notifications import EventLog
from common.protocol import (
    FENCED_HEADER,
    INTERNAL_DRAIN,
    INTERNAL_HEALTH,
    INTERNAL_METRICS,
    INTERNAL_RESET,
    INTERNAL_TOKEN_HEADER,
    MCP_PATH,
    PROBE_LIVE,
    PROBE_READY,
)
from common.redis import create_redis
from common.settings import Settings
from instance.after_answer import AfterAnswer, current_answer
from instance.context import tokens
from instance.fastcall import DirectCalls, first_values
from instance.notify import Notifier
from instance.providers import Providers
from instance.registry import Registry
from instance.request_body import ReadAhead
from instance.resources import register as register_resources
from instance.runtime import Identity, Runtime
from instance.storage import Storage
from instance.timing import CallClock, chat_stages, current_call, finish_request
from instance.tools import register_tools
from instance.tools.guard import ArgumentGuard
from instance.tools.listing import ListAnswers, ToolListCache

try:  # a private module of the SDK (mcp>=2.3,<3): if a release moves it, its spans just stay on
    from mcp.server._otel import OpenTelemetryMiddleware
except ImportError:  # pragma: no cover
    OpenTelemetryMiddleware = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

INSTRUCTIONS = (
    "EXAI consults GLM (Z.ai) and Kimi (Moonshot). Use `chat` for a second opinion and pass the "
    "returned continuation_id to continue a thread; use the task_* and note_* tools to keep "
    "work items and notes that survive restarts."
)


def _error_response(exc: ExaiError) -> Response:
    return JSONResponse(exc.to_jsonrpc(), status_code=exc.http_status)


def _fenced(runtime: Runtime) -> Response:
    error = InstanceFenced(f"Instance {runtime.identity.id} serves another session.")
    return JSONResponse(error.to_jsonrpc(), status_code=error.http_status, headers={FENCED_HEADER: "1"})


class InternalTokenGate:
    """The ASGI app uvicorn serves: the router's internal token checked on every request, then
    `POST /mcp` straight to the SDK's Streamable HTTP handler and everything else (GET and DELETE
    on /mcp, /internal/*, the lifespan) through the SDK's Starlette app. Pure ASGI: streams pass.

    Why straight: Starlette's error, exception and routing layers cost a call and a send wrapper
    each per request and do nothing for a call (the SDK answers its own errors). The one thing
    they add, a plain 500 when the handler raises before answering, `_timed` does itself.
    """

    def __init__(
        self,
        app: ASGIApp,
        mcp_handler: ASGIApp,
        runtime: Runtime,
        token: str,
        answers: ListAnswers | None = None,
        calls: DirectCalls | None = None,
    ) -> None:
        self.app = app
        self.mcp_handler = mcp_handler
        self.runtime = runtime
        self.token = token.encode()
        self.answers = answers
        self.calls = calls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in (PROBE_LIVE, PROBE_READY) and scope["method"] == "GET":
            # Orchestrator probes (Kubernetes) carry no token; they learn the state and nothing else.
            ready = self.runtime.state == "ready"
            status = 200 if scope["path"] == PROBE_LIVE or ready else 503
            await JSONResponse({"state": self.runtime.state}, status_code=status)(scope, receive, send)
            return
        headers = first_values(scope)
        given = headers.get(INTERNAL_TOKEN_HEADER.lower(), "").encode()
        if not given or not hmac.compare_digest(given, self.token):
            error = Unauthorized(
                f"missing or wrong {INTERNAL_TOKEN_HEADER}",
                hint="Instances only answer the EXAI router; connect to the router (port 8079) instead.",
            )
            await _error_response(error)(scope, receive, send)
            return
        if scope["path"] == MCP_PATH:
            if scope["method"] == "POST":
                if self.runtime.state == "stopping":
                    refusal = _error_response(ShuttingDown("this instance is shutting down"))
                    await refusal(scope, receive, send)
                    return
                await self._call(scope, receive, send, headers)
                return
            if scope["method"] != "DELETE":  # a session's goodbye must not re-bind it after a reset
                if not self._bound(headers) and not await self.runtime.admit(headers):
                    await _fenced(self.runtime)(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _bound(self, headers: dict[str, str]) -> bool:
        """The usual case, without a coroutine: no take-over in progress, and the request's
        session is the bound one (or binds it now). Otherwise `Runtime.admit` decides."""
        return self.runtime.handover is None and self.runtime.observe(headers)

    async def _call(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        """Serve a call with a clock the tool wrapper marks, so a chat's time in the SDK (before
        and after our tool) shows in its stages (instance/timing.py); what the call sets off
        but its answer does not need (a new binding's registry write, telemetry) is put off
        until the answer is written (instance/after_answer.py)."""
        clock = CallClock(time.perf_counter())
        pending = AfterAnswer()
        token = current_call.set(clock)
        answer_token = current_answer.set(pending)
        started = False

        async def timed_send(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish_request(clock)
                pending.run()

        try:
            if not self._bound(headers) and not await self.runtime.admit(headers):
                await _fenced(self.runtime)(scope, receive, send)
                return
            if self.calls is not None and self.calls.wanted(scope):
                await self.calls(scope, receive, timed_send)
                return
            if self.answers is not None and self.answers.wanted(scope):
                await self._listing(self.answers, scope, receive, timed_send)
                return
            await self.mcp_handler(scope, receive, timed_send)
        except Exception:
            # What Starlette's ServerErrorMiddleware answered here before: a plain 500 if nothing
            # was sent yet; the exception goes on to uvicorn, which logs it.
            if not started:
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
            raise
        finally:
            current_answer.reset(answer_token)
            current_call.reset(token)
            pending.run()

    async def _listing(self, answers: ListAnswers, scope: Scope, receive: Receive, send: Send) -> None:
        """A 2026-07-28 `tools/list`: a kept answer if there is one for this request, else the
        SDK's, kept for the next one (instance/tools/listing.py)."""
        ahead = await ReadAhead.read(receive, answers.max_body)  # a larger body: the SDK's 413
        found = answers.key(scope, ahead.body) if ahead.whole else None
        if found is not None:
            kept = answers.answer(*found)
            if kept is not None:
                headers, body = kept
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        tools = answers.tool_set()
        sent: list[Message] = []

        async def recording_send(message: Message) -> None:
            sent.append(message)
            await send(message)

        await self.mcp_handler(scope, ahead.replay, recording_send if found is not None else send)
        if found is not None:
            answers.keep(*found, tools, sent)


def build_app(settings: Settings, identity: Identity) -> tuple[ASGIApp, Runtime]:
    """The instance's ASGI app and the runtime it shares with the lifecycle (see instance.main)."""
    if not settings.internal_token:
        raise ConfigError(
            "EXAI_INTERNAL_TOKEN is not set: instances only accept requests from the router, "
            "which must share this token"
        )
    runtime = Runtime(settings, identity, version=__version__)

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[Runtime]:
        async with contextlib.AsyncExitStack() as stack:
            redis = create_redis(settings.redis_url) if settings.redis_url else None
            if redis is not None:
                stack.push_async_callback(redis.aclose)
            else:
                log.warning(
                    "REDIS_URL is not set: this instance is not registered and the router cannot find it"
                )
            runtime.redis = redis
            runtime.notifier = await stack.enter_async_context(_notifier(settings, redis).running())
            runtime.storage = await _open_storage(stack, settings, runtime)
            runtime.providers = await stack.enter_async_context(Providers.open(settings))
            # The first chat would otherwise load a tokenizer vocabulary on the event loop.
            families = [f for f in ("glm", "kimi") if f in runtime.providers.clients]
            runtime.background(_preload_and_freeze(families), what="loading tokenizers")
            registry = Registry(runtime, redis) if redis is not None else None
            runtime.on_change = registry.poke if registry is not None else (lambda: None)
            runtime.register_now = registry.beat_now if registry is not None else None
            if runtime.state == "starting":  # a SIGTERM during startup must not be undone
                runtime.set_state("ready")
            if registry is not None:
                await registry.start()
            # Membership changes announced by the admin API, ended sessions and link_leave drop
            # this instance's copies of the groups' member lists (common/link_members.py).
            watch = runtime.links.start_member_watch() if runtime.links is not None else None
            if watch is not None:
                stack.push_async_callback(watch.stop)
            if runtime.links is not None and runtime.storage is not None:
                # Group task events whose change committed but never reached a spool.
                relay = asyncio.create_task(runtime.links.run_outbox_relay(), name="link-outbox-relay")
                stack.callback(relay.cancel)
            log.info("instance %s ready on %s:%d", identity.id, identity.host, identity.port)
            try:
                yield runtime
            finally:
                runtime.set_state("stopping")
                await _flush(runtime)
                if registry is not None:
                    await registry.stop()
                runtime.providers = None

    mcp: MCPServer[Runtime] = MCPServer(
        "exai",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        log_level=settings.log_level,
    )
    tracing = _tracing_configured()
    if OpenTelemetryMiddleware is not None and not tracing:
        # The SDK wraps every message in an OpenTelemetry span by default and documents dropping
        # its middleware to opt out; with no tracer provider the span records nothing and costs
        # a context attach/detach and a trace-context parse per call.
        mcp.middleware[:] = [m for m in mcp.middleware if not isinstance(m, OpenTelemetryMiddleware)]
    listing = register_tools(mcp, runtime)
    # A kept answer skips the whole middleware chain, spans included: only without tracing.
    answers = None if tracing else ListAnswers(listing, settings.max_body_bytes)
    register_resources(mcp, runtime)

    @mcp.custom_route(INTERNAL_HEALTH, methods=["GET"])
    async def health(request: Request) -> Response:
        return JSONResponse(runtime.health())

    @mcp.custom_route(INTERNAL_RESET, methods=["POST"])
    async def reset(request: Request) -> Response:
        if not runtime.may_reset(request.headers):
            return _fenced(runtime)
        await runtime.reset()
        return JSONResponse(runtime.health())

    @mcp.custom_route(INTERNAL_METRICS, methods=["GET"])
    async def stage_metrics(request: Request) -> Response:
        return PlainTextResponse(
            chat_stages.render()
            + _storage_metrics(runtime)
            + _listing_metrics(listing, answers, gate.calls)
            + loopwatch.render_metrics()
            + gcpauses.render_metrics(),
            media_type="text/plain; version=0.0.4",
        )

    @mcp.custom_route(INTERNAL_DRAIN, methods=["POST", "DELETE"])
    async def drain(request: Request) -> Response:
        if request.method == "DELETE":  # undo a drain
            if runtime.state == "draining":
                runtime.set_state("ready")
        elif runtime.state != "stopping":
            runtime.set_state("draining")
        return JSONResponse(runtime.health())

    app = mcp.streamable_http_app(
        streamable_http_path=MCP_PATH,
        # Host/Origin checks belong to the router, which faces clients; an instance listens on
        # loopback and trusts only the internal token, whatever Host the router forwards.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        max_request_body_size=settings.max_body_bytes,
        session_idle_timeout=settings.session_idle_timeout,
        host=identity.host,
    )
    server = mcp.session_manager.app
    server.get_tool_input_schema = _declared_header_schemas(server.get_tool_input_schema)
    calls = (
        None if tracing or not settings.direct_calls else _direct_calls(mcp, listing, settings.max_body_bytes)
    )
    gate = InternalTokenGate(
        app,
        mcp.session_manager.handle_request,
        runtime=runtime,
        token=settings.internal_token,
        answers=answers,
        calls=calls,
    )

    async def close_mcp_sessions() -> None:
        # The SDK has no public "close all sessions"; its discard path is what DELETE uses.
        manager: Any = mcp.session_manager
        for session_id, transport in list(getattr(manager, "_server_instances", {}).items()):
            with contextlib.suppress(Exception):
                await manager._discard_session(session_id, transport)

    runtime.close_mcp_sessions = close_mcp_sessions
    return gate, runtime


def _direct_calls(mcp: MCPServer[Any], listing: ToolListCache, max_body: int) -> DirectCalls | None:
    """The direct path for plain 2026-07-28 tool calls (instance/fastcall.py), taken while the
    server's middleware chain is the one it stands in for: the SDK's requestState boundary, the
    tools/list cache and the guard. Only with the SDK's SSE-capable answers (its default), which
    that path reproduces."""
    manager = mcp.session_manager
    chain = list(mcp.middleware)
    if getattr(manager, "json_response", True) or len(chain) != 3:
        return None
    boundary, cache, guard = chain
    if not (DirectCalls.boundary_ok(boundary) and cache is listing and isinstance(guard, ArgumentGuard)):
        return None

    def middleware_ok() -> bool:
        middleware = mcp.middleware
        return len(middleware) == 3 and all(a is b for a, b in zip(middleware, chain, strict=True))

    return DirectCalls(
        mcp,
        manager.handle_request,
        middleware=middleware_ok,
        boundary=boundary,
        guard=guard,
        lifespan_state=lambda: getattr(manager, "_lifespan_state", None),
        max_body=max_body,
    )


def _declared_header_schemas(
    lookup: Callable[[str], Mapping[str, Any] | None] | None,
) -> Callable[[str], Mapping[str, Any] | None] | None:
    """The SDK's tool input schema lookup for its `Mcp-Param-*` header check, answering None
    for a tool whose schema declares no header (`x-mcp-header`).

    The SDK checks every 2026-07-28 `tools/call` with arguments against the called tool's
    schema, walking the whole schema each time to find the declared headers; a schema that
    declares none can fail no such check, and a None schema is how the SDK is told to skip
    it. Whether a schema declares any is worked out once per schema object."""
    if lookup is None:
        return None
    declares: dict[str, tuple[Mapping[str, Any], bool]] = {}

    def schema_with_headers(name: str) -> Mapping[str, Any] | None:
        schema = lookup(name)
        if schema is None:
            return None
        known = declares.get(name)
        if known is None or known[0] is not schema:
            known = declares[name] = (schema, bool(x_mcp_header_map(schema)))
        return schema if known[1] else None

    return schema_with_headers


def _tracing_configured() -> bool:
    """Whether this process exports OpenTelemetry traces: a tracer provider was installed before
    the app is built (e.g. by `opentelemetry-instrument`) or is named by OTEL_PYTHON_TRACER_PROVIDER."""
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _storage_metrics(runtime: Runtime) -> str:
    """Counters of the thread cache and the write-behind path, and whether Postgres is reachable
    and how many rows wait in the spool, in the Prometheus text format."""
    storage = runtime.storage
    if storage is None:
        return ""
    history, links = storage.history, runtime.links.stats() if runtime.links is not None else {}
    notes = storage.notes.cache.stats() if storage.notes.cache is not None else {}
    tracking = storage.tracker.stats() if storage.tracker is not None else {}
    counters = [
        ("exai_instance_thread_cache_checks_total",
         "Thread caches checked against Postgres (first read on a new Redis run).",
         history.cache_checks_total),
        ("exai_instance_thread_cache_marks_applied_total",
         "Thread caches dropped because a writer appended without reaching Redis.",
         history.marks_applied_total),
        ("exai_instance_thread_positions_after_commit_total",
         "Chat exchanges whose position came from Redis after their spool commit (not waited for).",
         history.positions_after_commit_total),
        ("exai_instance_thread_positions_recovered_total",
         "Exchanges a previous run spooled without their position, positioned again at start.",
         history.positions_recovered_total),
        ("exai_instance_spool_flushed_total", "Spool rows written to Postgres.",
         storage.flusher.flushed_total),
        ("exai_instance_spool_reads_skipped_total",
         "Thread loads served by a complete cache holding this process's unflushed turns.",
         history.spool_reads_skipped_total),
        ("exai_instance_notes_copy_hits_total", "Note scopes a chat read from their Redis copy.",
         notes.get("hits_total", 0)),
        ("exai_instance_notes_copy_misses_total", "Note scopes a chat read from Postgres (no copy).",
         notes.get("misses_total", 0)),
        ("exai_instance_notes_copy_refused_total",
         "Note copies not stored because a write committed while they were read.",
         notes.get("refused_total", 0)),
        ("exai_instance_link_events_spooled_total", "Link-group events taken into the spool.",
         links.get("spooled", 0)),
        ("exai_instance_link_events_refused_total",
         "Link-group events answered, then refused by the store (group deleted, sender not a member).",
         links.get("refused", 0)),
        ("exai_instance_redis_batched_total",
         "Redis reads that shared a pipelined round trip with others started at the same time.",
         storage.cache.batched_total),
        ("exai_instance_redis_line_total",
         "A chat's Redis commands answered on the storage's direct line (written at once).",
         storage.cache.line_commands_total),
        ("exai_instance_thread_tracked_hits_total",
         "Thread reads answered from the held copy while Redis reported no change (no round trip).",
         history.tracked_hits_total),
        ("exai_instance_thread_tracked_confirms_total",
         "Held thread copies confirmed after this process's own append (by its reply, or a read).",
         history.tracked_confirms_total),
        ("exai_instance_thread_tracked_appends_total",
         "Exchanges appended on the tracking connection (NOLOOP: no invalidation of their own).",
         history.tracked_appends_total),
        ("exai_instance_notes_tracked_hits_total",
         "Note scopes read from the held copy while Redis reported no change (no round trip).",
         notes.get("tracked_hits_total", 0)),
        ("exai_instance_notes_absent_skips_total",
         "Note scopes Redis was known to hold no copy of, read without asking it (Postgres, or down).",
         notes.get("absent_skips_total", 0)),
        ("exai_instance_redis_invalidations_total",
         "Keys Redis reported changed on the tracking connection (thread caches, note copies).",
         tracking.get("invalidations_total", 0)),
        ("exai_instance_redis_tracking_connects_total",
         "Times the tracking connection was set up (each starts a new epoch: nothing held is trusted).",
         tracking.get("connects_total", 0)),
        ("exai_instance_redis_tracking_losses_total",
         "Times the tracking connection was lost (held copies are read from Redis again).",
         tracking.get("losses_total", 0)),
        ("exai_instance_postgres_failed_fast_total",
         "Postgres operations refused at once because Postgres had stopped answering (no timeout waited).",
         storage.db.failed_fast_total),
        ("exai_instance_postgres_silences_total",
         "Times an operation timed out and Postgres was taken as not answering until a probe reached it.",
         storage.db.silences_total),
    ]  # fmt: skip
    gauges = [
        ("exai_instance_postgres_silent",
         "1 while Postgres does not answer (an operation timed out, and no probe has reached it since).",
         int(storage.db.silent)),
        ("exai_instance_postgres_connected",
         "1 while this instance reaches Postgres, 0 while it finds it unreachable (write-behind spools).",
         int(storage.db.connected)),
        ("exai_instance_spool_rows", "Rows in this instance's write-behind spool not yet in Postgres.",
         storage.spool.rows),
    ]  # fmt: skip
    lines = []
    for name, help_text, value in counters:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
    for name, help_text, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def _listing_metrics(listing: ToolListCache, answers: ListAnswers | None, calls: DirectCalls | None) -> str:
    """How `tools/list` (instance/tools/listing.py) and `tools/call` (instance/fastcall.py) were
    answered, in the Prometheus text format."""
    counters = [
        ("exai_instance_tools_list_built_total", "tools/list answers the SDK built.",
         listing.misses),
        ("exai_instance_tools_list_reused_total", "tools/list answers reused in the SDK's pipeline.",
         listing.hits),
        ("exai_instance_tools_list_bytes_reused_total",
         "2026-07-28 tools/list answers written from kept bytes.",
         answers.hits if answers is not None else 0),
        ("exai_instance_tools_call_direct_total",
         "2026-07-28 tools/call requests served by the SDK's handler straight from the gate.",
         calls.served if calls is not None else 0),
    ]  # fmt: skip
    lines = []
    for name, help_text, value in counters:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
    return "\n".join(lines) + "\n"


def _notifier(settings: Settings, redis: Any) -> Notifier:
    events = None
    if redis is not None:
        keys = Keys(settings.redis_prefix)
        events = EventLog(redis, keys, maxlen=settings.notify_log_maxlen, ttl=settings.session_idle_timeout)
    return Notifier(events, buffer=settings.notify_buffer)


async def _preload_and_freeze(families: list[tokens.Family]) -> None:
    """Load the tokenizers (on a thread), then leave everything startup made to the collector's
    permanent generation (`gc.freeze`). It lives as long as the process, and a full collection
    would otherwise walk it all each time: ~127,000 objects, the vocabularies among them, 60-100 ms
    with the event loop stopped, measured on the development machine; after the freeze a full
    collection walks only what was made since."""
    try:
        await asyncio.to_thread(tokens.preload, families)
    finally:  # (a tokenizer that failed to load is loaded at first use; startup is frozen anyway)
        gcpauses.freeze()
        gcpauses.install()


async def _open_storage(
    stack: contextlib.AsyncExitStack, settings: Settings, runtime: Runtime
) -> Storage | None:
    """Open the storage facade; without it the instance still answers, and says why tools fail."""
    try:
        return await stack.enter_async_context(
            Storage.open(
                settings,
                instance_id=runtime.identity.spool_name,
                redis=runtime.redis,
                on_flushed=lambda written: runtime.links.flushed(written) if runtime.links else None,
            )
        )
    except ExaiError as exc:
        runtime.storage_error = str(exc)
        log.error("storage could not start: %s", exc)
        return None


async def _flush(runtime: Runtime) -> None:
    storage = runtime.storage
    if storage is None:
        return
    timeout = runtime.settings.drain_timeout
    try:
        await storage.flush(timeout)
    except Exception as exc:
        log.error("spool flush on shutdown did not finish: %s (the spool replays on next start)", exc)
