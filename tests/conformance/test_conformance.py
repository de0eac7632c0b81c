"""The official MCP conformance suite (`@modelcontextprotocol/conformance`) against the router.

The suite is a Node program from the npm registry, pinned in tests/conformance/package.json
(0.1.13: the newest release that runs on Node 20) and installed into node_modules on first use
with `npm ci`. It connects with the TypeScript SDK's Streamable HTTP client, so this is also a
second SDK talking to the fleet through the router.

Most of the suite's server scenarios call fixtures of its reference "everything" server (tools
named `test_image_content`, `test://` resources, sample prompts) that EXAI does not have; the
scenarios run here are the protocol-level ones any MCP server must pass. Each check the suite
reports must be SUCCESS (or INFO/WARNING, which are not failures by the suite's own rules).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import node
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS

pytestmark = pytest.mark.timeout(300)

HERE = Path(__file__).parent
SCENARIOS = [
    "server-initialize",
    "ping",
    "tools-list",
    "tools-call-error",
    "resources-list",
    "prompts-list",
    "server-sse-multiple-streams",
    "dns-rebinding-protection",
]


@pytest.fixture(scope="module")
def suite() -> Path:
    return node.installed(HERE, "node_modules/.bin/conformance", timeout=300)


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet]) -> Fleet:
    return module_fleet_factory(instances=2, max_instances=4, **ROUTER_TEST_SETTINGS)


async def run_scenario(cli: Path, url: str, scenario: str, out: Path) -> list[dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        str(cli), "server", "--url", url, "--scenario", scenario, "-o", str(out),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=HERE,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), 120)
    checks = read_checks(out)
    assert checks is not None, f"{scenario}: no checks.json:\n{output.decode(errors='replace')[-2000:]}"
    return checks


def read_checks(out: Path) -> list[dict[str, Any]] | None:
    results = sorted(out.glob("*/checks.json"))
    return list(json.loads(results[-1].read_text())) if results else None


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_protocol_scenarios_of_the_official_suite_pass_through_the_router(
    fleet: Fleet, suite: Path, scenario: str, tmp_path: Path
) -> None:
    checks = await run_scenario(suite, fleet.mcp_url, scenario, tmp_path)
    assert checks, f"{scenario}: no checks ran"
    failed = [c for c in checks if c["status"] in ("FAILURE", "ERROR")]
    assert not failed, json.dumps(failed, indent=1)[:3000]
    await fleet.end_all_sessions()
