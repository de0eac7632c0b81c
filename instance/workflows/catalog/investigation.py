"""Tools that investigate: thinkdeep, analyze, debug, tracer."""

from __future__ import annotations

from typing import Literal

from instance.workflows.spec import FieldSpec, Guidance, WorkflowSpec

_EVIDENCE = ("Cite files, functions and lines for every claim; say plainly where the evidence is thin.",)

THINKDEEP = WorkflowSpec(
    name="thinkdeep",
    purpose="Multi-step deep reasoning on a hard problem, validated by an expert model at the end.",
    description=(
        "Structured deep thinking in steps: you reason and gather evidence step by step "
        "(step_number 1..total_steps), each answer tells you what to examine next, and the last step "
        "(next_step_required=false) has GLM or Kimi challenge and extend your conclusions. "
        "Returns continuation_id; steps are stored in that thread."
    ),
    system_prompt=(
        "You are a senior engineer acting as a thinking partner. You receive another engineer's "
        "step-by-step reasoning about a problem. Test it: find gaps, hidden assumptions, risks and "
        "better alternatives, and extend it where it stops short."
    ),
    expert_task=(
        "Assess the reasoning above. Confirm what holds, correct what does not, add what is missing, "
        "and end with concrete recommendations ranked by impact. " + _EVIDENCE[0]
    ),
    guidance=Guidance(
        first=(
            "State the problem, its constraints and what a good answer must achieve.",
            "List the assumptions you are making and how you could test each.",
            "Explore at least two approaches before settling on one.",
        ),
        middle=(
            "Test your current hypothesis against the evidence; look for counter-examples.",
            "Examine the trade-offs (performance, complexity, risk) of the approaches still open.",
            "Record what changed in your understanding since the last step.",
        ),
        closing=(
            "Check the conclusion against every constraint from step 1.",
            "Note remaining uncertainties the expert review should focus on.",
        ),
    ),
    extra_fields=(
        FieldSpec(
            "problem_context",
            str | None,
            "More background on the problem or goal: what was tried, what must not change.",
            None,
        ),
        FieldSpec(
            "focus_areas",
            list[str] | None,
            "Aspects to weigh most, e.g. architecture, performance, security.",
            None,
        ),
    ),
)

ANALYZE = WorkflowSpec(
    name="analyze",
    purpose="Step-by-step code analysis (architecture, performance, security, quality), expert-reviewed.",
    description=(
        "Analyse code in steps: map the structure, then dig into the aspects named by analysis_type, "
        "recording findings and relevant files each step; the last step sends everything (file "
        "contents included) to GLM or Kimi for an expert assessment. Returns continuation_id."
    ),
    system_prompt=(
        "You are a principal engineer reviewing a codebase's design. You receive another engineer's "
        "analysis and the relevant source files. Judge architecture, scalability, maintainability and "
        "risks with reference to the actual code."
    ),
    expert_task=(
        "Give a strategic assessment: what is sound, what is fragile, where the real risks and costs "
        "are, and the few changes with the best return. " + _EVIDENCE[0]
    ),
    guidance=Guidance(
        first=(
            "Read the entry points and main modules; sketch how the parts depend on each other.",
            "List the files that matter in relevant_files (absolute paths).",
            "Note the patterns and conventions the code follows.",
        ),
        middle=(
            "Examine the aspect named by analysis_type in the files you listed.",
            "Look for duplicated logic, tight coupling, and hot paths.",
            "Record each concern with its location and an estimate of its impact.",
        ),
        closing=(
            "Prioritise your concerns by impact and effort.",
            "Make sure relevant_files holds everything the expert must read.",
        ),
    ),
    extra_fields=(
        FieldSpec(
            "analysis_type",
            Literal["architecture", "performance", "security", "quality", "general"],
            "Aspect to analyse: architecture, performance, security, quality, or general.",
            "general",
        ),
        FieldSpec(
            "output_format",
            Literal["summary", "detailed", "actionable"],
            "Shape of the expert's report: summary, detailed, or actionable (a list of changes).",
            "detailed",
        ),
    ),
)

DEBUG = WorkflowSpec(
    name="debug",
    purpose="Systematic root-cause investigation of a bug, with hypotheses checked by an expert model.",
    description=(
        "Debug in steps: describe the symptom, then investigate (reproduce, read code, narrow down) "
        "and report findings and your hypothesis each step; the last step has GLM or Kimi check the "
        "root cause and the fix. confidence='certain' on the last step skips the expert. "
        "Returns continuation_id."
    ),
    system_prompt=(
        "You are an expert debugger. You receive another engineer's investigation of a bug: "
        "symptoms, evidence, hypotheses and the relevant source. Find the root cause, not just the "
        "symptom, and propose the smallest correct fix."
    ),
    expert_task=(
        "Identify the most likely root cause (with the evidence for it), rank other plausible causes, "
        "and give a minimal fix plus a way to verify it. " + _EVIDENCE[0]
    ),
    guidance=Guidance(
        first=(
            "Reproduce the problem or collect its exact error output and conditions.",
            "Read the code on the failing path; list the files in relevant_files.",
            "Form a first hypothesis and note what would disprove it.",
        ),
        middle=(
            "Test the hypothesis: trace the data and control flow through the suspect code.",
            "Check recent changes, configuration and environment differences.",
            "Revise the hypothesis (or backtrack_from_step) when the evidence disagrees.",
        ),
        closing=(
            "Confirm the root cause explains every symptom.",
            "Work out the minimal fix and how to verify it.",
        ),
    ),
    certain_status="certain_confidence_proceed_with_fix",
)

TRACER = WorkflowSpec(
    name="tracer",
    purpose="Trace call flow (precision) or dependencies of a method or class, step by step.",
    description=(
        "Trace code in steps: follow the execution path of a function (trace_mode=precision) or the "
        "dependency web of a class or module (trace_mode=dependencies). Self-contained by default; "
        "set use_assistant_model=true to have GLM or Kimi review the trace on the last step. "
        "Returns continuation_id."
    ),
    system_prompt=(
        "You are an expert in reading large codebases. You receive another engineer's trace of a call "
        "flow or dependency graph together with the source. Check it for missing edges and mistakes."
    ),
    expert_task=(
        "Verify the trace: list missing or wrong calls and dependencies, explain the overall flow in "
        "order, and point out side effects and risky couplings. " + _EVIDENCE[0]
    ),
    guidance=Guidance(
        first=(
            "Say what you are tracing (target_description) and pick trace_mode: precision or dependencies.",
            "Find the definition of the target and list its file in relevant_files.",
        ),
        middle=(
            "Follow each call (precision) or each import and use (dependencies) one level further.",
            "Record conditional branches, async boundaries and side effects.",
        ),
        closing=("Summarise the full path or dependency graph in order.",),
    ),
    extra_fields=(
        FieldSpec(
            "trace_mode",
            Literal["precision", "dependencies", "ask"],
            "precision: execution flow of a function; dependencies: what a class or module uses and "
            "is used by; ask: decide in step 1.",
            "ask",
        ),
        FieldSpec(
            "target_description",
            str | None,
            "What to trace and why, e.g. 'how Router.handle reaches the instance'.",
            None,
        ),
    ),
    confidence_default="exploring",
    assistant_default=False,
    certain_status="tracer_complete",
)

SPECS = (THINKDEEP, ANALYZE, DEBUG, TRACER)
