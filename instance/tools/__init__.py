"""The EXAI tools, registered on one MCPServer; each module holds one family of tools.

`register_tools` is the only entry point. Every tool goes through `exai_tool`, which is the
single place where fleet errors become MCP tool errors: an `ExaiError` turns into an isError
result that names its code, says what happened and what to do; anything else is logged with
its traceback here and reported to the client as one line.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from starlette.datastructures import Headers

from common.errors import ExaiError
from instance.after_answer import after_answer
from instance.link_notices import attach, notices_text
from instance.runtime import Runtime
from instance.timing import mark_tool
from instance.tools.listing import ToolListCache

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def describe_error(exc: ExaiError) -> str:
    """One paragraph for the person reading the tool result: code, what happened, what to do."""
    return f"[{exc.code}] {exc}"


def _context_of(kwargs: dict[str, Any]) -> Context | None:
    for value in kwargs.values():
        if isinstance(value, Context):
            return value
    return None


_last_headers: tuple[Any, dict[str, str]] | None = None
"""The most recent request's headers and their plain copy (the Headers object is held, so its
identity cannot be reused while it is the key)."""


def headers_of(ctx: Context | None) -> dict[str, str]:
    """The call's HTTP headers as a plain dict (names as the transport gives them: lowercase;
    of a repeated header, its first value). A tool asks several times per call: the copy is
    made once per request and handed out as a fresh dict each time."""
    global _last_headers
    if ctx is None:
        return {}
    try:
        headers = ctx.headers
    except ValueError:
        return {}
    if not headers:
        return {}
    last = _last_headers
    if last is not None and last[0] is headers:
        return dict(last[1])
    plain: dict[str, str]
    if isinstance(headers, Headers):
        # dict(Headers) looks every name up again in the raw list (quadratic); this keeps, as
        # that lookup does, the first value of a repeated name, in the same order.
        plain = {}
        for name, value in headers.items():
            plain.setdefault(name, value)
    else:
        plain = dict(headers)
    _last_headers = (headers, plain)
    return dict(plain)


def exai_tool(mcp: MCPServer[Any], runtime: Runtime, *, description: str) -> Callable[[F], F]:
    """Register `fn` as a tool with the fleet's error mapping, call counting and telemetry."""

    def decorate(fn: F) -> F:
        name = fn.__name__.removesuffix("_tool")
        assert inspect.iscoroutinefunction(fn), name

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            clock = mark_tool(name)
            ctx = _context_of(kwargs)
            headers = headers_of(ctx)
            runtime.observe(headers)
            await _touch_session(runtime)
            if runtime.links is not None:
                await runtime.links.join_from_header(headers)
            started = time.perf_counter()
            status, error = "success", None
            notices = runtime.notices
            try:
                async with runtime.call():
                    result = await fn(*args, **kwargs)
                if notices.owed and isinstance(result, dict):  # words owed to this session?
                    owed = notices.take(runtime.session_for(headers))
                    if owed:
                        result = attach(result, owed)
                return result
            except ExaiError as exc:
                status, error = "error", exc.code
                owed = notices.take(runtime.session_for(headers)) if notices.owed else []
                raise ToolError(describe_error(exc) + notices_text(owed)) from None
            except ToolError as exc:
                status, error = "error", "tool_error"
                if notices.owed and (owed := notices.take(runtime.session_for(headers))):
                    raise ToolError(str(exc) + notices_text(owed)) from None
                raise
            except Exception as exc:
                status, error = "error", "internal_error"
                log.exception("tool %s failed", name)
                raise ToolError(
                    f"[internal_error] the {name} tool failed unexpectedly ({type(exc).__name__}: {exc}). "
                    f"The log of instance {runtime.identity.id} has the details; retrying may help."
                ) from None
            finally:
                _record(runtime, name, headers, status, error, time.perf_counter() - started)
                if clock is not None:
                    clock.returned = time.perf_counter()

        mcp.tool(name=name, description=description)(wrapper)
        return cast(F, wrapper)

    return decorate


def _record(
    runtime: Runtime, name: str, headers: dict[str, str], status: str, error: str | None, seconds: float
) -> None:
    """Telemetry goes to the write-behind spool in the background once the answer is written
    (instance/after_answer.py); it must never fail or slow a call."""
    storage = runtime.storage
    if storage is None:
        return
    session_id = runtime.session_for(headers)
    after_answer(
        lambda: runtime.background(
            storage.record_tool_call(
                session_id=session_id,
                instance_id=runtime.identity.id,
                tool_name=name,
                status=status,
                duration_ms=seconds * 1000.0,
                error=error,
            ),
            what=f"recording the {name} call",
        )
    )


async def _touch_session(runtime: Runtime) -> None:
    """Record the bound session once per binding, so `sessions` shows who used this instance
    (in the background, once the answer is written: instance/after_answer.py)."""
    binding = runtime.binding
    storage = runtime.storage
    if binding is None or binding.recorded or storage is None:
        return
    binding.recorded = True
    after_answer(
        lambda: runtime.background(
            storage.touch_session(
                session_id=binding.session,
                principal=binding.principal,
                client_name=binding.client,
                era=binding.era,
            ),
            what="recording the session",
        )
    )


def register_tools(mcp: MCPServer[Any], runtime: Runtime) -> ToolListCache:
    """Register every tool and the middleware around them; returns the `tools/list` cache."""
    from instance.tools import chat, files, info, notes, tasks
    from instance.tools.guard import unknown_argument_guard
    from instance.tools.workflows import register as register_workflows

    for module in (info, chat, tasks, notes, files):
        module.register(mcp, runtime)
    register_workflows(mcp, runtime)
    from instance.tools import links

    links.register(mcp, runtime)
    listing = ToolListCache(mcp)
    mcp.middleware.append(listing)
    mcp.middleware.append(unknown_argument_guard(mcp))
    return listing
