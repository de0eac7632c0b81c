"""Placeholder until storage lands."""

from __future__ import annotations

from typing import Any

from mcp.server.mcpserver import MCPServer

from instance.runtime import Runtime


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    return None
