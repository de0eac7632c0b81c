"""Membership changes a session does not make itself, and the refusals it cannot see in the
answer of the call that caused them: each must be refused in its answer or told in words.

- the admin removes a session or deletes its group: the instances drop their copy of the
  group's members at once (common/link_members.py), so the removed session's next group write
  is refused in its answer, not a cache lifetime later;
- a copy that missed the change (here: membership changed straight in Postgres, as if the
  announcement was lost) lets an event through: the store refuses it (common/links.py) and
  the sender is told with its next tool answer and by a log notification
  (instance/link_notices.py); the others never see it;
- a join the `Exai-Link-Group` header asks for and that is refused is told in the answer of
  the call it rode on, and `link_status()` keeps saying so.

Real clients of both eras through the router, the admin API, real Postgres and Redis. The
fleet keeps member copies for 300 s (EXAI_LINK_MEMBER_CACHE_TTL), so none of this can pass by
a copy simply ageing out.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import asyncpg
import mcp_types
import pytest

from common import links as link_store
from tests.fakes.provider import FakeProvider
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, call, mcp_client

pytestmark = pytest.mark.timeout(240)

ALICE, BOB = "tok-alice", "tok-bob"
SOON = 10.0  # seconds: far below the copies' 300 s lifetime


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider) -> Fleet:
    return module_fleet_factory(
        instances=3,
        max_instances=3,
        glm_api_key="fake-key",
        glm_api_url=provider.glm_url,
        auth_tokens=[f"alice={ALICE}", f"bob={BOB}"],
        link_member_cache_ttl=300.0,
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture(autouse=True)
async def clean_fleet(fleet: Fleet) -> AsyncIterator[None]:
    yield
    await fleet.end_all_sessions()


def _group() -> str:
    return f"mem-{secrets.token_hex(3)}"


async def _admin(fleet: Fleet, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as http:
        url = fleet.router_url + path
        async with http.request(method, url, headers=fleet.admin_headers(), json=body) as r:
            return r.status, await r.json(content_type=None)


async def _try(client: Any, tool: str, args: dict[str, Any]) -> tuple[bool, str, dict[str, Any]]:
    """(is_error, text, structured) of a tool call."""
    result = await client.call_tool(tool, args)
    text = str(result.content[0].text) if result.content else ""
    return bool(result.is_error), text, dict(result.structured_content or {})


async def _version_notices(client: Any) -> list[dict[str, Any]]:
    result = await client.call_tool("version", {})
    assert not result.is_error, result
    return list((result.structured_content or {}).get("notices", []))


async def _refusals(client: Any) -> list[dict[str, Any]]:
    """The first non-empty `link_event_refused` notices given with the client's answers."""
    async with asyncio.timeout(SOON):
        while True:
            notices = [n for n in await _version_notices(client) if n["code"] == "link_event_refused"]
            if notices:
                return notices
            await asyncio.sleep(0.05)


async def _refused_in_words(client: Any, group: str, body: str) -> None:
    """Within SOON seconds the client's sends to `group` are refused in their answer; each send
    answered before that is told with a later answer (a notice naming its event), never silent."""
    owed: set[str] = set()
    told: set[str] = set()
    async with asyncio.timeout(SOON):
        while True:
            failed, text, out = await _try(client, "link_send", {"group": group, "body": body})
            told |= {n["event"] for n in out.get("notices", []) if n["code"] == "link_event_refused"}
            if failed:
                assert text.startswith("[not_linked]"), text
                assert "the admin removed it, or the group was deleted" in text, text
                assert "nothing was sent" in text, text
                break
            owed.add(out["event"])
            await asyncio.sleep(0.05)
        while not owed <= told:
            told |= {n["event"] for n in await _version_notices(client) if n["code"] == "link_event_refused"}
            await asyncio.sleep(0.05)


async def _stored(client: Any, group: str, head: int) -> None:
    """Wait until the group's log holds `head` events (so no earlier store is still to come)."""
    async with asyncio.timeout(SOON):
        while True:
            if (await call(client, "link_status", {"group": group}))["head"] >= head:
                return
            await asyncio.sleep(0.02)


async def _inbox_bodies(client: Any, group: str) -> list[str]:
    box = await call(client, "link_inbox", {"group": group})
    return [e.get("body", "") for e in box["events"] if e["kind"] == "message"]


@pytest.mark.parametrize("era", ["legacy", "2026-07-28"])
async def test_an_admin_removal_is_refused_in_the_removed_sessions_answer(fleet: Fleet, era: str) -> None:
    group = _group()
    async with (
        mcp_client(fleet.mcp_url, era, name="rm-a", token=ALICE) as a,
        mcp_client(fleet.mcp_url, "legacy", name="rm-b", token=ALICE) as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        a_sid = (await call(a, "link_status"))["session"]
        await call(a, "link_send", {"group": group, "body": "before"})  # A's copy of the members
        await call(a, "task_create", {"name": "t", "scope": "group", "group": group})
        await _stored(b, group, 4)  # joins and A's events stored (their store refreshed A's copy)
        code, _ = await _admin(fleet, "DELETE", f"/admin/links/{group}/members/{a_sid}")
        assert code == 200
        await _refused_in_words(a, group, "after the removal")
        failed, text, _ = await _try(a, "task_create", {"name": "t2", "scope": "group", "group": group})
        assert failed and text.startswith("[not_linked]"), text
        assert "after the removal" not in await _inbox_bodies(b, group)


@pytest.mark.parametrize("era", ["legacy", "2026-07-28"])
async def test_a_deleted_group_is_refused_in_the_senders_answer(fleet: Fleet, era: str) -> None:
    group = _group()
    async with mcp_client(fleet.mcp_url, era, name="del-a", token=ALICE) as a:
        await call(a, "link_join", {"group": group})
        await call(a, "link_send", {"group": group, "body": "before"})
        await _stored(a, group, 2)  # the join and the message: A's copy was refreshed by the store
        code, _ = await _admin(fleet, "DELETE", f"/admin/links/{group}")
        assert code == 200
        await _refused_in_words(a, group, "after the delete")


async def test_an_event_a_stale_copy_let_through_is_refused_and_told(fleet: Fleet) -> None:
    """The announcement of a change is lost (the change is made straight in Postgres): the
    stale copy answers the send, the store refuses it, and the sender is told in words."""
    group = _group()
    logged: list[dict[str, Any]] = []
    heard = asyncio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, mcp_types.LoggingMessageNotification):
            logged.append(dict(message.params.data))
            heard.set()

    async with (
        mcp_client(fleet.mcp_url, "legacy", name="st-a", token=ALICE, message_handler=on_message) as a,
        mcp_client(fleet.mcp_url, "2026-07-28", name="st-b", token=ALICE) as b,
    ):
        await call(a, "link_join", {"group": group})
        await call(b, "link_join", {"group": group})
        a_sid = (await call(a, "link_status"))["session"]
        await call(a, "link_send", {"group": group, "body": "before"})  # A's copy: A and B
        await call(b, "link_send", {"group": group, "body": "hello"})  # B's copy: A and B
        # Both joins and both messages stored before the change: a store still to come after
        # it would refresh A's copy with the members of then (B alone), and A's send below
        # would be refused in its answer rather than by the store (seen under CI load).
        await _stored(a, group, 4)
        conn = await asyncpg.connect(fleet.settings.database_url)
        try:
            assert await link_store.leave(conn, group, a_sid) is not None  # nobody is told
        finally:
            await conn.close()
        sent = await call(a, "link_send", {"group": group, "body": "stale"})
        assert sent["status"] == "success"  # the copy still lists A: the call is answered ...
        notices = await _refusals(a)  # ... and the store's refusal is told with a later answer
        assert [(n["event"], n["group"], n["reason"]) for n in notices] == [
            (sent["event"], group, "not_member")
        ]
        assert "was not delivered" in notices[0]["message"]
        assert "no longer a member" in notices[0]["message"]
        assert await _version_notices(a) == []  # told once
        async with asyncio.timeout(SOON):  # and as a log notification on A's stream
            await heard.wait()
        assert [n["event"] for n in logged] == [sent["event"]]
        # The refusal dropped A's copy: its next send is refused in its answer.
        failed, text, _ = await _try(a, "link_send", {"group": group, "body": "again"})
        assert failed and text.startswith("[not_linked]"), text
        assert "stale" not in await _inbox_bodies(b, group)

        # A group task changed through a stale copy: the task is written, its event refused,
        # and the words say which of the two happened.
        await call(a, "link_join", {"group": group})  # A's copy lists A again
        conn = await asyncpg.connect(fleet.settings.database_url)
        try:
            assert await link_store.leave(conn, group, a_sid) is not None
        finally:
            await conn.close()
        task = await call(a, "task_create", {"name": "stale task", "scope": "group", "group": group})
        assert task["status"] == "success"
        # The task's own statement judged its event (common/links.task_event_sql), so the words
        # come with this very answer; an event that went through the spool is told with a later one.
        notices = [n for n in task.get("notices", []) if n["code"] == "link_event_refused"]
        notices = notices or await _refusals(a)
        assert [n["reason"] for n in notices] == ["not_member"]
        assert "change to a group task" in notices[0]["message"] and "was stored" in notices[0]["message"]

        # The group is deleted straight in Postgres: B's stale copy answers, the store refuses.
        conn = await asyncpg.connect(fleet.settings.database_url)
        try:
            assert await link_store.delete_group(conn, group)
        finally:
            await conn.close()
        sent = await call(b, "link_send", {"group": group, "body": "into the void"})
        assert sent["status"] == "success"
        notices = await _refusals(b)
        assert [(n["event"], n["reason"]) for n in notices] == [(sent["event"], "group_deleted")]
        assert "the group was deleted" in notices[0]["message"]


@pytest.mark.parametrize("era", ["legacy", "2026-07-28"])
async def test_a_refused_header_join_is_told_in_the_first_answer(fleet: Fleet, era: str) -> None:
    group = _group()
    async with mcp_client(fleet.mcp_url, "legacy", name="hj-owner", token=ALICE) as owner:
        await call(owner, "link_join", {"group": group})  # Alice's group
        async with mcp_client(
            fleet.mcp_url, era, name="hj-bob", token=BOB, headers={"Exai-Link-Group": group}
        ) as bob:
            first = await _version_notices(bob)
            assert [(n["code"], n["group"], n["reason"]) for n in first] == [
                ("link_header_refused", group, "link_forbidden")
            ]
            assert "Exai-Link-Group" in first[0]["message"]
            assert "[link_forbidden]" in first[0]["message"]
            assert await _version_notices(bob) == []  # told once in answers ...
            status = await call(bob, "link_status")
            assert status["groups"] == []
            (joined,) = status["header_joins"]  # ... and kept in link_status
            assert (joined["group"], joined["joined"]) == (group, False)
            assert "[link_forbidden]" in joined["refused"]
        members = (await call(owner, "link_status", {"group": group}))["members"]
        assert [m["client"] for m in members] == ["hj-owner"]

    # A malformed name is refused in words too; an error answer carries the notice after its own.
    async with mcp_client(
        fleet.mcp_url, era, name="hj-bad", token=ALICE, headers={"Exai-Link-Group": "no spaces allowed"}
    ) as bad:
        failed, text, _ = await _try(bad, "link_inbox", {"group": "nowhere"})
        assert failed
        assert text.startswith("[not_linked]"), text
        assert "[notice: link_header_refused]" in text
        assert "[invalid_argument]" in text
        status = await call(bad, "link_status")
        assert status["header_joins"][0]["joined"] is False


async def test_a_header_join_that_works_says_so_in_link_status(fleet: Fleet) -> None:
    group = _group()
    async with mcp_client(
        fleet.mcp_url, "2026-07-28", name="hj-ok", token=ALICE, headers={"Exai-Link-Group": group}
    ) as a:
        assert await _version_notices(a) == []
        status = await call(a, "link_status")
        assert status["groups"] == [group]
        assert status["header_joins"] == [{"group": group, "joined": True}]
