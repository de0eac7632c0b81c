"""Linked sessions across a Redis restart (a Redis of this module's own; the shared one is never touched).

Group state and the event log are in Postgres, so link tools keep working while Redis is down;
the inbox notifications published meanwhile are held by the instance and delivered when Redis
returns; the receiver ends with every message once, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import mcp_types
import pytest

from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.redis_server import OwnRedis
from tests.router.conftest import ROUTER_TEST_SETTINGS, inbox_when_served, instance_num, mcp_client, status_of
from tests.router.test_links import call

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def fleet(own_redis: OwnRedis, module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=2,
        max_instances=2,
        redis_url=own_redis.url,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        **ROUTER_TEST_SETTINGS,
    )


async def test_messages_sent_while_redis_restarts_arrive_once_in_order(
    fleet: Fleet, own_redis: OwnRedis
) -> None:
    group = "outage"
    inbox = f"exai://link/{group}/inbox"
    updates: list[str] = []

    async def on_b(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    await fleet.wait_instances(2)
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="sender") as a,
        mcp_client(fleet.mcp_url, "legacy", name="receiver", message_handler=on_b) as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        received: list[dict[str, Any]] = []
        for i in range(50):
            await call(a, "link_send", {"group": group, "body": f"m{i}"})
        received += (await call(b, "link_inbox", {"group": group, "limit": 30}))["events"]

        own_redis.kill()
        try:
            for i in range(50, 150):  # tools keep working from Postgres while Redis is down
                await call(a, "link_send", {"group": group, "body": f"m{i}"})
            received += (await call(b, "link_inbox", {"group": group, "limit": 60}))["events"]
            seen_before = len(updates)
        finally:
            own_redis.start()

        # What the instance held while Redis was down reaches B's stream once Redis is back.
        async with asyncio.timeout(40):
            while len(updates) == seen_before:  # noqa: ASYNC110 - waiting for a server push
                await asyncio.sleep(0.1)
        assert set(updates) == {inbox}
        for i in range(150, 200):
            await call(a, "link_send", {"group": group, "body": f"m{i}"})
        async with asyncio.timeout(30):  # sends reach Postgres a moment after they answered
            while len(received) < 200:
                received += (await call(b, "link_inbox", {"group": group, "limit": 45}))["events"]
                await asyncio.sleep(0.05)
        assert [e["body"] for e in received] == [f"m{i}" for i in range(200)]
        ids = [e["id"] for e in received]
        assert ids == sorted(set(ids))


async def test_the_group_tools_answer_from_postgres_while_redis_is_down(
    fleet: Fleet, own_redis: OwnRedis
) -> None:
    """Not only link_send: status, reservations (and their conflicts), group tasks and notes,
    handoff notes and leaving all work from Postgres while Redis is down."""
    group = "outage-tools"
    await fleet.wait_instances(2)
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="holder") as a,
        mcp_client(fleet.mcp_url, "legacy", name="other") as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        await call(b, "link_inbox", {"group": group})
        own_redis.kill()
        try:
            status = await call(a, "link_status", {"group": group})
            assert {m["client"] for m in status["members"]} == {"holder", "other"}
            assert {m["state"] for m in status["members"]} == {"unknown"}  # presence lives in Redis
            await call(a, "link_reserve", {"group": group, "paths": ["src/**"], "ttl": 600})
            refused = await b.call_tool("link_reserve", {"group": group, "paths": ["src/a.py"]})
            assert refused.is_error and "reservation_conflict" in refused.content[0].text  # type: ignore[union-attr]
            task = (await call(a, "task_create", {"name": "t", "scope": "group", "group": group}))["task"]
            await call(a, "note_write", {"key": "k", "body": "v", "scope": "group", "group": group})
            await call(a, "link_handoff", {"group": group, "note": "over to you"})
            assert (await call(a, "link_leave", {"group": group}))["left"] is True
        finally:
            own_redis.start()
        async with asyncio.timeout(30):
            events: list[dict[str, Any]] = []
            while not events or events[-1]["kind"] != "leave":
                events += (await call(b, "link_inbox", {"group": group}))["events"]
                await asyncio.sleep(0.05)
        assert [e["kind"] for e in events] == ["reserve", "task", "note", "leave"]
        assert events[1]["data"]["task_id"] == task["id"] and events[-1]["body"] == "over to you"
        await call(b, "link_reserve", {"group": group, "paths": ["src/a.py"]})  # released on leave


async def test_200_messages_arrive_once_in_order_across_a_kill_and_a_redis_restart(
    fleet: Fleet, own_redis: OwnRedis
) -> None:
    """Both faults in one run: B's instance is killed with SIGKILL, then Redis goes down and
    comes back while A keeps sending. A is on the 2026-07-28 era, B on the handshake era; B reads
    with link_inbox throughout, retrying while it cannot be served, and ends with all 200
    messages, in order, each once.

    (With two instances, B's session takes an instance from the idle A while its own restarts:
    a session parked then cannot resume until Redis, which holds the session table, is back.
    So Redis goes down once supervisord has the killed instance serving again and both
    sessions are bound.)"""
    group = "both-faults"
    await fleet.wait_instances(2)
    async with (
        mcp_client(fleet.mcp_url, "2026-07-28", name="sender") as a,
        mcp_client(fleet.mcp_url, "legacy", name="receiver") as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        await call(b, "link_inbox", {"group": group})  # the joins: read
        b_instance = instance_num((await status_of(b))["instance_id"])
        received: list[dict[str, Any]] = []

        async def read_some() -> None:  # restarting, or Redis down: retried until B is served
            received.extend(await inbox_when_served(b, group, limit=29))

        redis_down = False
        try:
            for i in range(200):
                await call(a, "link_send", {"group": group, "body": f"m{i}"})
                if i == 40:
                    await read_some()
                    await asyncio.to_thread(fleet.kill_instance, b_instance)
                if i == 80:
                    await fleet.wait_instance_ready(b_instance)
                    await fleet.wait_instances(2)
                    await read_some()  # served again, each session on an instance of its own
                    await call(a, "link_status")
                    own_redis.kill()
                    redis_down = True
                if i == 120:
                    await read_some()
                if i == 150:
                    own_redis.start()
                    redis_down = False
        finally:
            if redis_down:
                own_redis.start()
        async with asyncio.timeout(60):  # the last sends reach Postgres a moment after they answered
            while len(received) < 200:
                await read_some()
                await asyncio.sleep(0.05)
        assert [e["body"] for e in received] == [f"m{i}" for i in range(200)]
        ids = [e["id"] for e in received]
        assert ids == sorted(set(ids))
        assert (await call(b, "link_inbox", {"group": group}))["events"] == []
