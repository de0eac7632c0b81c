"""Check a tools/call against the tool's schema before it runs, and say clearly what is wrong.

The SDK validates types but drops unknown keys, so `continuation="…"` (for continuation_id)
would quietly start a new thread; and its own messages for unknown tools and bad types are not
in the fleet's `[code] what happened. what to do.` shape. This middleware refuses unknown
tools, unknown argument names and arguments that do not match the schema (wrong type, value
out of range, not one of an enum) with such messages, before the tool is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent
from pydantic import BaseModel

from common.errors import ExaiError, InvalidArgument, UnknownTool

MAX_PROBLEMS = 5


def _refuse(error: ExaiError) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=f"[{error.code}] {error}")], is_error=True)


def _where(error: ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return path or "arguments"


def _problem(error: ValidationError) -> str:
    """One line per problem; for a failed anyOf (an optional field) the most specific reason."""
    if error.validator == "anyOf" and error.context:
        best = min(error.context, key=lambda e: e.validator == "type" and e.validator_value == "null")
        return f"{_where(error)}: {best.message}"
    return f"{_where(error)}: {error.message}"


def _refused_by_sdk(result: HandlerResult, name: str) -> bool:
    """True for the SDK's argument-validation error (our tools' own errors carry a [code])."""
    data = result.model_dump(by_alias=True) if isinstance(result, BaseModel) else result
    if not isinstance(data, dict) or not data.get("isError") or not data.get("content"):
        return False
    text = data["content"][0].get("text") if isinstance(data["content"][0], dict) else None
    prefix = f"Error executing tool {name}: "
    return isinstance(text, str) and text.startswith(prefix) and not text[len(prefix) :].startswith("[")


def unknown_argument_guard(mcp: MCPServer[Any]) -> Any:
    tools: dict[str, tuple[frozenset[str], Draft202012Validator]] = {}

    async def guard(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = ctx.params
        if ctx.method != "tools/call" or not isinstance(params, Mapping):
            return await call_next(ctx)
        arguments = params.get("arguments") or {}
        if not tools:
            for tool in await mcp.list_tools():
                schema = tool.input_schema or {}
                tools[tool.name] = (frozenset(schema.get("properties", {})), Draft202012Validator(schema))
        name = str(params.get("name"))
        if name not in tools:
            return _refuse(
                UnknownTool(
                    f"this server has no tool named {name!r}.",
                    hint=f"Call one of: {', '.join(sorted(tools))} (tools/list describes them).",
                )
            )
        names, validator = tools[name]
        if not isinstance(arguments, Mapping):
            return await call_next(ctx)
        unknown = sorted(set(arguments) - names)
        if unknown:
            return _refuse(
                InvalidArgument(
                    f"unknown argument(s) {', '.join(unknown)} for tool {name}.",
                    hint=f"Valid arguments: {', '.join(sorted(names))}.",
                )
            )
        problems = sorted(validator.iter_errors(dict(arguments)), key=lambda e: list(e.absolute_path))
        if not problems:
            return await call_next(ctx)
        # The SDK's own validation is lenient where JSON Schema is strict (it accepts "3" for an
        # integer, as EXAI did), so the call goes ahead; only if the SDK refuses it too does the
        # client get the schema's account of what is wrong.
        result = await call_next(ctx)
        if _refused_by_sdk(result, name):
            listed = "; ".join(_problem(p) for p in problems[:MAX_PROBLEMS])
            more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
            return _refuse(
                InvalidArgument(
                    f"invalid arguments for tool {name}: {listed}{more}.",
                    hint="Fix the named arguments; tools/list gives their types, ranges and allowed values.",
                )
            )
        return result

    return guard
