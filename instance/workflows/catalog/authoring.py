"""Tools that produce something: testgen, docgen, planner."""

from __future__ import annotations

from instance.workflows.spec import FieldSpec, Guidance, WorkflowSpec

TESTGEN = WorkflowSpec(
    name="testgen",
    purpose="Plan and generate tests for code, covering edge cases, with an expert writing the suite.",
    description=(
        "Generate tests in steps: read the code in relevant_files, work out its behaviours, edge cases "
        "and failure modes step by step; the last step has GLM or Kimi write the tests following the "
        "project's existing test style. Returns continuation_id."
    ),
    system_prompt=(
        "You are an expert in software testing. You receive another engineer's analysis of the code to "
        "test and the source. Write tests that would catch real bugs, in the project's framework and style."
    ),
    expert_task=(
        "Write the tests: list the scenarios first (happy paths, edge cases, failure modes, concurrency "
        "where relevant), then the test code. Each test must be able to fail."
    ),
    guidance=Guidance(
        first=(
            "Read the code to test and its callers; list the files in relevant_files.",
            "Find the existing tests and the framework and style they use.",
        ),
        middle=(
            "List behaviours, boundary values and error paths of each function.",
            "Note what must be set up (fixtures, services) and what can stay real.",
        ),
        closing=("Check that every important behaviour has a scenario.",),
    ),
    first_step_requires=("relevant_files",),
)

DOCGEN = WorkflowSpec(
    name="docgen",
    purpose="Document code file by file (docstrings, complexity, call flow) without changing logic.",
    description=(
        "Generate documentation in steps: step 1 discovers the files to document "
        "(set total_files_to_document), each later step documents one file completely and raises "
        "num_files_documented; next_step_required=false is refused until both counters match. "
        "Self-contained by default; use_assistant_model=true has GLM or Kimi review the result. "
        "Returns continuation_id."
    ),
    system_prompt=(
        "You are a technical writer who reads code fluently. You receive another engineer's notes on "
        "the documentation they added and the source. Check it for accuracy and gaps."
    ),
    expert_task=(
        "Review the documentation work: point out missing or inaccurate docstrings, wrong complexity "
        "claims and unclear call-flow notes, file by file. Do not propose logic changes."
    ),
    guidance=Guidance(
        first=(
            "Discover every file that needs documentation and set total_files_to_document.",
            "Do not document anything yet; list the files.",
        ),
        middle=(
            "Document one file completely: every function and class, in the language's modern style.",
            "Note bugs you see instead of fixing them.",
            "Raise num_files_documented when the file is done.",
        ),
        closing=("Check that num_files_documented equals total_files_to_document.",),
    ),
    extra_fields=(
        FieldSpec(
            "num_files_documented",
            int,
            "Files completely documented so far (start at 0).",
            0,
            {"ge": 0},
        ),
        FieldSpec(
            "total_files_to_document",
            int,
            "Files found in step 1 that need documentation.",
            0,
            {"ge": 0},
        ),
        FieldSpec("document_complexity", bool, "Include Big-O complexity in function docs.", True),
        FieldSpec("document_flow", bool, "Include which functions call and are called by each one.", True),
        FieldSpec("update_existing", bool, "Fix existing documentation that is wrong or incomplete.", True),
        FieldSpec("comments_on_complex_logic", bool, "Add inline comments around non-obvious logic.", True),
    ),
    assistant_default=False,
    certain_status="docgen_complete",
)

PLANNER = WorkflowSpec(
    name="planner",
    purpose="Break a complex task into a plan step by step, with revisions and branches.",
    description=(
        "Plan in steps: step 1 describes the task, each later step adds to the plan; revise an earlier "
        "step (is_step_revision, revises_step_number) or explore an alternative (is_branch_point, "
        "branch_from_step, branch_id). Self-contained by default; use_assistant_model=true has GLM or "
        "Kimi critique the plan on the last step. Returns continuation_id."
    ),
    system_prompt=(
        "You are an experienced technical lead. You receive a plan built step by step by another "
        "engineer. Critique it: ordering, missing steps, risks, and simpler alternatives."
    ),
    expert_task=(
        "Critique the plan: what is missing, what is in the wrong order, what is risky, and what could "
        "be simpler. Finish with the improved plan as a numbered list."
    ),
    guidance=Guidance(
        first=(
            "Think about the whole scope: goals, constraints, stakeholders, success criteria.",
            "Consider more than one approach before committing to one.",
        ),
        middle=(
            "Break the next phase into concrete, checkable steps.",
            "Revise or branch when an earlier decision no longer holds.",
        ),
        closing=("Check that the plan covers every goal from step 1, in a workable order.",),
    ),
    extra_fields=(
        FieldSpec("is_step_revision", bool, "true if this step replaces an earlier one.", False),
        FieldSpec("revises_step_number", int | None, "The step this one revises.", None, {"ge": 1}),
        FieldSpec(
            "is_branch_point", bool, "true if this step branches off to explore an alternative.", False
        ),
        FieldSpec("branch_from_step", int | None, "The step the branch starts from.", None, {"ge": 1}),
        FieldSpec("branch_id", str | None, "Name of the branch, e.g. 'approach-b'.", None),
        FieldSpec("more_steps_needed", bool, "true if the plan needs more steps than total_steps.", False),
    ),
    findings_required=False,
    assistant_default=False,
    certain_status="planning_complete",
)

SPECS = (TESTGEN, DOCGEN, PLANNER)
