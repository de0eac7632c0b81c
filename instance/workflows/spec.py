"""A workflow tool described as data: its fields, its prompts and its step guidance.

The engine (instance.workflows.engine) runs every description the same way; a description
only says what differs: which fields the tool adds or leaves out, what the expert model is
asked, and what the agent should do between steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

Confidence = Literal["exploring", "low", "medium", "high", "very_high", "almost_certain", "certain"]
ThinkingMode = Literal["minimal", "low", "medium", "high", "max"]
Severity = Literal["critical", "high", "medium", "low", "all"]

CLOSING_CONFIDENCE = frozenset({"high", "very_high", "almost_certain"})

STEP_TEXT_MAX = 20_000
FINDINGS_MAX = 30_000
HYPOTHESIS_MAX = 10_000


@dataclass(frozen=True)
class FieldSpec:
    """One argument of a tool: its type, its default (`REQUIRED` if none) and what it means."""

    name: str
    annotation: Any
    description: str
    default: Any = None
    constraints: Mapping[str, Any] = field(default_factory=dict)

    def field(self) -> Any:
        return Field(description=self.description, **dict(self.constraints))


REQUIRED: Any = ...


class ConsensusModel(BaseModel):
    """One voice in a consensus call: which model, and which side it argues."""

    model: str = Field(description="Model name (see listmodels) or a provider alias such as 'glm' or 'kimi'.")
    stance: Literal["for", "against", "neutral"] = Field(
        "neutral", description="Side this model argues: for, against, or neutral (weighs both)."
    )
    stance_prompt: str | None = Field(
        None, description="Your own instructions for this stance, replacing the built-in ones."
    )


# --- the fields every step tool shares (EXAI's WorkflowRequest, plus model options) ----------
def common_fields(
    *, confidence_default: str = "low", assistant_default: bool = True, findings_required: bool = True
) -> tuple[FieldSpec, ...]:
    return (
        FieldSpec(
            "step",
            str,
            "What you are doing in this step: for step 1 the task or question and your plan, later "
            "the part of the work this step covers.",
            REQUIRED,
            {"min_length": 1, "max_length": STEP_TEXT_MAX},
        ),
        FieldSpec(
            "step_number",
            int,
            "Number of this step, starting at 1. Re-sending a number replaces that step.",
            REQUIRED,
            {"ge": 1},
        ),
        FieldSpec(
            "total_steps",
            int,
            "Your current estimate of how many steps the work needs; raise or lower it as you go.",
            REQUIRED,
            {"ge": 1},
        ),
        FieldSpec(
            "next_step_required",
            bool,
            "true if another step follows; false on the last step, which brings in the expert model "
            "(unless confidence is 'certain' or use_assistant_model is false).",
            REQUIRED,
        ),
        FieldSpec(
            "findings",
            str,
            "What this step established: evidence, insights, ruled-out ideas. Later steps may confirm "
            "or correct earlier findings.",
            REQUIRED if findings_required else "",
            {"max_length": FINDINGS_MAX},
        ),
        FieldSpec(
            "files_checked",
            list[str],
            "Absolute paths of every file you examined so far, including ones that turned out unrelated.",
            [],
        ),
        FieldSpec(
            "relevant_files",
            list[str],
            "Absolute paths (under the server's allowed roots) of the files that matter; their "
            "contents are sent to the expert model on the last step.",
            [],
        ),
        FieldSpec(
            "relevant_context",
            list[str],
            "Functions, methods, classes or concepts central to the work, e.g. 'Parser.parse'.",
            [],
        ),
        FieldSpec(
            "issues_found",
            list[dict[str, Any]],
            "Issues found so far, each an object with 'severity' (critical, high, medium, low) and "
            "'description' (and optionally 'location').",
            [],
        ),
        FieldSpec(
            "confidence",
            Confidence,
            "How sure you are of the findings: exploring, low, medium, high, very_high, almost_certain, "
            "or certain. 'certain' on the last step finishes without the expert model.",
            confidence_default,
        ),
        FieldSpec(
            "hypothesis",
            str | None,
            "Your current theory, to be confirmed or revised by later steps.",
            None,
            {"max_length": HYPOTHESIS_MAX},
        ),
        FieldSpec(
            "backtrack_from_step",
            int | None,
            "Discard the recorded steps from this number on (a dead end) and continue from here.",
            None,
            {"ge": 1},
        ),
        FieldSpec(
            "continuation_id",
            str | None,
            "Thread id from an earlier answer of any tool (chat included); steps are recorded in it, "
            "so any session or instance can continue the work.",
            None,
        ),
        FieldSpec("model", str, "Expert model name (see listmodels) or 'auto'.", "auto"),
        FieldSpec(
            "temperature",
            float | None,
            "Sampling temperature of the expert call (0 focused … 2 creative); the model's default if unset.",
            None,
            {"ge": 0.0, "le": 2.0},
        ),
        FieldSpec(
            "thinking_mode",
            ThinkingMode | None,
            "Reasoning depth of the expert call: minimal (thinking off), low, medium, high, max.",
            None,
        ),
        FieldSpec(
            "use_websearch",
            bool,
            "Let the expert model search the web (GLM models) for documentation and current practice.",
            False,
        ),
        FieldSpec(
            "use_assistant_model",
            bool,
            "Call the expert model on the last step. false finishes with your own findings only.",
            assistant_default,
        ),
        FieldSpec(
            "images",
            list[str] | None,
            "Accepted for EXAI compatibility; the GLM and Kimi text models here do not receive images.",
            None,
        ),
    )


SEVERITY_FILTER = FieldSpec(
    "severity_filter",
    Severity,
    "Lowest severity worth reporting: critical, high, medium, low, or all.",
    "all",
)


@dataclass(frozen=True)
class Guidance:
    """What the agent is told to do before its next step, by phase of the work."""

    first: tuple[str, ...]
    middle: tuple[str, ...]
    closing: tuple[str, ...]

    def actions(self, step_number: int, confidence: str) -> list[str]:
        if step_number == 1:
            return list(self.first)
        if confidence in CLOSING_CONFIDENCE:
            return list(self.closing)
        return list(self.middle)


@dataclass(frozen=True)
class WorkflowSpec:
    """Everything that makes one step tool different from the others."""

    name: str
    purpose: str
    """One line for listmodels and the README."""
    description: str
    """What tools/list says about the tool."""
    system_prompt: str
    """The expert model's role."""
    expert_task: str
    """What the expert model is asked to deliver from the accumulated work."""
    guidance: Guidance
    extra_fields: tuple[FieldSpec, ...] = ()
    confidence_default: str = "low"
    assistant_default: bool = True
    findings_required: bool = True
    first_step_requires: tuple[str, ...] = ()
    """Fields step 1 must carry (non-empty)."""
    certain_status: str = "local_work_complete"
    """Status of a last step finished without the expert model."""
    reads_git: bool = False
    """`path` names a git working tree whose changes the expert model sees."""
    final: Literal["expert", "consensus"] = "expert"
    """How the last step is answered: one expert call, or every model of `models` at once."""

    def fields(self) -> tuple[FieldSpec, ...]:
        base = common_fields(
            confidence_default=self.confidence_default,
            assistant_default=self.assistant_default,
            findings_required=self.findings_required,
        )
        extra = {f.name: f for f in self.extra_fields}
        merged = [extra.pop(f.name, f) for f in base]
        return (*merged, *extra.values())
