"""Issue 14 on an instance: validation before cost, whole turns, one error shape, principals.

Real `exai-instance` processes on this run's Postgres and Redis; the fake provider counts the
calls that would have cost money.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult

from common.protocol import ADMIN_PRINCIPAL, INTERNAL_TOKEN_HEADER, PRINCIPAL_HEADER, SESSION_HEADER
from tests.fakes.provider import Behaviour, FakeProvider
from tests.instance.conftest import INTERNAL_TOKEN, InstanceProc, SpawnInstance, connect, new_session

# `[code] what happened. what to do.`: a code, then sentences that each end in a full stop.
ERROR_SHAPE = re.compile(r"\[[a-z_]+\] [^\n]+[.?!]", re.DOTALL)


def _err(result: CallToolResult) -> str:
    assert result.is_error, result
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert ERROR_SHAPE.fullmatch(text), text
    assert "Error executing tool" not in text and "validation error" not in text, text
    return text


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return dict(result.structured_content)


async def _threads_in_pg(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM conversations"))
    finally:
        await conn.close()


# --- point 6: validation before cost ---------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"prompt": "a\x00b"}, "NUL"),
        ({"prompt": "x" * (6 * 1024 * 1024)}, "limit"),
        ({"prompt": "hi", "files": ["/tmp/a\x00b"]}, "NUL"),
        ({"prompt": "hi", "continuation_id": "not-a-thread"}, "continuation_id"),
    ],
    ids=["nul-prompt", "6mb-prompt", "nul-path", "bad-thread-id"],
)
async def test_chat_refuses_bad_arguments_before_the_provider_and_any_write(
    fake: FakeProvider, instance_a: InstanceProc, pg_dsn: str, arguments: dict[str, Any], expected: str
) -> None:
    before = await _threads_in_pg(pg_dsn)
    async with connect(instance_a, "legacy", session=new_session()) as client:
        text = _err(await client.call_tool("chat", arguments))
        # Storage settles (write-behind) before counting: a refused call wrote nothing.
        _ok(await client.call_tool("status", {}))
    assert text.startswith("[invalid_argument]") and expected in text, text
    assert fake.snapshot() == [], "the provider was called for a call that was then refused"
    assert await _threads_in_pg(pg_dsn) == before


async def test_a_failed_provider_call_leaves_no_empty_thread(
    fake: FakeProvider, instance_a: InstanceProc, pg_dsn: str
) -> None:
    fake.default = Behaviour(status=400)
    before = await _threads_in_pg(pg_dsn)
    async with connect(instance_a, "legacy", session=new_session()) as client:
        text = _err(await client.call_tool("chat", {"prompt": "hello"}))
    assert text.startswith("[provider_rejected]")
    assert await _threads_in_pg(pg_dsn) == before


async def test_a_reply_with_nul_is_stored_whole(fake: FakeProvider, instance_a: InstanceProc) -> None:
    fake.script(Behaviour(content="before\x00after"))
    async with connect(instance_a, "legacy", session=new_session()) as client:
        first = _ok(await client.call_tool("chat", {"prompt": "say it"}))
        assert first["content"] == "before\ufffdafter"
        cid = first["continuation_id"]
        second = _ok(await client.call_tool("chat", {"prompt": "again", "continuation_id": cid}))
    assert second["metadata"]["thread_turns"] == 4
    roles = [m["role"] for m in fake.snapshot()[-1].messages]
    assert roles == ["system", "user", "assistant", "user"], "the first answer is missing from the thread"


# --- point 7: one error shape ----------------------------------------------------------------
BAD = "invalid_argument"
NESTED: dict[str, Any] = {}
_level = NESTED
for _ in range(40):
    _level["n"] = {}
    _level = _level["n"]


@pytest.mark.parametrize(
    ("tool", "arguments", "code", "expected"),
    [
        ("task_create", {"name": "x", "state": "in_progress"}, "invalid_argument", "state"),
        ("task_update", {"task_id": "x", "expected_version": "6", "name": "n"}, BAD, "version"),
        ("task_update", {"task_id": "x", "expected_version": 1.0, "name": "n"}, BAD, "version"),
        ("task_update", {"task_id": "x", "expected_version": True, "name": "n"}, BAD, "version"),
        ("note_write", {"key": "k", "body": "b", "importance": "3"}, "invalid_argument", "importance"),
        ("no_such_tool", {}, "unknown_tool", "no_such_tool"),
        ("task_create", {"name": "x", "metadata": {"a": "b\x00"}}, BAD, "NUL"),
        ("task_create", {"name": "x", "metadata": NESTED}, BAD, "nested"),
        ("note_write", {"key": "k", "body": "a\x00b"}, BAD, "NUL"),
        ("chat", {"prompt": "hi", "model": "gpt-5"}, "invalid_argument", "'gpt-5'. Use one of"),
        ("chat", {"prompt": "hi", "continuation": "x"}, "invalid_argument", "continuation"),
        ("note_read", {"key": "k", "scope": "thread", "continuation_id": "no"}, BAD, "continuation_id"),
    ],
)  # fmt: skip
async def test_every_tool_error_has_the_fleet_shape(
    fake: FakeProvider,
    instance_a: InstanceProc,
    tool: str,
    arguments: dict[str, Any],
    code: str,
    expected: str,
) -> None:
    async with connect(instance_a, "2026-07-28", session=new_session()) as client:
        text = _err(await client.call_tool(tool, arguments))
    assert text.startswith(f"[{code}]"), text
    assert expected in text, text
    assert fake.snapshot() == []


# --- point 8: principals ---------------------------------------------------------------------
@contextlib.asynccontextmanager
async def _as(inst: InstanceProc, principal: str) -> AsyncIterator[Client]:
    headers = {
        INTERNAL_TOKEN_HEADER: INTERNAL_TOKEN,
        SESSION_HEADER: new_session(),
        PRINCIPAL_HEADER: principal,
    }
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(60.0))
    async with http:
        try:
            async with Client(streamable_http_client(inst.url + "/mcp", http_client=http)) as client:
                yield client
        finally:
            # As the router does when a session ends: the instance takes the next session only
            # after a reset in this one's name.
            with contextlib.suppress(httpx2.HTTPError):
                await http.post(inst.url + "/internal/reset")


@pytest.fixture(scope="module")
def team_instance(session_spawner: SpawnInstance) -> InstanceProc:
    return session_spawner("inst_team", EXAI_AUTH_TOKENS="alice=tok-a,bob=tok-b")


async def test_principals_see_only_their_own_threads_notes_and_tasks(
    fake: FakeProvider, team_instance: InstanceProc
) -> None:
    async with _as(team_instance, "alice") as alice:
        cid = _ok(await alice.call_tool("chat", {"prompt": "alice's secret"}))["continuation_id"]
        _ok(
            await alice.call_tool(
                "note_write", {"key": "k", "body": "b", "scope": "thread", "continuation_id": cid}
            )
        )
        task = _ok(await alice.call_tool("task_create", {"name": "alice's", "scope": "global"}))["task"]
    async with _as(team_instance, "bob") as bob:
        assert _err(await bob.call_tool("chat", {"prompt": "leak", "continuation_id": cid})).startswith(
            "[thread_not_found]"
        )
        for tool, args in (
            ("note_read", {"key": "k"}),
            ("note_list", {}),
            ("note_write", {"key": "k", "body": "mine now"}),
        ):
            text = _err(await bob.call_tool(tool, {**args, "scope": "thread", "continuation_id": cid}))
            assert text.startswith("[thread_not_found]"), text
        listed = _ok(await bob.call_tool("task_list", {"scope": "global"}))
        assert task["id"] not in {t["id"] for t in listed["tasks"]}
        assert _err(await bob.call_tool("task_get", {"task_id": task["id"]})).startswith("[task_not_found]")
    assert len(fake.snapshot()) == 1, "bob's refused continuation reached the provider"
    async with _as(team_instance, ADMIN_PRINCIPAL) as admin:
        assert task["id"] in {
            t["id"] for t in _ok(await admin.call_tool("task_list", {"scope": "global"}))["tasks"]
        }
        _ok(await admin.call_tool("note_read", {"key": "k", "scope": "thread", "continuation_id": cid}))
    async with _as(team_instance, "alice") as alice:
        second = _ok(await alice.call_tool("chat", {"prompt": "go on", "continuation_id": cid}))
        assert second["metadata"]["thread_turns"] == 4


async def test_one_principal_keeps_everything_shared(fake: FakeProvider, instance_a: InstanceProc) -> None:
    """The single-user default: no EXAI_AUTH_TOKENS, everything visible across sessions."""
    async with _as(instance_a, "local") as one:
        cid = _ok(await one.call_tool("chat", {"prompt": "shared"}))["continuation_id"]
        task = _ok(await one.call_tool("task_create", {"name": "shared", "scope": "global"}))["task"]
    async with _as(instance_a, "someone-else") as other:
        _ok(await other.call_tool("chat", {"prompt": "go on", "continuation_id": cid}))
        assert task["id"] in {
            t["id"] for t in _ok(await other.call_tool("task_list", {"scope": "global"}))["tasks"]
        }
