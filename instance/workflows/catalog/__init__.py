"""Every workflow tool's description, by family; `SPECS` is what gets registered."""

from __future__ import annotations

from instance.workflows.catalog import authoring, deliberation, investigation, review
from instance.workflows.spec import WorkflowSpec

SPECS: tuple[WorkflowSpec, ...] = (
    *investigation.SPECS,
    *review.SPECS,
    *authoring.SPECS,
    deliberation.CONSENSUS,
)

PURPOSES: dict[str, str] = {
    **{spec.name: spec.purpose for spec in SPECS},
    "challenge": deliberation.CHALLENGE_PURPOSE,
}
