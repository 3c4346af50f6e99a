"""Error answers: an HTTP status with a FHIR OperationOutcome body that says what is wrong.

CDS Hooks 2.0 allows 4xx/5xx; CRD asks for an OperationOutcome. Messages describe the request's
*shape* (which field, which rule) and never echo patient data or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

CRD_RULE = "crd"  # Issue.rule of a request that is valid CDS Hooks and FHIR but breaks a CRD constraint


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue. `code` is from http://hl7.org/fhir/issue-type."""

    diagnostics: str
    code: str = "invalid"
    severity: str = "error"
    expression: str | None = None  # FHIRPath-ish location in the request, e.g. "context.draftOrders.entry[0]"
    rule: str | None = None  # CRD_RULE: breaks a CRD-only constraint (CRD 2.2 answers 422; anything else 400)

    def to_json(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_json() for i in issues]}


class ServiceError(Exception):
    """Raised anywhere on the request path; the app turns it into `status` + OperationOutcome."""

    def __init__(self, status: int, issues: list[Issue] | str, code: str = "invalid") -> None:
        if isinstance(issues, str):
            issues = [Issue(diagnostics=issues, code=code)]
        super().__init__(issues[0].diagnostics if issues else str(status))
        self.status = status
        self.issues = issues

    def body(self) -> dict[str, Any]:
        return operation_outcome(self.issues)
