"""Task and note tools through the SDK client: lifecycle, version conflicts, scopes, bad input."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from mcp_types import CallToolResult

from tests.instance.conftest import ERAS, InstanceProc, connect, new_session


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


def _text(result: CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


def _err(result: CallToolResult) -> str:
    assert result.is_error, result.structured_content
    text = _text(result)
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize("mode", ERAS)
async def test_task_lifecycle_with_version_conflict(instance_a: InstanceProc, mode: str) -> None:
    session = new_session()
    async with connect(instance_a, mode, session=session) as client:
        parent = _ok(await client.call_tool("task_create", {"name": "ship the fleet", "description": "v1"}))[
            "task"
        ]
        assert parent["state"] == "NOT_STARTED" and parent["version"] == 1
        assert parent["session_id"] == session
        child = _ok(
            await client.call_tool("task_create", {"name": "write tests", "parent_task_id": parent["id"]})
        )["task"]

        moved = _ok(
            await client.call_tool(
                "task_update", {"task_id": parent["id"], "expected_version": 1, "state": "IN_PROGRESS"}
            )
        )["task"]
        assert moved["state"] == "IN_PROGRESS" and moved["version"] == 2

        stale = await client.call_tool(
            "task_update", {"task_id": parent["id"], "expected_version": 1, "state": "COMPLETE"}
        )
        text = _err(stale)
        assert "[version_conflict]" in text and "2" in text

        done = _ok(
            await client.call_tool(
                "task_update", {"task_id": parent["id"], "expected_version": 2, "state": "COMPLETE"}
            )
        )["task"]
        assert done["state"] == "COMPLETE" and done["completed_at"]

        bad = await client.call_tool(
            "task_update", {"task_id": parent["id"], "expected_version": 3, "state": "NOT_STARTED"}
        )
        assert "[invalid_transition]" in _err(bad)

        got = _ok(await client.call_tool("task_get", {"task_id": parent["id"], "include_events": True}))
        assert got["task"]["version"] == 3 and len(got["events"]) == 3

        listed = _ok(await client.call_tool("task_list", {}))
        assert {t["id"] for t in listed["tasks"]} == {parent["id"], child["id"]}
        tree = _ok(await client.call_tool("task_list", {"tree": True}))
        assert tree["count"] == 1 and tree["tasks"][0]["children"][0]["id"] == child["id"]
        only_done = _ok(await client.call_tool("task_list", {"state": "COMPLETE"}))
        assert [t["id"] for t in only_done["tasks"]] == [parent["id"]]

    # Another session neither sees nor changes session-scoped tasks, but shares global ones.
    async with connect(instance_a, mode, session=new_session()) as other:
        assert _ok(await other.call_tool("task_list", {}))["count"] == 0
        assert "[task_not_found]" in _err(await other.call_tool("task_get", {"task_id": parent["id"]}))
        shared = _ok(await other.call_tool("task_create", {"name": "shared", "scope": "global"}))["task"]
    async with connect(instance_a, mode, session=session) as client:
        scoped = _ok(await client.call_tool("task_list", {"scope": "global"}))
        assert shared["id"] in {t["id"] for t in scoped["tasks"]}


async def test_task_create_with_a_client_id_is_idempotent(instance_a: InstanceProc) -> None:
    """A retried create (the first answer lost) with the caller's task_id returns the task the
    first attempt made: one task, one `created` event; the id is nobody else's to reuse."""
    task_id = str(uuid.uuid4())
    session = new_session()
    async with connect(instance_a, "2026-07-28", session=session) as client:
        first = _ok(await client.call_tool("task_create", {"name": "deploy", "task_id": task_id}))["task"]
        again = _ok(await client.call_tool("task_create", {"name": "deploy", "task_id": task_id}))["task"]
        assert first["id"] == again["id"] == task_id
        assert again["version"] == 1 and again["created_at"] == first["created_at"]
        listed = _ok(await client.call_tool("task_list", {}))
        assert [t["id"] for t in listed["tasks"]] == [task_id]
        got = _ok(await client.call_tool("task_get", {"task_id": task_id, "include_events": True}))
        assert [e["event"] for e in got["events"]] == ["created"]
    async with connect(instance_a, "2026-07-28", session=new_session()) as other:
        text = _err(await other.call_tool("task_create", {"name": "mine now", "task_id": task_id}))
        assert "already used" in text and ERROR_SHAPE.fullmatch(text), text
        assert _ok(await other.call_tool("task_list", {}))["count"] == 0


# `[code] what happened. what to do.`: a code, then sentences that each end in a full stop.
ERROR_SHAPE = re.compile(r"\[[a-z_]+\] [^\n]+[.?!]", re.DOTALL)


@pytest.mark.parametrize(
    ("tool", "arguments", "expected"),
    [
        ("task_create", {}, "name"),
        ("task_create", {"name": ""}, "name"),
        ("task_create", {"name": "x", "state": "DONE"}, "state"),
        ("task_create", {"name": "x", "scope": "world"}, "scope"),
        ("task_create", {"name": "x", "parent_task_id": "nope"}, "parent_task_id"),
        ("task_create", {"name": "x", "task_id": "not-a-uuid"}, "task_id"),
        ("task_update", {"task_id": "x"}, "expected_version"),
        (
            "task_update",
            {"task_id": "9b2f8f5e-8f57-4a53-9a53-1f7d3b1f0c11", "expected_version": 1, "name": "n"},
            "[task_not_found]",
        ),
        ("task_get", {"task_id": "not-a-uuid"}, "task_id"),
        ("note_write", {"key": "k"}, "body"),
        ("note_write", {"key": "k", "body": "b", "scope": "thread"}, "continuation_id"),
        ("note_write", {"key": "", "body": "b"}, "key"),
        ("note_read", {"key": "never-written"}, "[note_not_found]"),
        ("nonexistent_tool", {}, "[unknown_tool]"),
    ],
)
async def test_bad_task_and_note_inputs(
    instance_a: InstanceProc, tool: str, arguments: dict[str, Any], expected: str
) -> None:
    async with connect(instance_a, "2026-07-28", session=new_session()) as client:
        result = await client.call_tool(tool, arguments)
    assert expected in _err(result)
    assert ERROR_SHAPE.fullmatch(_err(result)), _err(result)


@pytest.mark.parametrize("mode", ERAS)
async def test_notes_round_trip(instance_a: InstanceProc, mode: str) -> None:
    async with connect(instance_a, mode, session=new_session()) as client:
        written = _ok(
            await client.call_tool(
                "note_write", {"key": "decision", "body": "use asyncpg", "kind": "decision", "importance": 5}
            )
        )["note"]
        assert written["version"] == 1
        again = _ok(
            await client.call_tool("note_write", {"key": "decision", "body": "use asyncpg + pgbouncer"})
        )
        assert again["note"]["version"] == 2
        stale = await client.call_tool("note_write", {"key": "decision", "body": "x", "expected_version": 1})
        assert "[version_conflict]" in _err(stale)
        read = _ok(await client.call_tool("note_read", {"key": "decision"}))["note"]
        assert read["body"] == "use asyncpg + pgbouncer"
        cid = _ok(await client.call_tool("chat", {"prompt": "start a thread"}))["continuation_id"]
        _ok(
            await client.call_tool(
                "note_write", {"key": "t", "body": "thread note", "scope": "thread", "continuation_id": cid}
            )
        )
        listed = _ok(await client.call_tool("note_list", {}))
        assert [n["key"] for n in listed["notes"]] == ["decision"]
        thread_notes = _ok(await client.call_tool("note_list", {"scope": "thread", "continuation_id": cid}))
        assert [n["body"] for n in thread_notes["notes"]] == ["thread note"]
        assert _ok(await client.call_tool("note_delete", {"key": "decision"}))["deleted"] is True
        assert "[note_not_found]" in _err(await client.call_tool("note_read", {"key": "decision"}))
        too_big = await client.call_tool("note_write", {"key": "big", "body": "x" * 100_000})
        assert "[note_too_large]" in _err(too_big)
