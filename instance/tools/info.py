"""Tools that describe the instance itself: version, listmodels, status."""

from __future__ import annotations

import importlib.metadata
import time
from typing import Any

from mcp.server.mcpserver import Context, MCPServer

from common import gcpauses
from instance.runtime import Runtime
from instance.timing import chat_stages
from instance.tools import exai_tool, headers_of
from instance.workflows.catalog import PURPOSES as WORKFLOW_PURPOSES

TOOL_PURPOSES: dict[str, str] = {
    "chat": "Ask GLM or Kimi for a second opinion; threads continue across sessions and instances.",
    **WORKFLOW_PURPOSES,
    "listmodels": "The models this server can call, and every tool with its purpose.",
    "version": "Version of the server, its instance and the MCP SDK.",
    "status": "Health of the instance serving this session.",
}


def _sdk_version() -> str:
    """The installed MCP SDK's version. It reads package metadata from disk, so `register` asks
    once at startup: per call it was file I/O on the event loop and most of the tool's time."""
    try:
        return importlib.metadata.version("mcp")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    sdk_version = _sdk_version()

    @exai_tool(mcp, runtime, description="Version of this EXAI server, its instance and the MCP SDK.")
    async def version(ctx: Context) -> dict[str, Any]:
        return {
            "status": "success",
            "server": "exai-fleet",
            "version": runtime.version,
            "instance_id": runtime.identity.id,
            "mcp_sdk": sdk_version,
            "protocol": ctx.protocol_version,
            "eras": ["handshake (2024-11-05 … 2025-11-25)", "stateless (2026-07-28)"],
        }

    @exai_tool(
        mcp, runtime, description="Models this server can call, with context windows and availability."
    )
    async def listmodels(ctx: Context) -> dict[str, Any]:
        providers = runtime.providers
        models = providers.models() if providers else []
        configured = sorted(providers.clients) if providers else []
        return {
            "status": "success",
            "default_model": runtime.settings.default_model,
            "configured_providers": configured,
            "models": models,
            "tools": [{"name": name, "purpose": purpose} for name, purpose in TOOL_PURPOSES.items()],
            "note": "model='auto' picks the default model if its provider has a key, else any configured one."
            + ("" if configured else " No provider is configured: set GLM_API_KEY and/or KIMI_API_KEY."),
        }

    @exai_tool(
        mcp, runtime, description="Instance health: bound session, provider limits, spool backlog, pool."
    )
    async def status(ctx: Context) -> dict[str, Any]:
        storage = runtime.storage
        backlog = storage.backlog() if storage is not None else None
        pool = storage.pool_stats() if storage is not None else None
        binding = runtime.binding
        return {
            "status": "success",
            "instance_id": runtime.identity.id,
            "state": runtime.state,
            "port": runtime.identity.port,
            "pid": runtime.pid,
            "uptime_s": round(time.time() - runtime.started_at, 1),
            "session": runtime.session_for(headers_of(ctx)),
            "bound_session": binding.session if binding else None,
            "principal": binding.principal if binding else None,
            "client": binding.client if binding else None,
            "era": binding.era if binding else None,
            "inflight": runtime.inflight,
            "calls_total": runtime.calls_total,
            "providers": runtime.providers.limits() if runtime.providers else {},
            "storage": {
                "available": storage is not None,
                "error": runtime.storage_error,
                "backlog": backlog,
                "pool": pool,
            },
            # Notifications for the session's router-held streams: published, queued while Redis
            # is unreachable, and dropped because EXAI_NOTIFY_BUFFER was full.
            "notifications": runtime.notifier.stats() if runtime.notifier else None,
            "links": runtime.links.stats() if runtime.links else None,
            "link_stages": runtime.links.stage_stats() if runtime.links else None,
            # Where this instance's chat calls spent their time (fleet = total - provider).
            "chat_stages": chat_stages.summary(),
            # The garbage collector's pauses (common/gcpauses.py), counted once startup is frozen.
            "gc": gcpauses.summary(),
        }
