"""Context phase 3 end to end: notes in every chat, within budget and scope; notes captured from turns.

Real instances, Postgres and Redis, SDK clients in both eras; what the model received is read
from the fake provider.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from mcp import Client
from mcp_types import CallToolResult

from instance.context.tokens import count_tokens
from tests.fakes.provider import Behaviour, FakeProvider
from tests.instance.conftest import ERAS, InstanceProc, SpawnInstance, connect, new_session


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, " ".join(getattr(c, "text", "") for c in result.content)
    assert result.structured_content is not None
    return dict(result.structured_content)


def _sent(fake: FakeProvider) -> str:
    """The new user turn of the latest provider request (where the notes block goes)."""
    return str(fake.snapshot()[-1].messages[-1]["content"])


def _everything_sent(fake: FakeProvider) -> str:
    return "\n".join(str(m["content"]) for m in fake.snapshot()[-1].messages)


async def _thread_notes(client: Client, cid: str, *, want: int) -> list[dict[str, Any]]:
    """The thread's notes once at least `want` exist (capture writes them in the background)."""
    notes: list[dict[str, Any]] = []
    for _ in range(100):
        notes = _ok(await client.call_tool("note_list", {"scope": "thread", "continuation_id": cid}))["notes"]
        if len(notes) >= want:
            return notes
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {want} thread notes, have {notes}")


@pytest.mark.parametrize("mode", ERAS)
async def test_notes_follow_the_thread_not_the_session(
    fake: FakeProvider, instance_a: InstanceProc, instance_b: InstanceProc, mode: str
) -> None:
    first_session, other_session = new_session(), new_session()
    async with connect(instance_a, mode, session=first_session) as client:
        cid = _ok(await client.call_tool("chat", {"prompt": "start"}))["continuation_id"]
        for args in (
            {"key": "db", "body": "THREAD-NOTE use asyncpg", "scope": "thread", "continuation_id": cid,
             "kind": "decision", "importance": 9},
            {"key": "mine", "body": "SESSION-NOTE of the first session", "importance": 3},
        ):  # fmt: skip
            _ok(await client.call_tool("note_write", args))
        same = _ok(await client.call_tool("chat", {"prompt": "again", "continuation_id": cid}))
    assert "THREAD-NOTE use asyncpg" in _sent(fake) and "SESSION-NOTE" in _sent(fake)
    assert [n["key"] for n in same["metadata"]["notes_injected"]] == ["db", "mine"]  # importance order

    # Another session on another instance continues the thread: the thread's note, not the
    # first session's own note.
    async with connect(instance_b, mode, session=other_session) as client:
        later = _ok(await client.call_tool("chat", {"prompt": "continue", "continuation_id": cid}))
        sent = _sent(fake)
        assert "THREAD-NOTE use asyncpg" in sent and "SESSION-NOTE" not in sent
        assert later["metadata"]["instance_id"] == instance_b.id
        assert [(n["scope"], n["key"]) for n in later["metadata"]["notes_injected"]] == [("thread", "db")]
        # A new thread in that session carries neither.
        fresh = _ok(await client.call_tool("chat", {"prompt": "unrelated"}))
        assert "THREAD-NOTE" not in _everything_sent(fake) and "SESSION-NOTE" not in _everything_sent(fake)
        assert fresh["metadata"]["notes_injected"] == []


async def test_notes_fit_the_budget_most_important_first(
    fake: FakeProvider, spawn_instance: SpawnInstance
) -> None:
    inst = spawn_instance(EXAI_NOTES_BUDGET_TOKENS="150")
    async with connect(inst, "legacy", session=new_session()) as client:
        for i in range(8):
            body = f"NOTE-{i} " + "detail " * 20  # ~50 tokens each: a few fit in 150, not all
            _ok(await client.call_tool("note_write", {"key": f"n{i}", "body": body, "importance": i}))
        result = _ok(await client.call_tool("chat", {"prompt": "go"}))
    injected = [n["key"] for n in result["metadata"]["notes_injected"]]
    omitted = [n["key"] for n in result["metadata"]["notes_omitted"]]
    by_importance = [f"n{i}" for i in range(7, -1, -1)]
    assert 1 <= len(injected) < 8 and injected == by_importance[: len(injected)], injected
    assert omitted == by_importance[len(injected) :]
    sent = _sent(fake)
    block = sent[: sent.index("</notes>") + len("</notes>")]
    assert count_tokens(block, "glm-4.6") <= 150
    assert all(f"NOTE-{k[1:]}" in block for k in injected)
    assert not any(f"NOTE-{k[1:]}" in sent for k in omitted)


async def test_notes_are_captured_from_a_scripted_thread(
    fake: FakeProvider, instance_a: InstanceProc, instance_b: InstanceProc
) -> None:
    fake.script(
        Behaviour(content="Sounds good.\nDecision: database = Postgres\nTODO: add the migration"),
        Behaviour(content="Agreed.\nDecision: database = SQLite for the embedded mode"),
        Behaviour(content="Error: pool exhausted under load\nFix: raise EXAI_DB_POOL_MAX to 4"),
    )
    async with connect(instance_a, "legacy", session=new_session()) as client:
        first = _ok(
            await client.call_tool(
                "chat", {"prompt": "Constraint: never block the event loop.\nWhich database should we use?"}
            )
        )
        cid = first["continuation_id"]
        assert {n["kind"] for n in first["metadata"]["notes_captured"]} == {"constraint", "decision", "todo"}
        notes = {n["key"]: n for n in await _thread_notes(client, cid, want=3)}
        decision = notes["auto-decision-database"]
        assert decision["body"] == "database = Postgres" and decision["version"] == 1
        assert decision["source"] == "auto" and decision["source_turn"]
        # The same constraint again merges (no new version); a new decision on the same subject
        # supersedes the old one.
        _ok(
            await client.call_tool(
                "chat",
                {
                    "prompt": "Constraint: never block the event loop.\nAnd for embedded?",
                    "continuation_id": cid,
                },
            )
        )
        for _ in range(100):
            notes = {n["key"]: n for n in await _thread_notes(client, cid, want=3)}
            if notes["auto-decision-database"]["version"] == 2:
                break
            await asyncio.sleep(0.1)
    assert notes["auto-decision-database"]["body"] == "database = SQLite for the embedded mode"
    assert notes["auto-decision-database"]["source_turn"] != decision["source_turn"]
    constraint = next(n for n in notes.values() if n["kind"] == "constraint")
    assert constraint["version"] == 1 and len(notes) == 3
    # A later call of the thread, from another instance, carries the captured notes.
    async with connect(instance_b, "2026-07-28", session=new_session()) as client:
        third = _ok(await client.call_tool("chat", {"prompt": "what broke?", "continuation_id": cid}))
        sent = _sent(fake)
        assert "never block the event loop" in sent and "database = SQLite" in sent
        assert "database = Postgres" not in sent
        assert [n["kind"] for n in third["metadata"]["notes_captured"]] == ["error"]
        notes = {n["key"]: n for n in await _thread_notes(client, cid, want=4)}
    error = next(n for n in notes.values() if n["kind"] == "error")
    assert error["body"] == "pool exhausted under load — fix: raise EXAI_DB_POOL_MAX to 4"


async def test_notes_survive_an_instance_restart(fake: FakeProvider, spawn_instance: SpawnInstance) -> None:
    inst = spawn_instance()
    session = new_session()
    async with connect(inst, "legacy", session=session) as client:
        fake.script(Behaviour(content="Decision: cache = Redis streams"))
        cid = _ok(await client.call_tool("chat", {"prompt": "which cache?"}))["continuation_id"]
        await _thread_notes(client, cid, want=1)
    inst.stop()
    inst.start()
    async with connect(inst, "legacy", session=session) as client:
        _ok(await client.call_tool("chat", {"prompt": "remind me", "continuation_id": cid}))
    assert "cache = Redis streams" in _sent(fake)


async def test_model_assisted_capture(fake: FakeProvider, spawn_instance: SpawnInstance) -> None:
    inst = spawn_instance(EXAI_NOTE_CAPTURE="model")
    fake.script(
        Behaviour(content="I would keep the spool in SQLite; it is crash-safe."),  # the answer
        Behaviour(content="Decision: spool = SQLite in WAL mode\nNONE of the rest"),  # the restatement
    )
    async with connect(inst, "legacy", session=new_session()) as client:
        result = _ok(await client.call_tool("chat", {"prompt": "where should the spool live?"}))
        cid = result["continuation_id"]
        notes = await _thread_notes(client, cid, want=1)
    assert [(n["kind"], n["body"], n["source"]) for n in notes] == [
        ("decision", "spool = SQLite in WAL mode", "auto")
    ]
    restate = fake.snapshot()[1]
    assert "Restate the exchange" in restate.messages[0]["content"]
    assert "where should the spool live?" in restate.messages[1]["content"]
