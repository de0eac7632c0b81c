"""Every tools/call goes through here: arguments checked first, every error in the fleet's shape.

The SDK validates types but drops unknown keys, so `continuation="…"` (for continuation_id)
would quietly start a new thread; it answers an unknown tool with `Unknown tool: x`, a bad
argument with pydantic's multi-line dump, and prefixes tool errors with `Error executing tool
x:`. This middleware checks the tool name and the arguments against the tool's JSON Schema
before the tool runs (so nothing is paid for or written on a bad call), and rewrites whatever
error text still comes back into `[code] what happened. what to do.`

The schema is the SDK's own argument model's (`Tool.parameters`), so a strict validation by
that pydantic model (a few microseconds) accepts only arguments the JSON Schema accepts too:
it passes good calls on at once, and anything it refuses goes to jsonschema (tens of
microseconds), which decides and words the error exactly as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import jsonschema
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent

from common.errors import ExaiError, InternalError, InvalidArgument, UnknownTool

_PREFIX = re.compile(r"^Error executing tool [^:]*: ?")
# One error of pydantic's ValidationError text: the field path line, then the indented message.
_PYDANTIC_ERROR = re.compile(r"^(?P<loc>\S[^\n]*)\n {2}(?P<msg>[^\n\[]+?)\s*(?:\[|$)", re.MULTILINE)
MAX_SHOWN = 3


def _error_result(exc: ExaiError) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=f"[{exc.code}] {exc}")], is_error=True)


def _where(path: Any) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "arguments"


def _schema_errors(validator: jsonschema.protocols.Validator, arguments: Mapping[str, Any]) -> str | None:
    errors = sorted(validator.iter_errors(dict(arguments)), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        return None
    shown = []
    for err in errors[:MAX_SHOWN]:
        message = err.message if len(err.message) <= 300 else err.message[:300] + "…"
        shown.append(f"{_where(err.absolute_path)}: {message}")
    more = f" (and {len(errors) - MAX_SHOWN} more)" if len(errors) > MAX_SHOWN else ""
    return "; ".join(shown) + more


def shaped_error_text(text: str, tool: str) -> str:
    """Any error text the SDK produced for `tool`, as `[code] what happened. what to do.`"""
    text = _PREFIX.sub("", text, count=1).strip()
    if text.startswith("["):
        return text
    if "validation error" in text.split("\n", 1)[0]:
        found = [f"{m['loc'].strip()}: {m['msg'].strip()}" for m in _PYDANTIC_ERROR.finditer(text)]
        what = "; ".join(found[:MAX_SHOWN]) or "the arguments do not match the tool's schema"
        exc: ExaiError = InvalidArgument(
            f"bad argument for {tool}: {what}", hint="Fix the argument; tools/list shows each tool's schema."
        )
    else:
        exc = InternalError(f"the {tool} tool failed ({text or 'no details'})")
    return f"[{exc.code}] {exc}"


def _strict_check(mcp: MCPServer[Any], name: str, schema: Mapping[str, Any]) -> Callable[[Any], Any] | None:
    """The strict validation of the SDK's argument model for tool `name`, if its JSON Schema is
    exactly that model's (then strict acceptance implies schema acceptance); None otherwise."""
    manager = getattr(mcp, "_tool_manager", None)
    tool = manager.get_tool(name) if manager is not None else None
    model = getattr(getattr(tool, "fn_metadata", None), "arg_model", None)
    if tool is None or model is None or dict(tool.parameters) != dict(schema):
        return None
    validate = model.model_validate

    def check(arguments: Any) -> Any:
        return validate(arguments, strict=True)

    return check


class ArgumentGuard:
    """The middleware: a tools/call's tool and arguments checked before the tool runs, and any
    error text coming back reshaped. Its two halves (`refusal`, `shape`) are also what the
    instance's direct call path (instance/fastcall.py) asks, so both paths answer alike."""

    def __init__(self, mcp: MCPServer[Any]) -> None:
        self._mcp = mcp
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        self._properties: dict[str, frozenset[str]] = {}
        self._strict: dict[str, Callable[[Any], Any]] = {}

    @property
    def loaded(self) -> bool:
        return bool(self._validators)

    async def load(self) -> None:
        for tool in await self._mcp.list_tools():
            schema = dict(tool.input_schema or {})
            cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
            self._validators[tool.name] = cls(schema)
            self._properties[tool.name] = frozenset(schema.get("properties", {}))
            check = _strict_check(self._mcp, tool.name, schema)
            if check is not None:
                self._strict[tool.name] = check

    def _fits(self, tool: str, arguments: Mapping[str, Any]) -> bool:
        """Whether the strict pre-check accepts the arguments (False: ask jsonschema)."""
        check = self._strict.get(tool)
        if check is None:
            return False
        try:
            check(arguments)
        except Exception:  # refused (or could not tell): jsonschema decides and words it
            return False
        return True

    def refusal(self, name: Any, arguments: Any) -> CallToolResult | None:
        """The error result for a call of tool `name` with `arguments` (None: the tool may run).
        Call `load` first."""
        arguments = {} if arguments is None else arguments
        tool = str(name)
        validator = self._validators.get(tool)
        if validator is None:
            known = ", ".join(sorted(self._validators))
            return _error_result(
                UnknownTool(
                    f"there is no tool named {tool[:100]!r}",
                    hint=f"Call one of this server's tools ({known}); tools/list describes them.",
                )
            )
        if not isinstance(arguments, Mapping):
            return _error_result(InvalidArgument(f"the arguments of {tool} must be a JSON object"))
        unknown = sorted(set(arguments) - self._properties[tool])
        if unknown:
            return _error_result(
                InvalidArgument(
                    f"unknown argument(s) {', '.join(u[:100] for u in unknown[:10])} for tool {tool}",
                    hint=f"Valid arguments: {', '.join(sorted(self._properties[tool]))}.",
                )
            )
        problem = None if self._fits(tool, arguments) else _schema_errors(validator, arguments)
        if problem is not None:
            return _error_result(
                InvalidArgument(
                    f"bad argument for {tool}: {problem}",
                    hint="Fix the argument; tools/list shows the schema.",
                )
            )
        return None

    @staticmethod
    def shape(result: Any, tool: str) -> Any:
        """An error result's texts in the fleet's shape (in place); others as they are."""
        # The chain hands back the wire form (a dict); a model only if a middleware built one.
        if isinstance(result, CallToolResult) and result.is_error:
            for block in result.content:
                if isinstance(block, TextContent):
                    block.text = shaped_error_text(block.text, tool)
        elif isinstance(result, dict) and result.get("isError"):
            for item in result.get("content") or []:
                text = item.get("text") if isinstance(item, dict) else None
                if isinstance(text, str):
                    item["text"] = shaped_error_text(text, tool)
        return result

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        params = ctx.params
        if ctx.method != "tools/call" or not isinstance(params, Mapping):
            return await call_next(ctx)
        if not self._validators:
            await self.load()
        name = params.get("name")
        refused = self.refusal(name, params.get("arguments"))
        if refused is not None:
            return refused
        return self.shape(await call_next(ctx), str(name))


def unknown_argument_guard(mcp: MCPServer[Any]) -> ArgumentGuard:
    return ArgumentGuard(mcp)
