"""Registers EXAI's workflow tools: one registration per catalog entry, all run by one engine.

The SDK builds a tool's input schema from its function's signature, so each tool gets a
signature made from its description's fields (each with its own description), and a body that
hands the arguments to the engine.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Annotated, Any

from mcp.server.mcpserver import Context, MCPServer

from instance.runtime import Runtime
from instance.tools import exai_tool
from instance.workflows.catalog import SPECS
from instance.workflows.catalog.deliberation import CHALLENGE_DESCRIPTION
from instance.workflows.engine import Engine
from instance.workflows.spec import REQUIRED, FieldSpec, ThinkingMode, WorkflowSpec


def signature(fields: Iterable[FieldSpec]) -> inspect.Signature:
    params = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Annotated[f.annotation, f.field()],
            default=inspect.Parameter.empty if f.default is REQUIRED else f.default,
        )
        for f in fields
    ]
    params.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context))
    return inspect.Signature(params, return_annotation=dict[str, Any])


def _register_step_tool(mcp: MCPServer[Any], runtime: Runtime, engine: Engine, spec: WorkflowSpec) -> None:
    async def tool(ctx: Context, **arguments: Any) -> dict[str, Any]:
        return await engine.step(spec, ctx, arguments)

    tool.__name__ = tool.__qualname__ = spec.name
    tool.__signature__ = signature(spec.fields())  # type: ignore[attr-defined]
    tool.__annotations__ = {"ctx": Context, "return": dict[str, Any]}
    exai_tool(mcp, runtime, description=spec.description)(tool)


CHALLENGE_FIELDS = (
    FieldSpec(
        "prompt",
        str,
        "The statement to reassess critically: the user's message as they wrote it (without a leading "
        "'challenge').",
        REQUIRED,
        {"min_length": 1},
    ),
    FieldSpec(
        "continuation_id",
        str | None,
        "Thread id from an earlier answer of any tool, to record the challenge in that thread.",
        None,
    ),
    FieldSpec("model", str, "Model for use_assistant_model (see listmodels) or 'auto'.", "auto"),
    FieldSpec(
        "use_assistant_model",
        bool,
        "Also ask GLM or Kimi for a critical assessment of the statement (one model call).",
        False,
    ),
    FieldSpec(
        "temperature", float | None, "Sampling temperature of the model call.", None, {"ge": 0.0, "le": 2.0}
    ),
    FieldSpec("thinking_mode", ThinkingMode | None, "Reasoning depth of the model call.", None),
)


def _register_challenge(mcp: MCPServer[Any], runtime: Runtime, engine: Engine) -> None:
    async def challenge(ctx: Context, **arguments: Any) -> dict[str, Any]:
        return await engine.challenge(ctx, arguments)

    challenge.__signature__ = signature(CHALLENGE_FIELDS)  # type: ignore[attr-defined]
    challenge.__annotations__ = {"ctx": Context, "return": dict[str, Any]}
    exai_tool(mcp, runtime, description=CHALLENGE_DESCRIPTION)(challenge)


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    engine = Engine(runtime)
    for spec in SPECS:
        _register_step_tool(mcp, runtime, engine, spec)
    _register_challenge(mcp, runtime, engine)
