"""EXAI's workflow tools end to end: SDK clients -> router -> instances -> fake provider.

One fleet (3 instances, GLM and Kimi both pointed at the fake provider) serves the whole
module. For every tool: steps 1..n with a backtrack, the step state carried from one session
(instance) to another, the expert model called exactly once with the kept work and the
relevant files, the thread continued by `chat` from a third session, progress notifications
while the provider is slow, and cancellation reaching the provider request.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp_types import CallToolResult

from instance.workflows.catalog import SPECS
from tests.fakes.provider import Behaviour, FakeProvider, Hit
from tests.fleet import Fleet
from tests.router.conftest import ROUTER_TEST_SETTINGS, instance_num, mcp_client, status_of

pytestmark = pytest.mark.timeout(180)

SPEC = {spec.name: spec for spec in SPECS}
STEP_TOOLS = sorted(SPEC)
ALL_TOOLS = [*STEP_TOOLS, "challenge"]
GIT_TOOLS = {"precommit", "codereview"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git working tree with one committed file and one unstaged change."""
    root = tmp_path_factory.mktemp("project")
    source = root / "app.py"
    source.write_text("# FILE-MARKER\ndef answer():\n    return 41\n")

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "add", "app.py")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first")
    source.write_text("# FILE-MARKER\ndef answer():\n    return 42  # DIFF-MARKER\n")
    return root


@pytest.fixture(scope="module")
def fleet(module_fleet_factory: Callable[..., Fleet], provider: FakeProvider, project: Path) -> Fleet:
    return module_fleet_factory(
        instances=3,
        max_instances=3,
        glm_api_key="fake-glm-key",
        glm_api_url=provider.glm_url,
        kimi_api_key="fake-kimi-key",
        kimi_api_url=provider.kimi_url,
        provider_max_retries=1,
        allowed_file_roots=[project],
        **ROUTER_TEST_SETTINGS,
    )


@pytest.fixture(autouse=True)
async def clean(fleet: Fleet, provider: FakeProvider) -> AsyncIterator[None]:
    provider.reset()
    yield
    provider.reset()
    await fleet.end_all_sessions()


def _text(result: CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


def _ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, _text(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


def _step(
    tool: str, project: Path, number: int, total: int, *, more: bool, findings: str, **extra: Any
) -> dict[str, Any]:
    args: dict[str, Any] = {
        "step": f"{tool} step {number}: look at the answer function (REQUEST-{tool})",
        "step_number": number,
        "total_steps": total,
        "next_step_required": more,
        "findings": findings,
    }
    if number == 1:
        args["relevant_files"] = [str(project / "app.py")]
        args["files_checked"] = [str(project / "app.py")]
        if tool in GIT_TOOLS:
            args["path"] = str(project)
        if tool == "consensus":
            args["models"] = [
                {"model": "glm-4.6", "stance": "for"},
                {"model": "kimi-k2-0905-preview", "stance": "against"},
            ]
    if tool == "docgen":
        args.update(num_files_documented=1, total_files_to_document=1)
    if not more:
        args["use_assistant_model"] = True
        args["confidence"] = "high"
    args.update(extra)
    return args


def _last_call(tool: str, project: Path) -> dict[str, Any]:
    """A one-step run whose only step is the last one: the expert model is called at once."""
    if tool == "challenge":
        return {"prompt": "Polling is always faster than events.", "use_assistant_model": True}
    return _step(tool, project, 1, 1, more=False, findings="one step only")


async def _until(pred: Callable[[], bool], timeout: float = 15.0, what: Any = None) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, f"condition not reached: {what() if callable(what) else what}"
        await asyncio.sleep(0.05)


def _user_text(hit: Hit) -> str:
    return str(hit.messages[-1]["content"])


@pytest.mark.parametrize("tool", STEP_TOOLS)
async def test_steps_backtrack_failover_expert_once_and_chat_continues(
    fleet: Fleet, provider: FakeProvider, project: Path, tool: str
) -> None:
    spec = SPEC[tool]
    async with (
        mcp_client(fleet.mcp_url, "legacy", name=f"{tool}-a") as first,
        mcp_client(fleet.mcp_url, "2026-07-28", name=f"{tool}-b") as second,
    ):
        one = _ok(
            await first.call_tool(tool, _step(tool, project, 1, 4, more=True, findings=f"START-{tool}"))
        )
        assert one["status"] == f"pause_for_{tool}"
        assert one["required_actions"] and one[f"{tool}_required"] is True
        assert one["next_call"]["arguments"]["step_number"] == 2
        assert one[f"{tool}_status"]["relevant_files"] == 1
        cid = one["continuation_id"]
        if tool in GIT_TOOLS:
            assert any("app.py" in line for line in one["git_changes"]["changed_files"])

        two = _ok(
            await first.call_tool(
                tool, _step(tool, project, 2, 4, more=True, findings=f"DEAD-END-{tool}", continuation_id=cid)
            )
        )
        assert two["metadata"]["steps_recorded"] == [1, 2]

        # The next steps come from another session, hence another instance: the work so far
        # is read from storage, not from the first instance's memory.
        three = _ok(
            await second.call_tool(
                tool,
                _step(
                    tool,
                    project,
                    3,
                    4,
                    more=True,
                    findings=f"KEPT-{tool}",
                    hypothesis=f"HYPOTHESIS-{tool}",
                    backtrack_from_step=2,
                    continuation_id=cid,
                ),
            )
        )
        assert three["metadata"]["instance_id"] != one["metadata"]["instance_id"]
        assert three["metadata"]["steps_recorded"] == [1, 3]
        assert three["metadata"]["backtracked_steps"] == [2]
        assert not provider.snapshot(), "intermediate steps must not call a model"

        final = _ok(
            await second.call_tool(
                tool, _step(tool, project, 4, 4, more=False, findings=f"LAST-{tool}", continuation_id=cid)
            )
        )

    hits = provider.snapshot()
    assert final[f"complete_{tool}" if tool != "consensus" else "complete_consensus"]
    if tool == "consensus":
        assert final["status"] == "consensus_workflow_complete"
        assert sorted(h.provider for h in hits) == ["glm", "kimi"]  # each model exactly once
        assert [v["status"] for v in final["accumulated_responses"]] == ["success", "success"]
        stances = {h.provider: str(h.messages[0]["content"]) for h in hits}
        assert "FOR the proposal" in stances["glm"] and "AGAINST the proposal" in stances["kimi"]
        for hit in hits:
            assert "REQUEST-consensus" in _user_text(hit) and "FILE-MARKER" in _user_text(hit)
        expert_answer = final["complete_consensus"]["synthesis"]
    else:
        assert final["status"] == "calling_expert_analysis"
        assert len(hits) == 1, "the expert model is called exactly once"
        messages = hits[0].messages
        assert [m["role"] for m in messages] == ["system", "user"]
        assert messages[0]["content"] == spec.system_prompt
        prompt = _user_text(hits[0])
        for expected in (f"REQUEST-{tool}", f"START-{tool}", f"KEPT-{tool}", f"LAST-{tool}", "FILE-MARKER"):
            assert expected in prompt, expected
        assert f"DEAD-END-{tool}" not in prompt, "a backtracked step must not reach the expert"
        assert spec.expert_task in prompt
        if tool in GIT_TOOLS:
            assert "+    return 42  # DIFF-MARKER" in prompt
        assert f"HYPOTHESIS-{tool}" in prompt
        expert_answer = final["expert_analysis"]["raw_analysis"]
        assert expert_answer.startswith("fake ")
        assert final[f"complete_{tool}"]["steps_taken"] == 3

    # A third session continues the same thread with chat: it sees the steps and the answer.
    provider.reset()
    async with mcp_client(fleet.mcp_url, "legacy", name=f"{tool}-c") as third:
        answer = _ok(
            await third.call_tool("chat", {"prompt": "What should I do first?", "continuation_id": cid})
        )
    assert answer["continuation_id"] == cid
    (hit,) = provider.snapshot()
    history = hit.messages[1:-1]
    assert any(m["role"] == "user" and f"KEPT-{tool}" in m["content"] for m in history)
    assert any(m["role"] == "assistant" and m["content"] == expert_answer for m in history)


@pytest.mark.parametrize("tool", ALL_TOOLS)
async def test_progress_while_slow_and_cancel_stops_the_provider(
    fleet: Fleet, provider: FakeProvider, project: Path, tool: str
) -> None:
    seen: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")

    async with mcp_client(fleet.mcp_url, "legacy", name=f"{tool}-slow") as client:
        provider.reset(Behaviour(delay=2.5))
        result = _ok(await client.call_tool(tool, _last_call(tool, project), progress_callback=on_progress))
        assert result["continuation_id"]
        assert seen and all(f"{tool}: waiting for" in m for m in seen), seen

        provider.reset(Behaviour(hang=True))
        call = asyncio.create_task(client.call_tool(tool, _last_call(tool, project)))
        expected = 2 if tool == "consensus" else 1
        hits = lambda: [(h.provider, h.status) for h in provider.snapshot()]  # noqa: E731
        await _until(lambda: len(provider.snapshot()) == expected, what=hits)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        # The provider sees its request(s) abandoned: the instance stopped waiting for them.
        await _until(lambda: all(h.status == 499 for h in provider.snapshot()), what=hits)


async def test_a_workflow_survives_the_death_of_its_instance(
    fleet: Fleet, provider: FakeProvider, project: Path
) -> None:
    async with mcp_client(fleet.mcp_url, "legacy", name="failover") as client:
        one = _ok(await client.call_tool("debug", _step("debug", project, 1, 3, more=True, findings="F-ONE")))
        cid = one["continuation_id"]
        two = _ok(
            await client.call_tool(
                "debug", _step("debug", project, 2, 3, more=True, findings="F-TWO", continuation_id=cid)
            )
        )
        dead = two["metadata"]["instance_id"]
        # kill -9: nothing is flushed or deregistered; supervisord does not bring it back.
        await asyncio.to_thread(fleet.kill_instance, instance_num(dead), restart=False)
        final = _ok(
            await client.call_tool(
                "debug", _step("debug", project, 3, 3, more=False, findings="F-THREE", continuation_id=cid)
            )
        )
    assert final["metadata"]["instance_id"] != dead
    assert final["metadata"]["steps_recorded"] == [1, 2, 3]
    (hit,) = provider.snapshot()
    assert all(f in _user_text(hit) for f in ("F-ONE", "F-TWO", "F-THREE"))
    await asyncio.to_thread(fleet.start_instance, instance_num(dead))
    await fleet.wait_instances(3)


async def test_consensus_reports_a_failing_provider_and_keeps_the_other_answer(
    fleet: Fleet, provider: FakeProvider, project: Path
) -> None:
    provider.script_for("kimi", Behaviour(status=429), Behaviour(status=500))
    async with mcp_client(fleet.mcp_url, "2026-07-28", name="consensus-half") as client:
        args = _step("consensus", project, 1, 1, more=False, findings="worth doing?")
        del args["models"]  # the default: one GLM and one Kimi model, neutral
        result = _ok(await client.call_tool("consensus", args))
    voices = {v["model"]: v for v in result["accumulated_responses"]}
    assert voices["glm-4.6"]["status"] == "success" and voices["glm-4.6"]["verdict"].startswith("fake ")
    kimi = voices["kimi-k2-0905-preview"]
    assert kimi["status"] == "error" and kimi["error"].startswith("[provider_unavailable]")
    assert "500" in kimi["error"]
    assert result["complete_consensus"]["failed_models"] == ["kimi-k2-0905-preview:neutral"]
    assert [h.status for h in provider.snapshot() if h.provider == "kimi"] == [429, 500]

    provider.reset()
    async with mcp_client(fleet.mcp_url, "legacy", name="consensus-reader") as client:
        _ok(
            await client.call_tool(
                "chat", {"prompt": "summarise", "continuation_id": result["continuation_id"]}
            )
        )
    (hit,) = provider.snapshot()
    synthesis = next(m["content"] for m in hit.messages if m["role"] == "assistant")
    assert "FAILED: [provider_unavailable]" in synthesis and voices["glm-4.6"]["verdict"] in synthesis


async def test_last_step_without_the_expert(fleet: Fleet, provider: FakeProvider, project: Path) -> None:
    async with mcp_client(fleet.mcp_url, "legacy", name="local") as client:
        certain = _ok(
            await client.call_tool(
                "debug", _step("debug", project, 1, 1, more=False, findings="found it", confidence="certain")
            )
        )
        planned = _ok(
            await client.call_tool(
                "planner",
                {"step": "plan the move", "step_number": 1, "total_steps": 1, "next_step_required": False},
            )
        )
        declined = _ok(
            await client.call_tool(
                "codereview",
                _step("codereview", project, 1, 1, more=False, findings="ok", use_assistant_model=False),
            )
        )
        challenged = _ok(await client.call_tool("challenge", {"prompt": "Tabs beat spaces."}))
    assert certain["status"] == "certain_confidence_proceed_with_fix"
    assert certain["expert_analysis"]["status"] == "skipped_due_to_certain_confidence"
    assert planned["status"] == "planning_complete"
    assert declined["status"] == "local_work_complete"
    assert "Tabs beat spaces." in challenged["content"] and "expert_analysis" not in challenged
    assert not provider.snapshot()


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("thinkdep", {"step": "x"}, "[unknown_tool]"),
    ("debug", {"step": "x", "step_number": "one"}, "step_number"),
    ("debug", {"confidence": "sure"}, "confidence"),
    ("analyze", {"analysis_type": "everything"}, "analysis_type"),
    ("debug", {"continuation": "abc"}, "[invalid_argument] unknown argument(s) continuation"),
    ("debug", {"step_number": 2, "backtrack_from_step": 2}, "backtrack_from_step (2) must be lower"),
    ("precommit", {"path": None}, "[invalid_argument] step 1 of precommit needs path"),
    ("precommit", {"path": "/etc"}, "outside the allowed roots"),
    ("docgen", {"num_files_documented": 0, "total_files_to_document": 2}, "only 0 of 2 files"),
    ("testgen", {"relevant_files": ["/etc/hostname"]}, "outside the allowed roots"),
    ("consensus", {"models": [{"model": "glm"}, {"model": "GLM"}]}, "appears twice"),
    ("chat", {"prompt": "x", "temperature": 7}, "temperature"),
]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_bad_calls_are_clear_errors(
    fleet: Fleet, provider: FakeProvider, project: Path, mode: str
) -> None:
    async with mcp_client(fleet.mcp_url, mode, name=f"bad-{mode}") as client:
        for tool, changes, expected in BAD_CALLS:
            if tool in SPEC:
                args = _step(tool, project, 1, 1, more=False, findings="f")
                args.update(changes)
                args = {k: v for k, v in args.items() if v is not None}
            else:
                args = changes
            result = await client.call_tool(tool, args)
            text = _text(result)
            assert result.is_error, (tool, changes)
            assert expected in text, (tool, text)
            assert text.split("] ", 1)[0].rsplit("[", 1)[-1] in {"invalid_argument", "unknown_tool"}, text
            assert "Traceback" not in text
    assert not provider.snapshot(), "a refused call must not reach the provider"


async def test_tools_list_from_the_instances_caches_is_the_same_in_both_eras(fleet: Fleet) -> None:
    """An instance builds its `tools/list` answer once per protocol version and answers repeats
    from it (instance/tools/listing.py): every listing a session gets is the same, through the
    router, for real SDK clients of either era, and both eras list the same tools."""
    listed: dict[str, list[Any]] = {}
    for mode in ("legacy", "2026-07-28"):
        async with mcp_client(fleet.mcp_url, mode, name=f"lister-{mode}") as client:
            st = await status_of(client)
            before = await _listing_counters(fleet, st["instance_id"])
            # "refresh": past the client's own listing cache, every listing asks the instance.
            first = await client.list_tools(cache_mode="refresh")
            for _ in range(3):
                assert await client.list_tools(cache_mode="refresh") == first
            listed[mode] = first.tools
            # A call between listings changes nothing of the next listing.
            assert not (await client.call_tool("version", {})).is_error
            assert await client.list_tools(cache_mode="refresh") == first
            after = await _listing_counters(fleet, st["instance_id"])
        reused = {k: after[k] - before[k] for k in after}
        # At most the first was built; the 2026-07-28 repeats left from kept bytes.
        assert reused["built"] <= 1, reused
        if mode == "legacy":
            assert reused["reused"] >= 4, reused
        else:
            assert reused["bytes_reused"] >= 4, reused
    legacy = {t.name: (t.description, t.input_schema, t.output_schema) for t in listed["legacy"]}
    modern = {t.name: (t.description, t.input_schema, t.output_schema) for t in listed["2026-07-28"]}
    assert legacy == modern
    assert {*ALL_TOOLS, "chat", "version"} <= set(legacy)


async def _listing_counters(fleet: Fleet, instance_id: str) -> dict[str, int]:
    """An instance's tools/list counters, from its /internal/metrics."""
    url = f"http://127.0.0.1:{fleet.instance_port(instance_num(instance_id))}/internal/metrics"
    headers = {"X-Exai-Internal-Token": fleet.internal_token}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as r:
        assert r.status == 200
        text = await r.text()
    prefix = "exai_instance_tools_list_"
    counters = dict(line.split(" ", 1) for line in text.splitlines() if line.startswith(prefix))
    return {key: int(counters[f"{prefix}{key}_total"]) for key in ("built", "reused", "bytes_reused")}


async def test_listmodels_and_tools_list_describe_every_tool(fleet: Fleet) -> None:
    async with mcp_client(fleet.mcp_url, "legacy", name="lister") as client:
        listed = _ok(await client.call_tool("listmodels", {}))
        tools = {t.name: t for t in (await client.list_tools()).tools}
    purposes = {t["name"]: t["purpose"] for t in listed["tools"]}
    for name in [*ALL_TOOLS, "chat"]:
        assert purposes.get(name), name
        assert tools[name].description
        properties = tools[name].input_schema["properties"]
        undocumented = [p for p, schema in properties.items() if not schema.get("description")]
        assert not undocumented, (name, undocumented)
    assert {"step", "step_number", "total_steps", "next_step_required", "findings", "confidence"} <= set(
        tools["debug"].input_schema["properties"]
    )
