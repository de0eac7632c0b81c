"""`chat` end to end: SDK client (both eras) -> real instance -> fake provider, Postgres, Redis."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from mcp_types import CallToolResult

from tests.fakes.provider import Behaviour, FakeProvider
from tests.instance.conftest import ERAS, InstanceProc, SpawnInstance, connect, new_session


def _error_text(result: CallToolResult) -> str:
    assert result.is_error, result
    return " ".join(getattr(c, "text", "") for c in result.content)


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _error_text_any(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


def _error_text_any(result: CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.parametrize("mode", ERAS)
async def test_thread_continues_on_another_instance(
    fake: FakeProvider, instance_a: InstanceProc, instance_b: InstanceProc, mode: str
) -> None:
    async with connect(instance_a, mode, session=new_session()) as client:
        first = _ok(
            await client.call_tool("chat", {"prompt": "remember the word PELICAN", "model": "glm-4.6"})
        )
    assert first["status"] == "continuation_available"
    assert "PELICAN" in first["content"]
    cid = first["continuation_id"]
    assert first["continuation_offer"]["continuation_id"] == cid
    assert first["continuation_offer"]["remaining_turns"] == 18
    assert first["metadata"]["instance_id"] == instance_a.id
    # The text content carries the same result for clients that ignore structured content.
    async with connect(instance_b, mode, session=new_session()) as client:
        second = _ok(await client.call_tool("chat", {"prompt": "which word?", "continuation_id": cid}))
    assert second["continuation_id"] == cid
    assert second["metadata"]["instance_id"] == instance_b.id
    assert second["continuation_offer"]["remaining_turns"] == 16
    last = fake.snapshot()[-1]
    contents = [m["content"] for m in last.messages]
    assert any("PELICAN" in c for c in contents[1:-1]), "the first turn was not in the second call's history"
    assert [m["role"] for m in last.messages] == ["system", "user", "assistant", "user"]


async def test_text_content_mirrors_structured_result(fake: FakeProvider, instance_a: InstanceProc) -> None:
    async with connect(instance_a, "legacy", session=new_session()) as client:
        result = await client.call_tool("chat", {"prompt": "hi"})
    body = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert body["continuation_id"] == _ok(result)["continuation_id"]


@pytest.mark.parametrize("mode", ERAS)
async def test_five_concurrent_chats_overlap(fake: FakeProvider, instance_a: InstanceProc, mode: str) -> None:
    fake.default = Behaviour(delay=1.0)
    async with connect(instance_a, mode, session=new_session()) as client:
        started = time.monotonic()
        results = await asyncio.gather(
            *(client.call_tool("chat", {"prompt": f"question {i}"}) for i in range(5))
        )
        elapsed = time.monotonic() - started
    for i, result in enumerate(results):
        assert f"question {i}" in _ok(result)["content"]
    assert fake.max_overlap() == 5, "the provider did not see the 5 calls in flight together"
    assert elapsed < 3.0, f"5 one-second calls took {elapsed:.1f}s"


async def test_rate_limit_is_retried_through_the_tool(fake: FakeProvider, instance_a: InstanceProc) -> None:
    fake.script(Behaviour(status=429, retry_after="1"))
    async with connect(instance_a, "2026-07-28", session=new_session()) as client:
        result = _ok(await client.call_tool("chat", {"prompt": "patience"}))
    hits = fake.snapshot()
    assert len(hits) == 2 and result["metadata"]["attempts"] == 2
    assert hits[1].started - hits[0].started >= 0.9


async def test_persistent_500_is_a_clear_tool_error_without_storm(
    fake: FakeProvider, instance_a: InstanceProc
) -> None:
    fake.default = Behaviour(status=500)
    async with connect(instance_a, "legacy", session=new_session()) as client:
        started = time.monotonic()
        result = await client.call_tool("chat", {"prompt": "doomed"})
        elapsed = time.monotonic() - started
    text = _error_text(result)
    assert "[provider_unavailable]" in text and "HTTP 500" in text
    assert "Traceback" not in text
    assert len(fake.snapshot()) == 3  # 1 + EXAI_PROVIDER_MAX_RETRIES=2
    assert elapsed < 8.0  # EXAI_PROVIDER_RETRY_BUDGET


async def test_progress_is_reported_for_slow_calls(fake: FakeProvider, instance_a: InstanceProc) -> None:
    fake.default = Behaviour(delay=3.0)
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    async with connect(instance_a, "legacy", session=new_session()) as client:
        _ok(await client.call_tool("chat", {"prompt": "slow"}, progress_callback=on_progress))
    assert seen and "waiting for glm-4.6" in (seen[0][1] or "")


async def test_files_from_allowed_roots(
    fake: FakeProvider, instance_a: InstanceProc, allowed_root: Path
) -> None:
    path = allowed_root / "notes.py"
    path.write_text("SECRET_CONSTANT = 42\n")
    async with connect(instance_a, "legacy", session=new_session()) as client:
        result = _ok(await client.call_tool("chat", {"prompt": "explain", "files": [str(path)]}))
        outside = await client.call_tool("chat", {"prompt": "explain", "files": ["/etc/hostname"]})
    assert result["metadata"]["files"] == [str(path.resolve())]
    assert "SECRET_CONSTANT = 42" in fake.snapshot()[0].messages[-1]["content"]
    assert "outside the allowed roots" in _error_text(outside)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "temperature": 7}, "temperature"),
        ({"prompt": "x", "model": "gpt-5"}, "[invalid_argument] unknown model"),
        ({"prompt": "x", "thinking_mode": "extreme"}, "thinking_mode"),
        ({"prompt": "x", "files": ["relative.py"]}, "not absolute"),
        ({"prompt": "x", "continuation_id": "not-a-uuid"}, "continuation_id"),
        ({"prompt": "x", "continuation": "abc"}, "[invalid_argument] unknown argument(s) continuation"),
        ({"prompt": "x", "continuation_id": "9b2f8f5e-8f57-4a53-9a53-1f7d3b1f0c11"}, "[thread_not_found]"),
    ],
)
async def test_bad_chat_arguments_are_clear_errors(
    fake: FakeProvider, instance_a: InstanceProc, arguments: dict[str, Any], expected: str
) -> None:
    async with connect(instance_a, "2026-07-28", session=new_session()) as client:
        result = await client.call_tool("chat", arguments)
    text = _error_text(result)
    assert expected in text and "Traceback" not in text
    assert not fake.snapshot(), "a bad call must not reach the provider"


async def test_no_key_names_the_variables(fake: FakeProvider, spawn_instance: SpawnInstance) -> None:
    inst = spawn_instance(GLM_API_KEY=None, KIMI_API_KEY=None)
    async with connect(inst, "legacy", session=new_session()) as client:
        result = await client.call_tool("chat", {"prompt": "hello"})
        models = _ok(await client.call_tool("listmodels", {}))
    text = _error_text(result)
    assert "[provider_not_configured]" in text and "GLM_API_KEY" in text and "KIMI_API_KEY" in text
    assert models["configured_providers"] == [] and not any(m["available"] for m in models["models"])
