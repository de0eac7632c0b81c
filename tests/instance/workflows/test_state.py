"""Folding recorded steps into the work so far: replacement, backtracking, tool settings."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from common.errors import InvalidArgument
from instance.storage.models import Message
from instance.workflows import state


def _step(number: int, findings: str, **extra: Any) -> dict[str, Any]:
    args = {
        "step": f"step {number}",
        "step_number": number,
        "total_steps": 5,
        "next_step_required": True,
        "findings": findings,
        "relevant_files": [f"/p/{findings}.py"],
        **extra,
    }
    return state.step_record(args, extra.pop("extras", {}))


def _message(tool: str, record: dict[str, Any], seq: int) -> Message:
    return Message(
        id=f"m{seq}",
        continuation_id="c",
        seq=seq,
        role="user",
        content=state.step_text(tool, record),
        created_at=datetime.now(UTC),
        tool_name=tool,
        metadata={state.STEP_KEY: record},
    )


def test_backtrack_drops_the_dead_end_and_resending_replaces_a_step() -> None:
    records = [
        _step(1, "a"),
        _step(2, "dead"),
        _step(3, "b", backtrack_from_step=2),
        _step(4, "c"),
        _step(4, "c2"),  # re-sent: replaces step 4
    ]
    other_tool = _message("debug", _step(2, "other"), 99)
    work = state.fold("analyze", [_message("analyze", r, i) for i, r in enumerate(records)] + [other_tool])
    assert [s["step_number"] for s in work.steps] == [1, 3, 4]
    assert work.backtracked == [2]
    assert work.relevant_files == ["/p/a.py", "/p/b.py", "/p/c2.py"]
    assert "dead" not in work.summary() and "c2" in work.summary()


def test_settings_keep_step_one_values_unless_changed() -> None:
    defaults = {"review_type": "full", "path": None}
    work = state.Work("codereview")
    work.add(_step(1, "a", extras={"review_type": "security", "path": "/repo"}))
    work.add(_step(2, "b", extras={"review_type": "full", "path": None}))  # defaults re-sent
    assert work.settings(defaults) == {"review_type": "security", "path": "/repo"}
    work.add(_step(3, "c", extras={"review_type": "quick", "path": None}))
    assert work.settings(defaults)["review_type"] == "quick"


def test_a_step_too_large_for_storage_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="more than a step may hold"):
        _step(1, "x" * 70_000)
