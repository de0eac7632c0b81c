"""Refuse tool arguments the tool does not have, instead of silently ignoring a typo.

The SDK validates types but drops unknown keys, so `continuation="…"` (for continuation_id)
would quietly start a new thread. This middleware checks names against each tool's schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent


def unknown_argument_guard(mcp: MCPServer[Any]) -> Any:
    allowed: dict[str, frozenset[str]] = {}

    async def guard(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = ctx.params
        if ctx.method != "tools/call" or not isinstance(params, Mapping):
            return await call_next(ctx)
        arguments = params.get("arguments") or {}
        if not allowed:
            for tool in await mcp.list_tools():
                allowed[tool.name] = frozenset((tool.input_schema or {}).get("properties", {}))
        names = allowed.get(str(params.get("name")))
        if names is None or not isinstance(arguments, Mapping):
            return await call_next(ctx)
        unknown = sorted(set(arguments) - names)
        if not unknown:
            return await call_next(ctx)
        text = (
            f"[invalid_argument] unknown argument(s) {', '.join(unknown)} for tool {params.get('name')}. "
            f"Valid arguments: {', '.join(sorted(names))}."
        )
        return CallToolResult(content=[TextContent(type="text", text=text)], is_error=True)

    return guard
