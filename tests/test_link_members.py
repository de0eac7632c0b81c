"""Membership where it counts: the store's check (common/links.store_spooled) and the channel
that drops the instances' copies at once (common/link_members.py), on real Postgres and Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from common import links as db
from common.keys import Keys
from common.link_members import MemberWatch, members_changed
from common.migrate import migrate


def _event(group: str, sender: str, body: str, created_at: float) -> dict[str, Any]:
    return {"uuid": str(uuid.uuid4()), "group": group, "kind": "message", "sender": sender,
            "body": body, "created_at": created_at}  # fmt: skip


async def test_the_store_takes_a_members_events_and_refuses_a_non_members(pg_dsn: str) -> None:
    await migrate(pg_dsn)
    group = f"rule-{secrets.token_hex(3)}"
    conn = await asyncpg.connect(pg_dsn)
    try:
        await db.join(conn, group, "s-a", principal="p", client="a")
        await db.join(conn, group, "s-b", principal="p", client="b")
        made_while_member = _event(group, "s-a", "sent before the removal", time.time() - 1)
        await db.leave(conn, group, "s-a", handoff="removed by the admin")
        made_after = _event(group, "s-a", "sent after the removal", time.time() + 1)
        stranger = _event(group, "s-x", "never a member", time.time())
        member = _event(group, "s-b", "a member's", time.time())
        written = await db.store_spooled(conn, [made_while_member, made_after, stranger, member])
        stored = [w for w in written if not isinstance(w, db.RefusedEvent)]
        refused = [w for w in written if isinstance(w, db.RefusedEvent)]
        # An event its sender made while a member lands (after its leave: it was in flight).
        assert [e.body for e, _ in stored] == ["sent before the removal", "a member's"]
        assert sorted((r.uuid, r.sender, r.reason) for r in refused) == sorted(
            [(made_after["uuid"], "s-a", "not_member"), (stranger["uuid"], "s-x", "not_member")]
        )
        assert "no longer a member" in refused[0].words()
        rows = await conn.fetch("SELECT id FROM link_events WHERE group_name = $1 ORDER BY id", group)
        ids = [r["id"] for r in rows]
        assert ids == list(range(1, len(ids) + 1))  # refused events took no id: still gapless
        # A direct message to a member who left meanwhile: nobody could read it, so it is
        # refused for its sender, not stored.
        await db.join(conn, group, "s-c", principal="p", client="c")
        to_c = {**_event(group, "s-b", "for c", time.time()), "recipient": "s-c"}
        await db.leave(conn, group, "s-c")
        (gone,) = await db.store_spooled(conn, [to_c])
        assert isinstance(gone, db.RefusedEvent)
        assert (gone.uuid, gone.reason, gone.recipient) == (to_c["uuid"], "recipient_gone", "s-c")
        assert "session s-c you sent it to was no longer a member" in gone.words()
        # A member again: its events are taken again.
        await db.join(conn, group, "s-a", principal="p", client="a")
        again = await db.store_spooled(conn, [_event(group, "s-a", "back", time.time() + 2)])
        assert not any(isinstance(w, db.RefusedEvent) for w in again)
        assert [w[0].body for w in again if not isinstance(w, db.RefusedEvent)] == ["back"]
    finally:
        await conn.close()


async def test_a_change_drops_the_copy_and_a_resubscription_drops_all(redis_url: str) -> None:
    keys = Keys(f"lm{secrets.token_hex(3)}")
    name = f"exai-test-watch-{secrets.token_hex(4)}"  # this test's connections only
    redis = aioredis.Redis.from_url(redis_url, client_name=name)
    forgotten: list[str | None] = []
    changed = asyncio.Event()

    def forget(group: str | None) -> None:
        forgotten.append(group)
        changed.set()

    watch = MemberWatch(redis, keys, forget)
    watch.start()
    try:
        async with asyncio.timeout(10):
            while not watch.up:
                await changed.wait()
                changed.clear()
        assert forgotten == [None]  # subscribed: every copy read before is dropped
        assert await members_changed(redis, keys, "proj")
        async with asyncio.timeout(10):
            while forgotten[-1] != "proj":
                await changed.wait()
                changed.clear()
        # The subscription's connection is cut (as by a Redis restart): changes published while
        # it was away are lost, so the watch drops every copy when it is back.
        mine = [c["id"] for c in await redis.client_list(_type="pubsub") if c.get("name") == name]
        assert len(mine) == 1
        before = watch.subscriptions
        await redis.client_kill_filter(_id=mine[0])
        async with asyncio.timeout(10):
            while watch.subscriptions == before:
                await changed.wait()
                changed.clear()
        assert forgotten[-1] is None and watch.up
    finally:
        await watch.stop()
        await redis.aclose()
