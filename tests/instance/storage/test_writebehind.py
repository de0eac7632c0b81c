"""The spool and the flusher: group commit, full-spool policies, replay after restart, poison rows."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import asyncpg
import pytest

from common.errors import SpoolFull
from common.settings import Settings
from instance.storage import Storage
from instance.storage.spool import SpoolEntry
from instance.storage.writebehind import (
    KIND_CACHE_MARK,
    KIND_CONVERSATION,
    KIND_MESSAGE,
    KIND_SESSION,
    KIND_TOOL_CALL,
    write_entries,
)
from tests.instance.storage.conftest import FaultProxy


async def _count_ids(dsn: str, table: str, ids: list[str]) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            f"SELECT id::text, count(*) AS n FROM {table} WHERE id::text = ANY($1) GROUP BY id", ids
        )
    finally:
        await conn.close()
    return {r["id"]: r["n"] for r in rows}


async def test_concurrent_appends_share_fsyncs(storage: Storage, pg_dsn: str) -> None:
    cid = await storage.history.new_thread(session_id="s", tool_name="chat", model=None)
    before = storage.backlog()
    msgs = await asyncio.gather(*(storage.history.append(cid, "user", f"m{i}") for i in range(200)))
    after = storage.backlog()
    appends = after["appends_total"] - before["appends_total"]
    commits = after["commits_total"] - before["commits_total"]
    assert appends == 200 and commits < appends / 4  # group commit: many appends per fsync
    assert await storage.flush(10)
    counts = await _count_ids(pg_dsn, "messages", [m.id for m in msgs])
    assert len(counts) == 200 and set(counts.values()) == {1}


async def test_full_spool_refuses_loudly_and_keeps_everything_it_accepted(
    storage_settings: Callable[..., Settings],
    pg_proxy: FaultProxy,
    pg_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = storage_settings(
        database_url=pg_proxy.url(pg_dsn),
        spool_max_bytes=8192,
        spool_full_policy="refuse",
        history_cache_turns=0,
    )
    pg_proxy.cut()
    accepted: list[str] = []
    async with Storage.open(settings, instance_id="t-refuse", redis=None) as st:
        cid = await st.history.new_thread(session_id="s", tool_name="chat", model=None)
        with pytest.raises(SpoolFull) as info:
            for i in range(1000):
                accepted.append((await st.history.append(cid, "user", f"message {i} " + "x" * 200)).id)
        assert "refused" in info.value.message and "EXAI_SPOOL_MAX_BYTES" in str(info.value)
        assert st.backlog()["refused_total"] == 1 and st.backlog()["bytes"] <= 8192
        assert any("SPOOL FULL" in r.message for r in caplog.records)
        pg_proxy.restore()
        assert await st.flush(10)
        # room again: writes are accepted
        accepted.append((await st.history.append(cid, "user", "after")).id)
        assert await st.flush(10)
    counts = await _count_ids(pg_dsn, "messages", accepted)
    assert len(counts) == len(accepted) and set(counts.values()) == {1}


async def test_full_spool_blocks_callers_until_the_flusher_frees_room(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str
) -> None:
    settings = storage_settings(
        database_url=pg_proxy.url(pg_dsn),
        spool_max_bytes=8192,
        spool_full_policy="block",
        spool_block_timeout=0.3,
        history_cache_turns=0,
    )
    pg_proxy.cut()
    async with Storage.open(settings, instance_id="t-block", redis=None) as st:
        cid = await st.history.new_thread(session_id="s", tool_name="chat", model=None)
        with pytest.raises(SpoolFull, match="stayed full"):
            for i in range(1000):
                await st.history.append(cid, "user", f"message {i} " + "x" * 200)
        st.spool.block_timeout = 30.0
        blocked = asyncio.create_task(st.history.append(cid, "user", "patient"))
        await asyncio.sleep(0.2)
        assert not blocked.done()  # waiting for room, not dropped and not failed
        pg_proxy.restore()
        msg = await asyncio.wait_for(blocked, timeout=30)
        assert await st.flush(10)
        assert st.backlog()["blocked_total"] >= 2
    assert await _count_ids(pg_dsn, "messages", [msg.id]) == {msg.id: 1}


async def test_spool_replays_after_restart(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str
) -> None:
    down = storage_settings(database_url=pg_proxy.url(pg_dsn), history_cache_turns=0)
    pg_proxy.cut()
    async with Storage.open(down, instance_id="t-replay", redis=None, close_flush_timeout=0.2) as st:
        cid = await st.history.new_thread(session_id="s", tool_name="chat", model=None)
        ids = [(await st.history.append(cid, "user", f"m{i}")).id for i in range(20)]
        await st.record_tool_call(
            session_id="s", instance_id=None, tool_name="chat", status="ok", duration_ms=3.0
        )
        await st.touch_session(session_id="s-replay", principal="p", client_name="claude", era="handshake")
        await st.touch_session(session_id="s-replay", principal="p", client_name="claude", era="handshake")
    # same state dir and instance id, Postgres back: the spool is the backlog and drains
    async with Storage.open(
        storage_settings(history_cache_turns=0), instance_id="t-replay", redis=None
    ) as st:
        assert st.backlog()["rows"] == 24 or st.backlog()["flushed_total"] > 0
        assert await st.flush(10)
        assert st.backlog()["rows"] == 0
        assert [m.content for m in await st.history.load(cid)] == [f"m{i}" for i in range(20)]
    counts = await _count_ids(pg_dsn, "messages", ids)
    assert len(counts) == 20 and set(counts.values()) == {1}
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM sessions WHERE id = 's-replay'") == 1
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM tool_calls WHERE session_id = 's' AND instance_id = 't-replay'"
            )
            == 1
        )
    finally:
        await conn.close()


async def test_a_row_postgres_refuses_is_quarantined_not_dropped_and_does_not_block(
    storage: Storage, pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    cid = await storage.history.new_thread(session_id="s", tool_name="chat", model=None)
    good = await storage.history.append(cid, "user", "good before")
    poison = dict(good.to_dict(), id=str(uuid.uuid4()), role="oracle")  # violates the role CHECK
    await storage.spool.append(KIND_MESSAGE, poison, thread_id=cid)
    after = await storage.history.append(cid, "assistant", "good after")
    assert await storage.flush(10)
    assert storage.backlog()["dead_rows"] == 1
    assert any("DEAD ROW" in r.message for r in caplog.records)
    counts = await _count_ids(pg_dsn, "messages", [good.id, after.id, poison["id"]])
    assert counts == {good.id: 1, after.id: 1}


async def test_telemetry_is_committed_without_waiting_for_its_fsync(storage: Storage) -> None:
    # Tool-call and session rows are kill -9 safe once committed; their fsync follows on its own
    # thread instead of holding the spool's commit (and the client's next call) behind it.
    before = storage.spool.unsynced_commits
    await storage.record_tool_call(
        session_id="s", instance_id=None, tool_name="version", status="ok", duration_ms=1
    )
    await storage.touch_session(session_id="s-fsync", principal="p", client_name="c", era="2026-07-28")
    assert storage.spool.unsynced_commits == before + 2
    assert await storage.flush(10)


async def test_a_batch_of_every_table_is_one_statement_and_replays_harmlessly(pg_dsn: str) -> None:
    """Conversations, messages, cache marks, tool calls and sessions in one batch: one round
    trip (no BEGIN/COMMIT), every row stored once, and writing the batch again changes nothing."""
    cid, mids, tool, mark = (
        str(uuid.uuid4()),
        [str(uuid.uuid4()) for _ in range(2)],
        str(uuid.uuid4()),
        str(uuid.uuid4()),
    )
    sid = f"sess-{uuid.uuid4().hex[:8]}"
    now = time.time()
    payloads = [
        (KIND_CONVERSATION, {"id": cid, "session_id": sid, "tool_name": "chat", "created_at": now}),
        *(
            (KIND_MESSAGE, {"id": m, "continuation_id": cid, "seq": i, "role": ("user", "assistant")[i],
                            "content": f"turn {i}", "created_at": now, "pos": 0})
            for i, m in enumerate(mids)
        ),
        (KIND_CACHE_MARK, {"id": mark, "conversation_id": cid}),
        (KIND_TOOL_CALL, {"id": tool, "tool_name": "chat", "status": "ok", "created_at": now}),
        (KIND_SESSION, {"id": sid, "client_name": "first", "seen_at": now}),
        (KIND_SESSION, {"id": sid, "client_name": "newest", "seen_at": now + 1}),  # one row per id
    ]  # fmt: skip
    batch = [
        SpoolEntry(seq=i, kind=k, thread_id=None, created=now, payload=p, size=0)
        for i, (k, p) in enumerate(payloads)
    ]
    conn = await asyncpg.connect(pg_dsn)
    sent: list[str] = []
    conn.add_query_logger(lambda q: sent.append(q.query))
    try:
        assert await write_entries(conn, batch) == []
        await asyncio.sleep(0.05)  # asyncpg calls query loggers soon after, not during, the query
        # (asyncpg's own type introspection aside, on a connection's first use of a statement)
        ours = [q.strip() for q in sent if "pg_catalog" not in q and "set_config('jit'" not in q]
        assert len(ours) == 1 and ours[0].startswith("WITH "), ours  # no BEGIN, no COMMIT
        await write_entries(conn, batch)  # a replay (committed, not yet acknowledged in the spool)
        counts = {
            table: await conn.fetchval(f"SELECT count(*) FROM {table} WHERE id::text = ANY($1)", ids)
            for table, ids in (
                ("conversations", [cid]), ("messages", mids), ("thread_cache_marks", [mark]),
                ("tool_calls", [tool]), ("sessions", [sid]),
            )
        }  # fmt: skip
        assert counts == {
            "conversations": 1,
            "messages": 2,
            "thread_cache_marks": 1,
            "tool_calls": 1,
            "sessions": 1,
        }
        assert await conn.fetchval("SELECT client_name FROM sessions WHERE id = $1", sid) == "newest"
        rows = await conn.fetch(
            "SELECT role, content FROM messages WHERE conversation_id = $1 ORDER BY seq", cid
        )
        assert [tuple(r) for r in rows] == [("user", "turn 0"), ("assistant", "turn 1")]
    finally:
        await conn.close()
