"""Tools that weigh opinions: consensus (several models at once) and challenge."""

from __future__ import annotations

from typing import Any

from instance.workflows.spec import ConsensusModel, FieldSpec, Guidance, WorkflowSpec

STANCES: dict[str, str] = {
    "for": (
        "You argue FOR the proposal: bring out its strengths and how to make it work. Do not invent "
        "merits; if it is fundamentally unsound, say so despite your stance."
    ),
    "against": (
        "You argue AGAINST the proposal: bring out its risks, costs and weaker assumptions. Do not invent "
        "problems; if it is clearly sound, say so despite your stance."
    ),
    "neutral": ("You weigh the proposal evenly: give the real balance of evidence, which need not be 50/50."),
}

CONSENSUS_SYSTEM = (
    "You are one of several expert models asked for an independent verdict on a proposal. {stance} "
    "Structure your answer as: verdict in one sentence; analysis (technical feasibility, value, risks, "
    "alternatives); confidence (low/medium/high) and why."
)

CONSENSUS = WorkflowSpec(
    name="consensus",
    purpose="Ask several models (GLM and Kimi, each with a stance) at once and gather their verdicts.",
    description=(
        "Gather a multi-model consensus: record your own analysis of the proposal in steps; on the last "
        "step (next_step_required=false) every entry of `models` (default: one GLM and one Kimi model, "
        "neutral) is consulted concurrently, each with its stance (for/against/neutral). One model "
        "failing does not fail the call: its error is reported next to the others' verdicts. "
        "Returns continuation_id; the synthesis is stored in that thread."
    ),
    system_prompt=CONSENSUS_SYSTEM,
    expert_task="Give your verdict on the proposal above.",
    guidance=Guidance(
        first=(
            "Write your own neutral analysis of the proposal in findings.",
            "Choose the models and stances to consult in `models` (or keep the default).",
        ),
        middle=("Refine your analysis; the models are consulted on the last step.",),
        closing=("Set next_step_required=false to consult the models.",),
    ),
    extra_fields=(
        FieldSpec(
            "models",
            list[ConsensusModel] | None,
            "Models to consult, each {model, stance (for|against|neutral), stance_prompt}. "
            "Default: the flagship model of each configured provider (GLM and Kimi), neutral. "
            "Each model+stance pair may appear once.",
            None,
        ),
        FieldSpec(
            "current_model_index",
            int | None,
            "Accepted for EXAI compatibility; all models are consulted together on the last step.",
            0,
            {"ge": 0},
        ),
        FieldSpec(
            "model_responses",
            list[dict[str, Any]] | None,
            "Accepted for EXAI compatibility; the verdicts are kept in the thread instead.",
            None,
        ),
    ),
    confidence_default="exploring",
    final="consensus",
)

CHALLENGE_PURPOSE = "Re-examine a statement critically instead of agreeing by reflex."
CHALLENGE_DESCRIPTION = (
    "Use when the user questions or disagrees with something you said: wraps their statement in "
    "instructions to reassess it critically (agree only with reasons, disagree with reasons). No model "
    "call by default; use_assistant_model=true also asks GLM or Kimi for a critical assessment. "
    "Recorded in a thread (continuation_id) that chat and other tools can continue."
)
CHALLENGE_SYSTEM = (
    "You are a rigorous reviewer. Assess the statement you are given critically: is it accurate, "
    "complete and well reasoned? Say where it is wrong or incomplete and why, or why it holds."
)


def challenge_prompt(statement: str) -> str:
    return (
        "Reassess the following critically before you answer; do not agree by reflex.\n\n"
        f'"{statement}"\n\n'
        "Is it accurate, complete and well reasoned? Check the facts if you need to. Where it is "
        "wrong or misleading, say so and why; where it holds, explain why it holds. Keep to the point."
    )
