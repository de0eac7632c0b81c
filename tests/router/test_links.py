"""Linked sessions through the router: real clients of both eras, a real supervisord fleet.

Two principals (alice, bob) so the principal rule is exercised; alice's sessions link up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import mcp_types
import pytest
import redis.asyncio as aioredis
from mcp.client.subscriptions import ResourceUpdated
from mcp.shared.exceptions import MCPError

from common import links as link_store
from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import (
    ROUTER_TEST_SETTINGS,
    call,
    error_of,
    inbox_when_served,
    instance_num,
    mcp_client,
    status_of,
)

pytestmark = pytest.mark.timeout(240)

ALICE, BOB = "tok-alice", "tok-bob"


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=4,
        max_instances=4,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        auth_tokens=[f"alice={ALICE}", f"bob={BOB}"],
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet) -> AsyncIterator[None]:
    yield
    await fleet.end_all_sessions()


async def test_two_eras_share_tasks_notes_messages_and_reservations(
    fleet: Fleet, provider: FakeProvider
) -> None:
    group = "proj"
    inbox = f"exai://link/{group}/inbox"
    a_updates: list[str] = []

    async def on_a(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            a_updates.append(str(message.params.uri))

    outsider_updates: list[Any] = []

    async def on_outsider(message: Any) -> None:
        outsider_updates.append(message)

    async with (
        mcp_client(fleet.mcp_url, "legacy", name="agent-a", token=ALICE, message_handler=on_a) as a,
        mcp_client(fleet.mcp_url, "2026-07-28", name="agent-b", token=ALICE) as b,
        mcp_client(fleet.mcp_url, "legacy", name="other-bob", token=BOB, message_handler=on_outsider) as bob,
        mcp_client(
            fleet.mcp_url, "legacy", name="alice-outsider", token=ALICE, message_handler=on_outsider
        ) as c,
    ):
        a_sid = (await status_of(a))["session"]
        assert (await call(a, "link_join", {"group": group}))["joined"] is True
        assert (await call(b, "link_join", {"group": group}))["joined"] is True
        async with asyncio.timeout(20):  # A hears that B joined, on its router-held GET stream
            while inbox not in a_updates:  # noqa: ASYNC110 - waiting for a server push
                await asyncio.sleep(0.05)

        async with b.listen(resource_subscriptions=[inbox]) as sub:
            updates = aiter(sub)

            async def next_update() -> Any:
                return await asyncio.wait_for(anext(updates), 20)

            task = (
                await call(a, "task_create", {"name": "port the parser", "scope": "group", "group": group})
            )["task"]
            assert await next_update() == ResourceUpdated(uri=inbox)
            await call(
                a, "note_write", {"key": "plan", "body": "parser first", "scope": "group", "group": group}
            )
            assert await next_update() == ResourceUpdated(uri=inbox)
            sent = await call(
                a, "link_send", {"group": group, "body": "I take the parser", "subject": "split"}
            )
            assert await next_update() == ResourceUpdated(uri=inbox)
            await call(a, "link_reserve", {"group": group, "paths": ["src/**"], "ttl": 600})
            assert await next_update() == ResourceUpdated(uri=inbox)

        # B sees everything through the resources...
        content = await b.read_resource(inbox)
        unread = json.loads(content.contents[0].text)  # type: ignore[union-attr]
        assert [e["kind"] for e in unread["events"]] == ["task", "note", "message", "reserve"]
        status = json.loads((await b.read_resource(f"exai://link/{group}/status")).contents[0].text)  # type: ignore[union-attr]
        assert {m["client"] for m in status["members"]} == {"agent-a", "agent-b"}
        assert {m["state"] for m in status["members"]} == {"active"}
        assert [t["name"] for t in status["group_tasks"]] == ["port the parser"]
        # ...and through the tools, exactly once.
        box = await call(b, "link_inbox", {"group": group})
        assert [e["kind"] for e in box["events"]] == ["task", "note", "message", "reserve"]
        message = box["events"][2]
        assert (message["uuid"], message["from"], message["body"], message["subject"]) == (
            sent["event"], a_sid, "I take the parser", "split",
        )  # fmt: skip
        assert (await call(b, "link_inbox", {"group": group}))["events"] == []
        refused_to = await error_of(b, "link_send", {"group": group, "body": "psst", "to": "nobody"})
        assert "not_linked" in refused_to and "'nobody' is not a member" in refused_to
        listed = await call(b, "task_list", {"scope": "group", "group": group})
        assert [t["id"] for t in listed["tasks"]] == [task["id"]]
        note = await call(b, "note_read", {"key": "plan", "scope": "group", "group": group})
        assert note["note"]["body"] == "parser first"
        # Optimistic locking holds on group tasks: B updates, A's stale version is refused.
        await call(
            b,
            "task_update",
            {"task_id": task["id"], "expected_version": 1, "state": "IN_PROGRESS", "group": group},
        )
        assert "version_conflict" in await error_of(
            a, "task_update", {"task_id": task["id"], "expected_version": 1, "name": "x", "group": group}
        )
        # Shared chat context, opt-in per call: B's prompt carries A's note, task and message.
        answer = await call(b, "chat", {"prompt": "what is A doing?", "include_group_context": group})
        included = answer["metadata"]["group_context"]
        assert (included["notes"], included["tasks"], included["messages"]) == (1, 1, 1)
        sent_prompt = provider.snapshot()[-1].messages[-1]["content"]
        assert "parser first" in sent_prompt and "I take the parser" in sent_prompt
        assert sent_prompt.startswith("what is A doing?")  # the group block follows the prompt
        plain = await call(b, "chat", {"prompt": "no context", "continuation_id": answer["continuation_id"]})
        assert "group_context" not in plain["metadata"]
        assert "I take the parser" not in provider.snapshot()[-1].messages[-1]["content"]

        # A conflicting exclusive reservation is refused, naming the holder and the expiry.
        refused = await error_of(b, "link_reserve", {"group": group, "paths": ["src/parser.py"]})
        assert "reservation_conflict" in refused and a_sid in refused and "agent-a" in refused
        assert "until" in refused
        await call(b, "link_reserve", {"group": group, "paths": ["docs/**"]})  # no overlap: fine

        # Outsiders: bob (another principal) cannot join; alice's unlinked session reads nothing.
        assert "link_forbidden" in await error_of(bob, "link_join", {"group": group})
        for outsider in (bob, c):
            assert "not_linked" in await error_of(outsider, "link_inbox", {"group": group})
            assert "not_linked" in await error_of(outsider, "link_send", {"group": group, "body": "hi"})
        await call(a, "link_send", {"group": group, "body": "after the outsiders tried"})
        await asyncio.sleep(1.0)
        assert not [m for m in outsider_updates if isinstance(m, mcp_types.ResourceUpdatedNotification)]

        # The admin sees the group, its members and their cursors, and may link across principals.
        code, groups = await fleet.admin("GET", "/admin/links")
        assert code == 200, groups
        (proj,) = [g for g in groups["groups"] if g["group"] == group]
        assert len(proj["members"]) == 2
        bob_sid = (await status_of(bob))["session"]
        listed_by_cli = await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).with_name("exai")), "links", "add", group, bob_sid],
            env=fleet.environment(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert listed_by_cli.returncode == 0, listed_by_cli.stderr
        assert json.loads(listed_by_cli.stdout)["joined"] is True
        await call(bob, "link_send", {"group": group, "body": "hello from bob"})
        listed_by_cli = await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).with_name("exai")), "links"],
            env=fleet.environment(), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert listed_by_cli.returncode == 0, listed_by_cli.stderr
        assert bob_sid in listed_by_cli.stdout and "other-bob" in listed_by_cli.stdout
        _, text = await fleet.admin("GET", "/metrics")
        counters = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith("exai_links_")
        }
        assert counters["exai_links_events_total"] >= 8 and counters["exai_links_notifications_total"] >= 6
        assert (
            counters["exai_links_catchups_total"] >= 1
            and counters["exai_links_delivery_lag_seconds_count"] >= 4
        )
        left = await call(a, "link_leave", {"group": group, "handoff": "parser is half done"})
        assert left["left"] is True
        box = await call(b, "link_inbox", {"group": group})
        assert [(e["kind"], e.get("body")) for e in box["events"]][-3:] == [
            ("join", None),
            ("message", "hello from bob"),
            ("leave", "parser is half done"),
        ]


async def test_200_messages_arrive_in_order_once_across_an_instance_kill(fleet: Fleet) -> None:
    group = "kill"
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="sender", token=ALICE) as a,
        mcp_client(
            fleet.mcp_url, "legacy", name="receiver", token=ALICE, headers={"Exai-Link-Group": group}
        ) as b,
    ):
        # Connect-time linking: B sends Exai-Link-Group and is in the group after its first call.
        b_instance = instance_num((await status_of(b))["instance_id"])
        assert (await call(b, "link_status"))["groups"] == [group]
        await call(a, "link_join", {"group": group})
        await call(b, "link_inbox", {"group": group})  # A's join: read
        received: list[dict[str, Any]] = []

        async def read_some() -> None:  # the instance may be restarting
            received.extend(await inbox_when_served(b, group, limit=37))

        for i in range(200):
            await call(a, "link_send", {"group": group, "body": f"m{i}"})
            if i == 60:
                await read_some()
                await asyncio.to_thread(fleet.kill_instance, b_instance)
            if i == 120:
                await read_some()
        async with asyncio.timeout(60):  # the last sends reach Postgres a moment after they answered
            while len(received) < 200:
                await read_some()
                await asyncio.sleep(0.05)
        bodies = [e["body"] for e in received]
        assert bodies == [f"m{i}" for i in range(200)]
        ids = [e["id"] for e in received]
        assert ids == sorted(set(ids))


async def test_a_send_retried_with_its_message_id_is_delivered_once(fleet: Fleet) -> None:
    """link_send's message_id: a retry on the same instance returns the first event and writes
    nothing; a retry after the sender's instance was killed (the session served elsewhere, the
    first row maybe still in the dead instance's spool) is stored once; another sender's same
    id is its own message."""
    group = "retries"
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="retry-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "2026-07-28", name="retry-b", token=ALICE) as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        await call(b, "link_inbox", {"group": group})
        a_session = (await status_of(a))["session"]
        first_id, second_id = str(uuid.uuid4()), str(uuid.uuid4())
        sent = await call(a, "link_send", {"group": group, "body": "once", "message_id": first_id})
        before = (await status_of(a))["links"]
        again = await call(a, "link_send", {"group": group, "body": "once", "message_id": first_id})
        assert again["event"] == sent["event"] and again["message_id"] == first_id
        after = (await status_of(a))["links"]  # answered from the first attempt: nothing written
        assert after["spooled"] == before["spooled"] and after["replayed"] == before["replayed"] + 1
        assert "message_id" in await error_of(
            a, "link_send", {"group": group, "body": "x", "message_id": "nope"}
        )
        # B's same id is B's own message, delivered to A.
        from_b = await call(b, "link_send", {"group": group, "body": "from b", "message_id": first_id})
        assert from_b["event"] != sent["event"]

        await asyncio.to_thread(fleet.kill_instance, instance_num((await status_of(a))["instance_id"]))
        result = None
        for _ in range(300):  # A's instance was killed: the client retries, as it is told to
            with contextlib.suppress(MCPError):
                result = await a.call_tool(
                    "link_send", {"group": group, "body": "once", "message_id": first_id}
                )
                if not result.is_error:
                    break
            await asyncio.sleep(0.2)
        assert result is not None
        assert not result.is_error, result
        assert result.structured_content["event"] == sent["event"]  # type: ignore[index]
        await call(a, "link_send", {"group": group, "body": "after", "message_id": second_id})

        received: list[dict[str, Any]] = []
        async with asyncio.timeout(60):  # the dead instance's spool is flushed when it is back
            while [e["body"] for e in received if e["kind"] == "message"][-1:] != ["after"]:
                received.extend(await inbox_when_served(b, group, limit=50))
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # anything stored late would show now
        received.extend(await inbox_when_served(b, group, limit=50))
        messages = [(e["from"], e["body"], e["uuid"]) for e in received if e["kind"] == "message"]
        assert messages[0] == (a_session, "once", sent["event"])
        assert [m[:2] for m in messages] == [(a_session, "once"), (a_session, "after")]
        to_a = [e["body"] for e in await inbox_when_served(a, group, limit=50) if e["kind"] == "message"]
        assert to_a == ["from b"]


async def test_an_ended_session_hands_off_and_opted_in_chats_carry_the_group(
    fleet: Fleet, provider: FakeProvider
) -> None:
    group = "relay"
    inbox = f"exai://link/{group}/inbox"
    b_updates: list[str] = []

    async def on_b(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            b_updates.append(str(message.params.uri))

    async with mcp_client(fleet.mcp_url, "legacy", name="agent-b", token=ALICE, message_handler=on_b) as b:
        joined = await call(b, "link_join", {"group": group, "chat_context": True})
        assert joined["chat_context"] is True
        async with mcp_client(fleet.mcp_url, "legacy", name="agent-a", token=ALICE) as a:
            a_sid = (await status_of(a))["session"]
            await call(a, "link_join", {"group": group})
            assert (await call(a, "link_handoff", {"group": group, "note": "lexer half done"}))[
                "handoff"
            ] == "lexer half done"
            task = (await call(a, "task_create", {"name": "write the lexer", "state": "IN_PROGRESS"}))["task"]
            await call(a, "link_reserve", {"group": group, "paths": ["lib/**"], "ttl": 600})
            review = (await call(a, "task_create", {"name": "review", "scope": "group", "group": group}))[
                "task"
            ]
            stale = {"task_id": review["id"], "expected_version": 7, "name": "x", "group": group}
            assert "version_conflict" in await error_of(a, "task_update", stale)  # refused: no event
            blank = {"name": "   ", "scope": "group", "group": group}  # refused before any I/O
            assert "invalid_argument" in await error_of(a, "task_create", blank)
            await call(a, "link_send", {"group": group, "body": "lexer uses regexes"})
            async with asyncio.timeout(20):
                while len((await call(b, "link_inbox", {"group": group, "ack": False}))["events"]) < 4:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            unread = (await call(b, "link_inbox", {"group": group, "ack": False}))["events"]
            assert [e["kind"] for e in unread] == ["join", "reserve", "task", "message"]
            assert unread[2]["data"] == {
                "task_id": review["id"],
                "name": "review",
                "state": "NOT_STARTED",
                "version": 1,
            }

            # Opted in at join: B's chat includes the group without asking per call.
            answer = await call(b, "chat", {"prompt": "what is going on?"})
            included = answer["metadata"]["group_context"]
            assert (included["group"], included["source"], included["messages"]) == (group, "group opt-in", 1)
            prompt = provider.snapshot()[-1].messages[-1]["content"]
            assert "lexer uses regexes" in prompt and "write the lexer" in prompt
            # The per-call argument overrides: '' is none this call.
            plain = await call(b, "chat", {"prompt": "nothing shared", "include_group_context": ""})
            assert "group_context" not in plain["metadata"]
            assert "lexer uses regexes" not in provider.snapshot()[-1].messages[-1]["content"]
            await call(b, "link_inbox", {"group": group})
            seen = len(b_updates)
        # A's client closed its session (DELETE /mcp): A leaves with the automatic handoff.
        async with asyncio.timeout(20):
            while True:
                events = (await call(b, "link_inbox", {"group": group}))["events"]
                if events:
                    break
                await asyncio.sleep(0.1)
        (leave,) = events
        assert (leave["kind"], leave["from"], leave["body"]) == ("leave", a_sid, "lexer half done")
        assert leave["data"]["reason"] == "delete"
        assert leave["data"]["in_progress"] == [{"task_id": task["id"], "name": "write the lexer"}]
        assert leave["data"]["released"] == [{"pattern": "lib/**", "exclusive": True}]
        assert len(b_updates) > seen and b_updates[-1] == inbox  # B was told
        status = await call(b, "link_status", {"group": group})
        assert [m["client"] for m in status["members"]] == ["agent-b"] and status["reservations"] == []
        await call(b, "link_reserve", {"group": group, "paths": ["lib/x.py"]})  # released: free
        # Opting out later: chats no longer include the group.
        assert (await call(b, "link_join", {"group": group, "chat_context": False}))["chat_context"] is False
        after = await call(b, "chat", {"prompt": "and now?"})
        assert "group_context" not in after["metadata"]

        # The admin ending a session (DELETE /admin/sessions/{id}) hands off the same way.
        async with mcp_client(fleet.mcp_url, "legacy", name="agent-c", token=ALICE) as c:
            c_sid = (await status_of(c))["session"]
            await call(c, "link_join", {"group": group})
            await call(c, "link_handoff", {"group": group, "note": "nothing started"})
            await call(b, "link_inbox", {"group": group})  # C's join: read
            code, _ = await fleet.admin("DELETE", f"/admin/sessions/{c_sid}")
            assert code == 200
            async with asyncio.timeout(20):
                while not (events := (await call(b, "link_inbox", {"group": group}))["events"]):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        assert [(e["kind"], e["from"], e["body"], e["data"]["reason"]) for e in events] == [
            ("leave", c_sid, "nothing started", "admin")
        ]


async def test_a_member_woken_early_reads_the_event_before_or_after_postgres_has_it(fleet: Fleet) -> None:
    """Events are announced once the sender's spool has them, before Postgres gives them ids:
    a member that reads its inbox as soon as it is woken still finds the event, because reads
    wait for the group's events in flight."""
    group = "early"
    woke = asyncio.Event()

    async def on_b(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            woke.set()

    async with (
        mcp_client(fleet.mcp_url, "legacy", name="early-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "legacy", name="early-b", token=ALICE, message_handler=on_b) as b,
    ):
        a_sid = (await status_of(a))["session"]
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        for i in range(5):
            woke.clear()
            sent = await call(a, "link_send", {"group": group, "body": f"now {i}"})
            await asyncio.wait_for(woke.wait(), 20)
            box = await call(b, "link_inbox", {"group": group})
            assert [e["uuid"] for e in box["events"]] == [sent["event"]]

        # An event marked in flight that Postgres does not have yet: the read waits for it.
        event_id = str(uuid.uuid4())
        redis = aioredis.Redis.from_url(fleet.settings.redis_url or "")
        try:
            await redis.zadd(fleet.keys.link_inflight(group), {event_id: (time.time() + 30) * 1000})
        finally:
            await redis.aclose()
        reading = asyncio.create_task(call(b, "link_inbox", {"group": group}))
        await asyncio.sleep(0.3)
        conn = await asyncpg.connect(fleet.settings.database_url)
        try:
            payload = {"uuid": event_id, "group": group, "kind": "message", "sender": a_sid, "body": "late"}
            stored = await link_store.store_spooled(conn, [{**payload, "created_at": time.time()}])
        finally:
            await conn.close()
        assert [e.uuid for e, _ in stored] == [event_id]
        box = await reading
        assert [(e["uuid"], e["body"]) for e in box["events"]] == [(event_id, "late")]
        assert (await call(b, "link_inbox", {"group": group}))["events"] == []
