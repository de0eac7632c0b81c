"""The work so far, rebuilt from the steps recorded in the thread.

Every step is a thread message whose metadata holds the step as sent. Nothing about a workflow
lives in process memory, so the next step may arrive on any instance (after a failover, or from
another session) and sees the same work. Folding rules, in message order:
- a step whose number was recorded before replaces that step and drops the ones after it;
- `backtrack_from_step=k` drops the recorded steps numbered k and above before adding itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import InvalidArgument
from instance.storage.models import Message
from instance.storage.validation import METADATA_MAX_BYTES

STEP_KEY = "workflow_step"
EXPERT_KEY = "workflow_expert"

STEP_FIELDS = (
    "step",
    "step_number",
    "total_steps",
    "next_step_required",
    "findings",
    "files_checked",
    "relevant_files",
    "relevant_context",
    "issues_found",
    "confidence",
    "hypothesis",
    "backtrack_from_step",
)


@dataclass
class Work:
    """The consolidated findings of one tool's run in a thread (EXAI's ConsolidatedFindings)."""

    tool: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    backtracked: list[int] = field(default_factory=list)

    def add(self, step: dict[str, Any]) -> None:
        number = int(step["step_number"])
        cut = number
        back = step.get("backtrack_from_step")
        if isinstance(back, int):
            cut = min(cut, back)
        if isinstance(back, int):
            self.backtracked.extend(s["step_number"] for s in self.steps if s["step_number"] >= back)
        self.steps = [s for s in self.steps if s["step_number"] < cut]
        self.steps.append(step)

    @property
    def initial_request(self) -> str:
        return str(self.steps[0]["step"]) if self.steps else ""

    def _union(self, key: str) -> list[str]:
        seen: dict[str, None] = {}
        for s in self.steps:
            for item in s.get(key) or []:
                seen.setdefault(str(item), None)
        return list(seen)

    @property
    def files_checked(self) -> list[str]:
        return self._union("files_checked")

    @property
    def relevant_files(self) -> list[str]:
        return self._union("relevant_files")

    @property
    def relevant_context(self) -> list[str]:
        return self._union("relevant_context")

    @property
    def issues_found(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for s in self.steps:
            for issue in s.get("issues_found") or []:
                if issue not in out:
                    out.append(issue)
        return out

    @property
    def hypotheses(self) -> list[tuple[int, str, str]]:
        return [
            (int(s["step_number"]), str(s.get("confidence") or ""), str(s["hypothesis"]))
            for s in self.steps
            if s.get("hypothesis")
        ]

    @property
    def confidence(self) -> str:
        return str(self.steps[-1].get("confidence") or "") if self.steps else ""

    def settings(self, defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The tool's own fields: for each, the latest value given that differs from its default.

        Clients usually send these in step 1 only; later steps then carry the defaults, which
        must not undo what step 1 asked for.
        """
        merged = dict(defaults)
        for s in self.steps:
            merged.update({k: v for k, v in (s.get("extras") or {}).items() if v != defaults.get(k)})
        return merged

    def status(self) -> dict[str, Any]:
        """EXAI's `<tool>_status` block: counts of what has been gathered."""
        return {
            "files_checked": len(self.files_checked),
            "relevant_files": len(self.relevant_files),
            "relevant_context": len(self.relevant_context),
            "issues_found": len(self.issues_found),
            "images_collected": 0,
            "current_confidence": self.confidence,
        }

    def summary(self) -> str:
        return "\n".join(f"Step {s['step_number']}: {s.get('findings') or s['step']}" for s in self.steps)


def fold(tool: str, messages: Iterable[Message]) -> Work:
    """The work of `tool` recorded in a thread's messages (other tools' steps are ignored)."""
    work = Work(tool)
    for message in messages:
        step = message.metadata.get(STEP_KEY)
        if isinstance(step, dict) and message.tool_name == tool:
            work.add(step)
    return work


def conversation(messages: Sequence[Message]) -> list[Message]:
    """The thread without workflow step records: what an expert call takes as history."""
    return [m for m in messages if STEP_KEY not in m.metadata]


def step_record(arguments: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
    """The step as stored in the thread; refused if it would not fit a message's metadata."""
    record = {name: arguments.get(name) for name in STEP_FIELDS}
    record["extras"] = extras
    size = len(json.dumps({STEP_KEY: record}, ensure_ascii=False).encode())
    if size > METADATA_MAX_BYTES - 1024:
        raise InvalidArgument(
            f"this step is {size // 1024} KB, more than a step may hold "
            f"({METADATA_MAX_BYTES // 1024 - 1} KB)",
            hint="Shorten step and findings; put long material in files and list them in relevant_files.",
        )
    return record


def step_text(tool: str, record: dict[str, Any]) -> str:
    """How a step reads in the thread (what chat shows the model when it continues the thread)."""
    lines = [f"[{tool} step {record['step_number']}/{record['total_steps']}] {record['step']}"]
    if record.get("findings"):
        lines.append(f"Findings: {record['findings']}")
    if record.get("hypothesis"):
        lines.append(f"Hypothesis: {record['hypothesis']}")
    if record.get("backtrack_from_step"):
        lines.append(f"(Backtracked: steps from {record['backtrack_from_step']} on were discarded.)")
    return "\n".join(lines)
