"""The flusher hands Postgres each row's spooled JSON as it is: what lands must be, field by field,
what the spooled payload says (the values a decode in Python and a column per field would give),
and a batch written twice (committed, then replayed before the spool knew) must land once."""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg

from common.settings import Settings
from instance.storage import Storage
from instance.storage.spool import SpoolEntry, encode_payload
from instance.storage.writebehind import (
    KIND_CONVERSATION,
    KIND_MESSAGE,
    KIND_TOOL_CALL,
    write_entries,
)
from tests.instance.storage.conftest import FaultProxy

# Text that JSON escapes or that is not ASCII: quotes, backslashes, control characters, line and
# paragraph separators, astral-plane characters, combining marks, right-to-left script, JSON-
# looking text, and "\/" that a JSON decoder would unescape if it were ever decoded twice.
TRICKY = (
    'quote " backslash \\ slash / \\/ tab \t newline \n return \r bell \x07 esc \x1b del \x7f'
    " sep \u2028 \u2029 bom \ufeff emoji 🧪👩‍💻 cjk 漢字かな 한국어 rtl שלום مرحبا e\u0301 "
    '{"not": "json", "pos": null} \\u0041 \\n'
)
NESTED: dict[str, Any] = {
    "ключ": {"a": [1, -2, 2**53 + 1, 2**62, 0.1, 1e-7, 1e300, -0.0, 3.0, True, False, None]},
    "empty": {"list": [], "dict": {}, "text": ""},
    "deep": {"l1": {"l2": {"l3": {"l4": [[[{"leaf": TRICKY}]]]}}}},
    "nulls": {"x": None, "y": [None, {"z": None}]},
    "order": {"b": 1, "a": 2, "aa": 3, "": 4},
}


def _ts(value: Any) -> datetime:
    """A spooled timestamp as the flusher has always stored it: Unix seconds or ISO 8601."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    return datetime.fromisoformat(str(value))


def _jsonb_text(value: Any, default: str) -> str:
    """What a field encoded by Python on its own (json.dumps) becomes as jsonb."""
    return default if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _uuid(value: Any) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(str(value))


# table -> (its spool kind, [(column, payload field, how the field becomes the column)])
_EXPECT: dict[str, tuple[str, list[tuple[str, str, Any]]]] = {
    "conversations": (KIND_CONVERSATION, [
        ("id", "id", _uuid), ("session_id", "session_id", None), ("tool_name", "tool_name", None),
        ("model", "model", None), ("created_at", "created_at", _ts), ("metadata", "metadata", "{}"),
        ("principal", "principal", None),
    ]),
    "messages": (KIND_MESSAGE, [
        ("id", "id", _uuid), ("conversation_id", "continuation_id", _uuid), ("seq", "seq", None),
        ("role", "role", None), ("content", "content", None), ("session_id", "session_id", None),
        ("tool_name", "tool_name", None), ("model", "model", None), ("files", "files", "[]"),
        ("tokens_in", "tokens_in", None), ("tokens_out", "tokens_out", None),
        ("created_at", "created_at", _ts), ("metadata", "metadata", "{}"), ("pos", "pos", None),
    ]),
    "tool_calls": (KIND_TOOL_CALL, [
        ("id", "id", _uuid), ("session_id", "session_id", None), ("instance_id", "instance_id", None),
        ("tool_name", "tool_name", None), ("status", "status", None),
        ("duration_ms", "duration_ms", None), ("model", "model", None),
        ("tokens_in", "tokens_in", None), ("tokens_out", "tokens_out", None),
        ("error", "error", None), ("created_at", "created_at", _ts),
    ]),
}  # fmt: skip


async def _assert_stored_as_spooled(conn: asyncpg.Connection, entries: list[SpoolEntry]) -> int:
    """Every row of `entries` (conversations, messages, tool calls) is in Postgres with exactly
    its payload's values; jsonb fields compared as Postgres holds them. Returns rows checked."""
    checked = 0
    for table, (kind, fields) in _EXPECT.items():
        payloads = [json.loads(e.blob) for e in entries if e.kind == kind]
        for p in payloads:
            cols = ", ".join(f"{c}::text AS {c}" if isinstance(how, str) else c for c, _, how in fields)
            row = await conn.fetchrow(f"SELECT {cols} FROM {table} WHERE id = $1", uuid.UUID(p["id"]))
            assert row is not None, f"{table} row {p['id']} is missing"
            for column, field, how in fields:
                value = p.get(field)
                if isinstance(how, str):  # jsonb: what Postgres makes of the field's own JSON
                    want = await conn.fetchval("SELECT $1::jsonb::text", _jsonb_text(value, how))
                else:
                    want = how(value) if how is not None and value is not None else value
                got = row[column]
                assert got == want and isinstance(got, type(want)), (table, column, got, want)
            checked += 1
    return checked


async def test_stored_rows_equal_the_spooled_payloads_field_by_field(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str
) -> None:
    """Rows written by the instance's own calls, taken from the spool as the flusher reads them."""
    settings = storage_settings(database_url=pg_proxy.url(pg_dsn), history_cache_turns=0)
    big = ("長い " + TRICKY + " ") * 20_000  # several MB of UTF-8, mostly not ASCII
    pg_proxy.cut()  # everything stays in the spool until the test has read it
    async with Storage.open(settings, instance_id="t-json", redis=None, close_flush_timeout=0.2) as st:
        cid = await st.history.new_thread(
            session_id=None, tool_name="chat", model=None, metadata=NESTED, principal=None
        )
        bare = await st.history.new_thread(session_id="s-json", tool_name=TRICKY, model="m ü")
        turns = await st.history.append_exchange(
            cid,
            [
                {"role": "user", "content": TRICKY, "files": ["/a/ü.py", "b c.txt", "\\"],
                 "metadata": NESTED, "session_id": "s-json", "tool_name": "chat", "model": "kimi"},
                {"role": "assistant", "content": big, "tokens_in": 0, "tokens_out": 2**31 - 1},
            ],
        )  # fmt: skip
        turns.append(await st.history.append(bare, "system", "", files=[], metadata={}))
        turns.append(
            await st.history.append(bare, "tool", "x" * 100_000, metadata={"n": {"m": [{"o": None}]}})
        )
        await st.record_tool_call(
            session_id=None, instance_id=None, tool_name="chat", status="error", duration_ms=0.1 + 0.2,
            error=TRICKY,
        )  # fmt: skip
        await st.record_tool_call(
            session_id="s-json", instance_id="i", tool_name=TRICKY, status="ok", duration_ms=None,
            model="m", tokens_in=1, tokens_out=2,
        )  # fmt: skip
        spooled = await st.spool.read_batch(1000)
    assert {e.kind for e in spooled} == {KIND_CONVERSATION, KIND_MESSAGE, KIND_TOOL_CALL}
    assert any(json.loads(e.blob).get("content") == big for e in spooled)
    # The turns were spooled before Redis gave their exchange its position: the flusher fills it
    # in (from memory, or, after a restart, from the append script sent again), as Redis gave it.
    assert [m.pos for m in turns] == [1, 1, 1, 2]
    placed = {m.id: m.pos for m in turns}
    spooled = [
        e.with_blob(encode_payload({**json.loads(e.blob), "pos": placed[json.loads(e.blob)["id"]]}))
        if e.kind == KIND_MESSAGE
        else e
        for e in spooled
    ]
    pg_proxy.restore()
    async with Storage.open(settings, instance_id="t-json", redis=None) as st:
        assert await st.flush(20) and st.backlog()["dead_rows"] == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await _assert_stored_as_spooled(conn, spooled) == len(spooled) == 8
    finally:
        await conn.close()


async def test_timestamps_land_to_the_microsecond_as_python_reads_them(pg_dsn: str) -> None:
    """Unix seconds round half to even on the fraction (datetime.fromtimestamp), not as Postgres's
    to_timestamp would; ISO 8601 keeps its offset; on many random times and the halfway cases."""
    now = time.time()
    rng = random.Random(7)
    times: list[Any] = [now + rng.uniform(-3e8, 3e8) for _ in range(3000)]
    times += [1700000000.0000005, 1700000000.9999995, 1700000000.1234565, 0.5, 1.0000015, 1e9]
    times += [1700000000, "2026-11-27T22:07:11.123456+00:00", "2026-11-27T22:07:11+05:30"]
    times += ["2000-02-29T23:59:59.999999-08:00"]
    entries = [
        SpoolEntry(
            seq=i, kind=KIND_TOOL_CALL, thread_id=None, created=now, size=0,
            blob=encode_payload({"id": str(uuid.uuid4()), "tool_name": "t", "status": "ok", "created_at": t}),
        )
        for i, t in enumerate(times)
    ]  # fmt: skip
    conn = await asyncpg.connect(pg_dsn)
    try:
        await write_entries(conn, entries)
        assert await _assert_stored_as_spooled(conn, entries) == len(times)
    finally:
        await conn.close()


async def test_a_batch_keeps_the_newest_row_of_an_id_and_nulls_take_the_defaults(pg_dsn: str) -> None:
    cid, mid = str(uuid.uuid4()), str(uuid.uuid4())
    now = time.time()
    first = {
        "id": mid,
        "continuation_id": cid,
        "seq": 1,
        "role": "user",
        "content": "older",
        "created_at": now,
        "files": ["x"],
        "metadata": {"v": 1},
    }
    newest = {
        "id": mid,
        "continuation_id": cid,
        "seq": 2,
        "role": "assistant",
        "content": "newest",
        "created_at": now + 1,
        "files": None,
        "metadata": None,
        "pos": None,
        "model": None,
    }
    bare = {"id": cid, "created_at": now}  # every optional field missing
    entries = [
        SpoolEntry(seq=i, kind=k, thread_id=cid, created=now, size=0, blob=encode_payload(p))
        for i, (k, p) in enumerate([(KIND_MESSAGE, first), (KIND_CONVERSATION, bare), (KIND_MESSAGE, newest)])
    ]  # fmt: skip
    conn = await asyncpg.connect(pg_dsn)
    try:
        await write_entries(conn, entries)
        assert await _assert_stored_as_spooled(conn, [entries[1], entries[2]]) == 2
        row = await conn.fetchrow(
            "SELECT content, files::text, metadata::text FROM messages WHERE id = $1", uuid.UUID(mid)
        )
        assert tuple(row) == ("newest", "[]", "{}")
        conv = await conn.fetchrow(
            "SELECT metadata::text, session_id FROM conversations WHERE id = $1", uuid.UUID(cid)
        )
        assert tuple(conv) == ("{}", None)
    finally:
        await conn.close()


async def _snapshot(conn: asyncpg.Connection, sid: str, cids: list[str]) -> dict[str, list[str]]:
    """Every row the test wrote, whole, as text: the same snapshot twice means nothing changed."""
    ids = [uuid.UUID(c) for c in cids]
    queries = {
        "conversations": ("SELECT c::text FROM conversations c WHERE id = ANY($1) ORDER BY id", ids),
        "messages": ("SELECT m::text FROM messages m WHERE conversation_id = ANY($1) ORDER BY id", ids),
        "tool_calls": ("SELECT t::text FROM tool_calls t WHERE session_id = $1 ORDER BY id", sid),
        "sessions": ("SELECT s::text FROM sessions s WHERE id = $1", sid),
    }
    return {table: [r[0] for r in await conn.fetch(sql, arg)] for table, (sql, arg) in queries.items()}


async def test_a_batch_replayed_after_it_landed_stores_nothing_twice(
    storage_settings: Callable[..., Settings], pg_proxy: FaultProxy, pg_dsn: str
) -> None:
    """The crash between the commit and the spool's delete: the batch is in Postgres and still in
    the spool, so the next run's flusher sends it again. Nothing is doubled or changed."""
    settings = storage_settings(database_url=pg_proxy.url(pg_dsn), history_cache_turns=0)
    sid = f"s-replay-{uuid.uuid4().hex[:8]}"
    pg_proxy.cut()
    async with Storage.open(settings, instance_id="t-json-replay", redis=None, close_flush_timeout=0.2) as st:
        cids = []
        for n in range(3):
            cid = await st.history.new_thread(session_id=sid, tool_name="chat", model=None, metadata=NESTED)
            cids.append(cid)
            for i in range(4):
                await st.history.append_exchange(
                    cid, [{"role": "user", "content": f"q{i} {TRICKY}", "session_id": sid},
                          {"role": "assistant", "content": f"a{i} ✓", "metadata": {"n": n, "i": i}}],
                )  # fmt: skip
                await st.record_tool_call(
                    session_id=sid, instance_id=None, tool_name="chat", status="ok", duration_ms=i / 3
                )
            await st.touch_session(session_id=sid, principal="p", client_name=f"c{n}", era="e")
        spooled = await st.spool.read_batch(1000)
    assert len(spooled) == 3 * (1 + 4 * 3 + 1)
    # The first run's flush: committed, and then the process died before the spool's delete.
    conn = await asyncpg.connect(pg_dsn)
    try:
        for start in range(0, len(spooled), 7):  # in batches, as the flusher sends them
            await write_entries(conn, spooled[start : start + 7])
        landed = await _snapshot(conn, sid, cids)
        assert [len(landed[t]) for t in ("conversations", "messages", "tool_calls", "sessions")] == [
            3,
            24,
            12,
            1,
        ]
        pg_proxy.restore()
        async with Storage.open(settings, instance_id="t-json-replay", redis=None) as st:
            assert st.backlog()["rows"] == len(spooled)  # the spool still holds every row
            assert await st.flush(20)
            assert st.backlog()["rows"] == 0 and st.backlog()["dead_rows"] == 0
            assert st.backlog()["flushed_total"] == len(spooled)  # all of it was sent again
        assert await _snapshot(conn, sid, cids) == landed
        assert await _assert_stored_as_spooled(conn, spooled) == 3 + 24 + 12
        assert await conn.fetchval("SELECT client_name FROM sessions WHERE id = $1", sid) == "c2"
    finally:
        await conn.close()


async def test_a_non_finite_duration_is_stored_not_refused(storage: Storage, pg_dsn: str) -> None:
    """JSON has no NaN or infinity: the tool call spools Postgres's spelling of them instead, so the
    row lands with its value rather than being refused as bad JSON (and moved to `dead`)."""
    sid = f"s-nan-{uuid.uuid4().hex[:8]}"
    for d in (float("nan"), float("inf"), float("-inf"), 1.5):
        await storage.record_tool_call(
            session_id=sid, instance_id=None, tool_name="t", status="ok", duration_ms=d
        )
    assert await storage.flush(10) and storage.backlog()["dead_rows"] == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        got = await conn.fetch("SELECT duration_ms::text FROM tool_calls WHERE session_id = $1", sid)
    finally:
        await conn.close()
    assert sorted(r[0] for r in got) == sorted(["NaN", "Infinity", "-Infinity", "1.5"])
