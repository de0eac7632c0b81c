"""The client snippets in deploy/clients/ work as written, against a real fleet.

Every server entry of every JSON snippet (Claude Code's .mcp.json, Claude Desktop's config,
VS Code's .vscode/mcp.json, Cursor's .cursor/mcp.json) is connected the way the client would:
a `command` entry is started as a stdio server by the Python SDK's stdio client (same command,
args and env), a `url` entry is reached by the SDK's Streamable HTTP client with its headers.
Only the snippets' placeholders change: the router URL and the token.

Claude Code itself runs here too (the CLI from npm, installed on demand into
tests/bridge/claude-code): `claude mcp add-json` takes each entry of claude-code.mcp.json and
`claude mcp list` must report it connected. The IDEs (VS Code, Cursor, Claude Desktop) cannot
run on this machine; their snippets are exercised by the SDK clients above.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import mcp_types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests import node
from tests.bridge.conftest import BRIDGE, TOKEN
from tests.fleet import Fleet

pytestmark = pytest.mark.timeout(240)

CLIENTS = Path(__file__).resolve().parents[2] / "deploy" / "clients"
SNIPPETS = sorted(CLIENTS.glob("*.json"))
DEFAULT_URL = "http://127.0.0.1:8079/mcp"
PLACEHOLDER = re.compile(r"\$\{[^}]+\}|<token>")
CLAUDE_CODE_DIR = Path(__file__).parent / "claude-code"


def _fill(value: Any, fleet: Fleet) -> Any:
    """The snippet's value with this fleet's URL and token in place of the placeholders."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(TOKEN, value.replace(DEFAULT_URL, fleet.mcp_url))
    if isinstance(value, list):
        return [_fill(v, fleet) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, fleet) for k, v in value.items()}
    return value


def _entries(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text())
    return dict(data.get("mcpServers") or data["servers"])


@contextlib.asynccontextmanager
async def _connect(entry: dict[str, Any], tmp_path: Path) -> AsyncIterator[Client]:
    info = mcp_types.Implementation(name="snippet", version="1")
    if "command" in entry:
        assert entry["command"] == "exai-bridge"
        params = StdioServerParameters(
            command=BRIDGE, args=entry.get("args", []), env=entry.get("env", {}), cwd=tmp_path
        )
        async with Client(params, mode="legacy", client_info=info) as client:
            yield client
        return
    async with (
        httpx2.AsyncClient(headers=entry.get("headers", {}), timeout=30) as http,
        Client(streamable_http_client(entry["url"], http_client=http), mode="legacy", client_info=info) as c,
    ):
        yield c


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[p.name for p in SNIPPETS])
async def test_every_snippet_entry_connects(fleet: Fleet, snippet: Path, tmp_path: Path) -> None:
    entries = _entries(snippet)
    assert entries
    for name, raw in entries.items():
        async with _connect(_fill(raw, fleet), tmp_path) as client:
            result = await client.call_tool("version", {})
            assert not result.is_error, (snippet.name, name, result)


@pytest.fixture(scope="module")
def claude() -> Path:
    return node.installed(CLAUDE_CODE_DIR, "node_modules/.bin/claude")


async def test_claude_code_connects_with_the_snippet(fleet: Fleet, claude: Path, tmp_path: Path) -> None:
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EXAI_", "ANTHROPIC_", "CLAUDE"))},
        "HOME": str(home),
        "PATH": f"{Path(BRIDGE).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }

    async def run(*args: str) -> str:
        pipe = asyncio.subprocess
        proc = await asyncio.create_subprocess_exec(
            str(claude), *args, cwd=project, env=env, stdin=pipe.DEVNULL, stdout=pipe.PIPE, stderr=pipe.STDOUT
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    entries = _entries(CLIENTS / "claude-code.mcp.json")
    for name, raw in entries.items():
        await run("mcp", "add-json", name, json.dumps(_fill(raw, fleet)))
    listing = await run("mcp", "list")
    for name in entries:
        line = next((ln for ln in listing.splitlines() if ln.startswith(f"{name}:")), "")
        assert "Connected" in line, listing
