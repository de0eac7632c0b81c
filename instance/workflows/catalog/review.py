"""Tools that review code: codereview, secaudit, precommit, refactor."""

from __future__ import annotations

from typing import Literal

from instance.workflows.spec import SEVERITY_FILTER, FieldSpec, Guidance, WorkflowSpec

_REPORT = (
    "Report each issue as: severity (critical/high/medium/low), location (file:line), what is wrong, "
    "why it matters, and the fix. Skip issues below the requested severity filter."
)

PATH_FIELD = FieldSpec(
    "path",
    str | None,
    "Absolute path of a git working tree (under the allowed roots); its status and diff are "
    "sent to the expert model on the last step.",
    None,
)

CODEREVIEW = WorkflowSpec(
    name="codereview",
    purpose="Step-by-step code review (quality, security, performance) with an expert second review.",
    description=(
        "Review code in steps: examine the files in relevant_files for correctness, security, "
        "performance and maintainability, recording issues_found with severities; the last step has "
        "GLM or Kimi review the same code (and the git changes under `path`, if given). "
        "Returns continuation_id."
    ),
    system_prompt=(
        "You are a meticulous senior code reviewer. You receive another engineer's review notes, the "
        "issues they found, and the source. Confirm or reject their issues and find the ones they missed."
    ),
    expert_task="Review the code. " + _REPORT,
    guidance=Guidance(
        first=(
            "Read the files under review and understand their purpose and context.",
            "Note the project's conventions you will review against (standards).",
        ),
        middle=(
            "Check correctness: edge cases, error handling, concurrency, resource cleanup.",
            "Check security (input validation, secrets, injection) and performance hot spots.",
            "Add every issue to issues_found with a severity.",
        ),
        closing=(
            "Re-check the high-severity issues; drop false positives.",
            "Make sure relevant_files holds all reviewed code.",
        ),
    ),
    extra_fields=(
        FieldSpec(
            "review_type",
            Literal["full", "security", "performance", "quick"],
            "Depth and focus of the review: full, security, performance, or quick.",
            "full",
        ),
        FieldSpec("focus_on", str | None, "Specific concerns to weigh most.", None),
        FieldSpec("standards", str | None, "Coding standards or conventions to review against.", None),
        SEVERITY_FILTER,
        PATH_FIELD,
    ),
    first_step_requires=("relevant_files",),
    reads_git=True,
)

SECAUDIT = WorkflowSpec(
    name="secaudit",
    purpose="Step-by-step security audit (OWASP, compliance, infrastructure, dependencies) with an expert.",
    description=(
        "Audit security in steps: map the attack surface, then examine authentication, input handling, "
        "secrets, dependencies and configuration, recording issues_found with severities; the last step "
        "has GLM or Kimi audit the same code. Returns continuation_id."
    ),
    system_prompt=(
        "You are an application security expert. You receive another engineer's security audit notes "
        "and the source. Validate their findings and look for vulnerabilities they missed, with "
        "realistic exploit scenarios."
    ),
    expert_task=(
        "Audit the code for vulnerabilities within the given scope and threat level. " + _REPORT + " "
        "Name the OWASP category or compliance requirement each issue touches."
    ),
    guidance=Guidance(
        first=(
            "Describe the system, its trust boundaries and its sensitive data (security_scope).",
            "List the entry points: endpoints, CLIs, message handlers, file inputs.",
        ),
        middle=(
            "Check authentication, authorisation and session handling.",
            "Check input validation, injection risks, secrets handling and cryptography.",
            "Check dependencies and configuration for known weaknesses.",
        ),
        closing=(
            "Rate each issue by exploitability and impact at the stated threat_level.",
            "Map issues to the compliance requirements that apply.",
        ),
    ),
    extra_fields=(
        FieldSpec("security_scope", str | None, "What the audit covers: components, data, deployment.", None),
        FieldSpec(
            "threat_level",
            Literal["low", "medium", "high", "critical"],
            "How hostile the environment is assumed to be: low, medium, high, critical.",
            "medium",
        ),
        FieldSpec(
            "compliance_requirements",
            list[str],
            "Standards to check against, e.g. SOC2, PCI DSS, HIPAA, GDPR.",
            [],
        ),
        FieldSpec(
            "audit_focus",
            Literal["owasp", "compliance", "infrastructure", "dependencies", "comprehensive"],
            "Emphasis: owasp, compliance, infrastructure, dependencies, or comprehensive.",
            "comprehensive",
        ),
        SEVERITY_FILTER,
    ),
)

PRECOMMIT = WorkflowSpec(
    name="precommit",
    purpose="Validate pending git changes before committing, with an expert review of the diff.",
    description=(
        "Check pending changes in steps: step 1 names the repository (`path`, under the allowed roots); "
        "the server reads its git status and diff (staged, unstaged, or against compare_to) without "
        "blocking. Investigate the changes step by step; the last step has GLM or Kimi review the diff. "
        "Returns continuation_id."
    ),
    system_prompt=(
        "You are a senior engineer doing the last review before a commit. You receive the git diff, "
        "another engineer's notes, and relevant files. Find bugs, regressions, incomplete changes and "
        "anything that should not be committed (secrets, debug code)."
    ),
    expert_task=(
        "Review the pending changes. " + _REPORT + " End with a verdict: ready to commit, or what must "
        "change first."
    ),
    guidance=Guidance(
        first=(
            "Look at the changed files listed in the git summary of this answer.",
            "Say what the change is meant to do, so it can be checked against that intent.",
        ),
        middle=(
            "Read each changed hunk in context; check callers of changed functions.",
            "Look for missing tests, leftover debug code and secrets.",
        ),
        closing=("Decide whether the change is complete and safe to commit.",),
    ),
    extra_fields=(
        FieldSpec(
            "path",
            str | None,
            "Absolute path of the git working tree to check (under the allowed roots). Required in step 1.",
            None,
        ),
        FieldSpec(
            "compare_to",
            str | None,
            "A git ref (branch, tag, commit) to diff against instead of staged/unstaged changes.",
            None,
        ),
        FieldSpec("include_staged", bool, "Include staged changes (git diff --cached).", True),
        FieldSpec("include_unstaged", bool, "Include unstaged changes (git diff).", True),
        FieldSpec("focus_on", str | None, "Specific concerns to weigh most.", None),
        SEVERITY_FILTER,
    ),
    first_step_requires=("path",),
    reads_git=True,
)

REFACTOR = WorkflowSpec(
    name="refactor",
    purpose="Find refactoring opportunities (code smells, decomposition, modernisation, organisation).",
    description=(
        "Look for refactorings in steps: examine the files in relevant_files for the refactor_type asked "
        "for, recording opportunities in issues_found; the last step has GLM or Kimi propose a "
        "prioritised refactoring plan. Returns continuation_id."
    ),
    system_prompt=(
        "You are an expert in refactoring and software design. You receive another engineer's notes on "
        "a codebase and the source. Propose refactorings that pay for themselves, preserving behaviour."
    ),
    expert_task=(
        "Propose refactorings in priority order. For each: the location, the smell or problem, the "
        "concrete change (with a short code sketch), the risk, and how to keep behaviour unchanged."
    ),
    guidance=Guidance(
        first=(
            "Read the files and note their size, responsibilities and dependencies.",
            "Pick the refactor_type that fits: codesmells, decompose, modernize, organization.",
        ),
        middle=(
            "Find long functions, duplicated code, god classes and tangled dependencies.",
            "Record each opportunity in issues_found with a severity reflecting its payoff.",
        ),
        closing=("Order the opportunities by payoff and risk.",),
    ),
    extra_fields=(
        FieldSpec(
            "refactor_type",
            Literal["codesmells", "decompose", "modernize", "organization"],
            "Kind of refactoring to look for: codesmells, decompose, modernize, organization.",
            "codesmells",
        ),
        FieldSpec(
            "focus_areas", list[str] | None, "Aspects to weigh most, e.g. readability, performance.", None
        ),
        FieldSpec(
            "style_guide_examples",
            list[str] | None,
            "Absolute paths of files whose style the refactoring should follow.",
            None,
        ),
    ),
)

SPECS = (CODEREVIEW, SECAUDIT, PRECOMMIT, REFACTOR)
