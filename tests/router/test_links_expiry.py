"""A linked session that simply goes away (no DELETE, as a 2026-07-28 client never sends one)
leaves its groups when it expires, with its handoff note, in-progress tasks and reservations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, call, mcp_client, status_of

pytestmark = pytest.mark.timeout(240)

IDLE = 3.0  # EXAI_SESSION_IDLE_TIMEOUT of this module's fleet


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=2,
        max_instances=2,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        session_idle_timeout=IDLE,
        session_park_after=1.0,
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet) -> AsyncIterator[None]:
    yield
    await fleet.end_all_sessions()


async def test_an_expired_member_hands_off(fleet: Fleet) -> None:
    group = "expiry"
    async with mcp_client(fleet.mcp_url, "legacy", name="stays") as b:
        # A: a 2026-07-28 client that does its work and then is never heard from again.
        async with mcp_client(fleet.mcp_url, "2026-07-28", name="goes-away") as a:
            a_sid = (await status_of(a))["session"]
            await call(a, "link_join", {"group": group})
            await call(b, "link_join", {"group": group})
            await call(a, "link_handoff", {"group": group, "note": "half way"})
            task = (await call(a, "task_create", {"name": "the parser", "state": "IN_PROGRESS"}))["task"]
            await call(a, "link_reserve", {"group": group, "paths": ["src/**"], "ttl": 600})
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(60):  # B keeps calling (so B stays); A expires after IDLE s
            while not any(e["kind"] == "leave" for e in events):
                events += (await call(b, "link_inbox", {"group": group}))["events"]
                await asyncio.sleep(0.2)
        (leave,) = [e for e in events if e["kind"] == "leave"]
        assert (leave["from"], leave["body"], leave["data"]["reason"]) == (a_sid, "half way", "expired")
        assert leave["data"]["in_progress"] == [{"task_id": task["id"], "name": "the parser"}]
        assert leave["data"]["released"] == [{"pattern": "src/**", "exclusive": True}]
        await call(b, "link_reserve", {"group": group, "paths": ["src/a.py"]})  # free now
        async with aiohttp.ClientSession() as http:  # and the admin no longer lists A
            async with http.get(
                f"{fleet.router_url}/admin/links/{group}", headers=fleet.admin_headers()
            ) as r:
                members = (await r.json())["members"]
        assert [m["client"] for m in members] == ["stays"]
