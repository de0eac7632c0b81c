"""`chat` and its exchange's spool commit end to end: an SDK client (both eras) -> a real instance
whose spool commits are slowed or failed by its test hook (EXAI_TEST_SPOOL_FAULT_FILE) -> fake
provider, Postgres, Redis.

What must hold however the commit is scheduled against the answer (instance/tools/chat.py,
instance/storage/history.py): when the answer arrives, its turns are stored (in the spool, or
in Postgres already); a failed commit is the tool error, in the spool's words, and leaves
nothing behind that treats its turns as stored (no turns in the thread, no notes captured from
them). A change that answered before the commit landed (e.g. writing the answer while the
spool's thread commits) fails these.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from mcp_types import CallToolResult

from tests.fakes.provider import Behaviour, FakeProvider
from tests.instance.conftest import ERAS, InstanceProc, SpawnInstance, connect, new_session


def _text(result: CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


def _spooled(inst: InstanceProc, cid: str) -> set[str]:
    """Ids of thread `cid`'s turns committed to the instance's spool (read from its file)."""
    path = Path(inst.env["EXAI_STATE_DIR"]) / "spool" / inst.id / "spool.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT payload FROM spool WHERE kind = 'message' AND thread_id = ?", (cid,))
        return {json.loads(payload)["id"] for (payload,) in rows}
    finally:
        db.close()


async def _stored(inst: InstanceProc, pg_dsn: str, cid: str) -> int:
    """Turns of `cid` stored somewhere durable: the spool first, then Postgres (the flusher
    inserts before it deletes, so a turn moving between the two is in one of them, or both)."""
    spooled = _spooled(inst, cid)
    conn = await asyncpg.connect(pg_dsn)
    try:
        rows = await conn.fetch("SELECT id::text FROM messages WHERE conversation_id = $1::uuid", cid)
    finally:
        await conn.close()
    return len(spooled | {r["id"] for r in rows})


@pytest.fixture
def faulty(spawn_instance: SpawnInstance, tmp_path: Path) -> tuple[InstanceProc, Path]:
    fault = tmp_path / "spool-fault"
    return spawn_instance(EXAI_TEST_SPOOL_FAULT_FILE=str(fault)), fault


@pytest.mark.parametrize("mode", ERAS)
async def test_the_answer_comes_once_its_turns_are_stored(
    fake: FakeProvider, faulty: tuple[InstanceProc, Path], pg_dsn: str, mode: str
) -> None:
    inst, fault = faulty
    async with connect(inst, mode, session=new_session()) as client:
        fault.write_text("delay 0.4")  # every spool commit takes 0.4 s from now on
        try:
            first = _ok(await client.call_tool("chat", {"prompt": "remember the word PELICAN"}))
            cid = first["continuation_id"]
            assert await _stored(inst, pg_dsn, cid) == 2, "the answer came before its turns were stored"
            second = _ok(await client.call_tool("chat", {"prompt": "which word?", "continuation_id": cid}))
            assert await _stored(inst, pg_dsn, cid) == 4, "the answer came before its turns were stored"
            assert second["metadata"]["thread_turns"] == 4
        finally:
            fault.unlink()


@pytest.mark.parametrize("mode", ERAS)
async def test_a_failed_commit_is_the_tool_error_and_leaves_nothing(
    fake: FakeProvider, faulty: tuple[InstanceProc, Path], mode: str
) -> None:
    inst, fault = faulty
    async with connect(inst, mode, session=new_session()) as client:
        first = _ok(await client.call_tool("chat", {"prompt": "Which database should we use?"}))
        cid = first["continuation_id"]
        fake.script(Behaviour(content="Decision: database = Postgres"))
        fault.write_text("fail")
        try:
            failed = await client.call_tool("chat", {"prompt": "And the cache?", "continuation_id": cid})
            fresh = await client.call_tool("chat", {"prompt": "A new thread, please."})
        finally:
            fault.unlink()
        for result in (failed, fresh):
            assert result.is_error
            words = _text(result)
            assert words.startswith("[storage_error] could not write to the local spool "), words
            assert "test fault from" in _text(result)
            assert result.structured_content is None
        # The failed exchange is not in the thread, and no note was captured from it.
        again = _ok(await client.call_tool("chat", {"prompt": "Still there?", "continuation_id": cid}))
        assert again["metadata"]["thread_turns"] == 4
        await asyncio.sleep(0.3)  # a capture started by mistake would be written by now
        notes = _ok(await client.call_tool("note_list", {"scope": "thread", "continuation_id": cid}))["notes"]
        assert not [n for n in notes if "Postgres" in n["body"]], notes
