"""Linked sessions' write-behind path through the router: Postgres cut, sender killed.

A group event is durable in the sender instance's spool when link_send answers; the flusher
gives it its group id in Postgres later. So link_send works while Postgres is unreachable (a
TCP proxy in front of this run's database is cut, never the shared server), and an event whose
sender instance is killed with SIGKILL right after the call still arrives, once, in order.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import mcp_types
import pytest

from tests.fakes.tcp_proxy import TcpProxy
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, call, instance_num, mcp_client, status_of

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def fleet(
    pg_proxy: tuple[TcpProxy, str],
    redis_url: str,
    redis_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    state = tmp_path_factory.mktemp("fleet")
    fl = Fleet(
        state,
        database_url=pg_proxy[1],
        redis_url=redis_url,
        redis_prefix=f"{redis_prefix}spool{secrets.token_hex(2)}",
        instances=2,
        max_instances=2,
        # The outbox relay (group task events whose change committed without them) looks
        # every second for changes two seconds old, so the test waits seconds, not tens; three
        # pooled connections kept open, so a call finds one while the relay and the flusher
        # each wait on Postgres's held-back replies (a new connection would not open in time).
        overrides={
            **ROUTER_TEST_SETTINGS,
            "link_outbox_interval": 1.0,
            "link_outbox_grace": 2.0,
            "db_pool_min": 3,
            # TEST ONLY: while this file says "fail", the instances' spool commits fail.
            "test_spool_fault_file": str(state / "spool-fault"),
        },
    )
    try:
        yield fl.start()
    finally:
        fl.stop()


async def test_link_send_while_postgres_is_down_and_the_sender_is_killed(
    fleet: Fleet, pg_proxy: tuple[TcpProxy, str], pg_dsn: str
) -> None:
    proxy, _ = pg_proxy
    group = "spooled"
    updates: list[str] = []

    async def on_b(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    await fleet.wait_instances(2)
    async with (
        mcp_client(fleet.mcp_url, "legacy", name="sender") as a,
        mcp_client(fleet.mcp_url, "legacy", name="receiver", message_handler=on_b) as b,
    ):
        a_instance = instance_num((await status_of(a))["instance_id"])
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        await call(b, "link_inbox", {"group": group})  # A's join: read

        proxy.down()
        try:
            sent = [
                (await call(a, "link_send", {"group": group, "body": f"p{i}"}))["event"] for i in range(20)
            ]
            # B's catch-up needs Postgres: refused plainly, not answered wrongly.
            refused = await b.call_tool("link_inbox", {"group": group})
            assert refused.is_error and "storage_unavailable" in str(refused.content[0].text)  # type: ignore[union-attr]
            # The sender dies with its 20 events only in its spool.
            await asyncio.to_thread(fleet.kill_instance, a_instance)
        finally:
            proxy.up()

        received: list[dict[str, Any]] = []

        async def read_until(count: int) -> None:
            async with asyncio.timeout(60):
                while len(received) < count:
                    result = await b.call_tool("link_inbox", {"group": group})
                    if not result.is_error:
                        received.extend(result.structured_content["events"])  # type: ignore[index]
                    await asyncio.sleep(0.1)

        await read_until(20)
        assert [e["body"] for e in received] == [f"p{i}" for i in range(20)]
        assert [e["uuid"] for e in received] == sent
        assert [e["id"] for e in received] == list(range(received[0]["id"], received[0]["id"] + 20))
        async with asyncio.timeout(20):  # B was told (after the restarted instance flushed)
            while not updates:  # noqa: ASYNC110 - waiting for a server push
                await asyncio.sleep(0.05)

        # With Postgres up: killed right after the call answered, the event still arrives once.
        a_instance = instance_num((await status_of(a))["instance_id"])
        last = (await call(a, "link_send", {"group": group, "body": "last words"}))["event"]
        await asyncio.to_thread(fleet.kill_instance, a_instance)
        await read_until(21)
        assert [(e["uuid"], e["body"]) for e in received[20:]] == [(last, "last words")]

    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch(
            "SELECT id, uuid FROM link_events WHERE group_name = $1 AND kind = 'message' ORDER BY id", group
        )
    finally:
        await conn.close()
    assert [str(r["uuid"]) for r in rows] == [*sent, last]  # each stored once, in order


async def test_an_end_made_while_postgres_is_down_survives_a_router_restart(
    fleet: Fleet, pg_proxy: tuple[TcpProxy, str]
) -> None:
    """A session that ends while Postgres is cut still leaves its groups with its handoff note,
    after the router that saw the end was restarted and Postgres came back (router/links.py)."""
    proxy, _ = pg_proxy
    group = "ends"
    await fleet.wait_instances(2)
    async with mcp_client(fleet.mcp_url, "legacy", name="stays") as b:
        async with mcp_client(fleet.mcp_url, "legacy", name="leaves") as a:
            a_session = (await status_of(a))["session"]
            await call(a, "link_join", {"group": group})
            await call(b, "link_join", {"group": group})
            await call(a, "link_handoff", {"group": group, "note": "tests still red"})
            await call(b, "link_inbox", {"group": group})  # A's join: read
            proxy.down()
        # A's client has closed its session (DELETE /mcp) while Postgres is unreachable.
        try:
            await asyncio.to_thread(fleet.restart_router)
        finally:
            proxy.up()
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(60):
            while not events:
                result = await b.call_tool("link_inbox", {"group": group})
                if not result.is_error:
                    events = [e for e in result.structured_content["events"] if e["kind"] == "leave"]  # type: ignore[index]
                await asyncio.sleep(0.2)
        (leave,) = events
        assert leave["from"] == a_session and leave["body"] == "tests still red", leave
        assert leave["data"]["reason"] == "delete", leave
        members = (await call(b, "link_status", {"group": group}))["members"]
        assert a_session not in {m["session"] for m in members}, members


async def test_a_group_task_whose_answer_is_cut_after_its_commit_is_delivered_once(
    fleet: Fleet, pg_proxy: tuple[TcpProxy, str], pg_dsn: str
) -> None:
    """A group task's change records its event in the change's own statement (the audit row).
    If Postgres is cut after that commit and before its reply (and stays cut for the pool's
    retry), the caller is told the write failed, yet the task is stored and its event is due:
    once Postgres is back the outbox relay stores it, the members are told, and read it once."""
    proxy, _ = pg_proxy
    group = "cut-task"
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
        await call(b, "link_inbox", {"group": group})  # A's join: read
        args = {"name": "cut after commit", "scope": "group", "group": group}
        await call(a, "task_create", {**args, "name": "warm"})  # statements prepared, members cached
        async with asyncio.timeout(10):  # its event is stored a moment after the call answered
            seen: list[Any] = []
            while not seen:
                seen = [
                    e
                    for e in (await call(b, "link_inbox", {"group": group}))["events"]
                    if e["kind"] == "task"
                ]
                await asyncio.sleep(0.02)

        watch = await asyncpg.connect(pg_dsn)  # straight to the server, not through the proxy
        try:
            proxy.delay = 3.0  # Postgres's replies to the instances are held back
            creating = asyncio.create_task(a.call_tool("task_create", args))
            async with asyncio.timeout(20):
                while not await watch.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM tasks WHERE name = 'cut after commit')"
                ):
                    assert not creating.done(), creating.result()
                    await asyncio.sleep(0.01)
            proxy.delay = 0.0
            proxy.down()  # the committed write's reply is lost, and the retry finds no server
            try:
                result = await asyncio.wait_for(creating, 20)
                assert result.is_error and "storage_unavailable" in str(result.content[0].text), result  # type: ignore[union-attr]
                updates.clear()
            finally:
                proxy.up()
            async with asyncio.timeout(30):  # B is told once the relay has stored the event
                while not updates:  # noqa: ASYNC110 - waiting for a server push
                    await asyncio.sleep(0.05)
            read = await call(b, "link_inbox", {"group": group})
            events = [e for e in read["events"] if e["kind"] == "task"]
            assert [e["data"]["name"] for e in events] == ["cut after commit"], read
            again = await call(b, "link_inbox", {"group": group})
            assert again["events"] == []
            stored = await watch.fetch(
                "SELECT id FROM link_events WHERE group_name = $1 AND data->>'name' = 'cut after commit'",
                group,
            )
            assert len(stored) == 1  # once
        finally:
            proxy.delay = 0.0
            await watch.close()


async def test_a_group_task_whose_event_the_spool_refused_is_delivered_by_the_relay(
    fleet: Fleet, pg_dsn: str
) -> None:
    """The sender's spool cannot take the event (a disk error, or the instance killed between the
    task write and the spool): the call has answered and the change stands, and its audit row
    still names the group, so the outbox relay stores the event, once, and B is told."""
    group = "relayed-task"
    fault = Path(str(fleet.settings.test_spool_fault_file))
    updates: list[str] = []

    async def on_b(message: Any) -> None:
        if isinstance(message, mcp_types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    await fleet.wait_instances(2)
    async with (
        mcp_client(fleet.mcp_url, "2026-07-28", name="sender") as a,
        mcp_client(fleet.mcp_url, "legacy", name="receiver", message_handler=on_b) as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        await call(b, "link_inbox", {"group": group})  # A's join: read
        await asyncio.to_thread(fault.write_text, "fail")
        try:
            created = await call(a, "task_create", {"name": "relayed", "scope": "group", "group": group})
            await asyncio.sleep(0.5)  # the event's spool commit is tried (and fails) after the answer
        finally:
            await asyncio.to_thread(fault.unlink)
        updates.clear()
        async with asyncio.timeout(30):  # the relay looks every second for changes 2 s old
            while not updates:  # noqa: ASYNC110 - waiting for a server push
                await asyncio.sleep(0.05)
        read = await call(b, "link_inbox", {"group": group})
        events = [e for e in read["events"] if e["kind"] == "task"]
        assert [(e["data"]["task_id"], e["data"]["name"]) for e in events] == [
            (created["task"]["id"], "relayed")
        ], read
        await asyncio.sleep(2.5)  # another round of the relay stores nothing more
        assert (await call(b, "link_inbox", {"group": group}))["events"] == []
    conn = await asyncpg.connect(pg_dsn)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM link_events WHERE group_name = $1 AND kind = 'task'", group
        )
    finally:
        await conn.close()
    assert stored == 1
