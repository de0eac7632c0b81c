"""Postgres unreachable: chat keeps answering (write-behind), task tools say storage is down."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.fakes.provider import FakeProvider
from tests.fakes.tcp_proxy import TcpProxy
from tests.instance.conftest import InstanceProc, SpawnInstance, connect, metrics_of, new_session


async def _messages(dsn: str, cid: str) -> list[tuple[str, str]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT role, content FROM messages WHERE conversation_id = $1 ORDER BY created_at, seq", cid
        )
    finally:
        await conn.close()
    return [(r["role"], r["content"]) for r in rows]


async def _gauges(inst: InstanceProc) -> dict[str, float]:
    """The instance's Postgres and spool gauges, from its /internal/metrics."""
    metrics = await asyncio.to_thread(metrics_of, inst)
    names = ("exai_instance_postgres_connected", "exai_instance_spool_rows")
    return {name: value for name, value in metrics.items() if name in names}


async def test_chat_answers_and_turns_land_later(
    fake: FakeProvider, pg_proxy: tuple[TcpProxy, str], spawn_instance: SpawnInstance, pg_dsn: str
) -> None:
    proxy, via_proxy = pg_proxy
    inst = spawn_instance(DATABASE_URL=via_proxy)
    proxy.down()
    async with connect(inst, "legacy", session=new_session()) as client:
        first = await client.call_tool("chat", {"prompt": "written while Postgres is down"})
        assert not first.is_error, first.content
        cid = first.structured_content["continuation_id"]  # type: ignore[index]
        # The thread continues from the instance's own pending writes and the Redis cache.
        second = await client.call_tool("chat", {"prompt": "and again", "continuation_id": cid})
        assert not second.is_error, second.content

        task = await client.call_tool("task_create", {"name": "needs Postgres"})
        text = " ".join(getattr(c, "text", "") for c in task.content)
        assert task.is_error and "[storage_unavailable]" in text and "Postgres" in text
        assert "Traceback" not in text

        status = await client.call_tool("status", {})
        backlog = status.structured_content["storage"]["backlog"]  # type: ignore[index]
        assert backlog
        # The same, for a scraper: Postgres unreachable, the turns (and the thread) waiting.
        gauges = await _gauges(inst)
        assert gauges["exai_instance_postgres_connected"] == 0
        assert gauges["exai_instance_spool_rows"] >= 5

    assert await _messages(pg_dsn, cid) == []
    proxy.up()
    for _ in range(100):
        rows = await _messages(pg_dsn, cid)
        if len(rows) == 4:
            break
        await asyncio.sleep(0.1)
    assert [r[0] for r in rows] == ["user", "assistant", "user", "assistant"]
    assert rows[0][1] == "written while Postgres is down"
    for _ in range(100):
        gauges = await _gauges(inst)
        if gauges["exai_instance_spool_rows"] == 0:
            break
        await asyncio.sleep(0.1)
    assert gauges == {"exai_instance_postgres_connected": 1, "exai_instance_spool_rows": 0}


async def test_chat_with_postgres_down_still_carries_the_notes_it_had(
    fake: FakeProvider, pg_proxy: tuple[TcpProxy, str], spawn_instance: SpawnInstance
) -> None:
    """The notes block comes from the scope's Redis copy: a Postgres outage neither stalls the
    call nor drops the notes read before it."""
    proxy, via_proxy = pg_proxy
    inst = spawn_instance(DATABASE_URL=via_proxy)
    async with connect(inst, "legacy", session=new_session()) as client:
        wrote = await client.call_tool("note_write", {"key": "db", "body": "use asyncpg", "importance": 5})
        assert not wrote.is_error, wrote.content
        first = await client.call_tool("chat", {"prompt": "with Postgres up"})
        assert not first.is_error, first.content
        assert [n["key"] for n in first.structured_content["metadata"]["notes_injected"]] == ["db"]  # type: ignore[index]
        proxy.down()
        second = await client.call_tool("chat", {"prompt": "with Postgres down"})
        assert not second.is_error, second.content
        assert [n["key"] for n in second.structured_content["metadata"]["notes_injected"]] == ["db"]  # type: ignore[index]
        assert "use asyncpg" in fake.snapshot()[-1].messages[-1]["content"]
    proxy.up()
