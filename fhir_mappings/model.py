"""What the policy engine produces: facts with evidence, criteria with a three-valued status, a decision.

These types are the contract between `fhir_mappings` (which computes them) and `cards` (which renders
them). They are plain, immutable data so a decision can be logged, compared in tests and explained
line by line without re-running anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


@dataclass(frozen=True)
class Evidence:
    """One piece of FHIR data a fact or criterion rests on."""

    reference: str  # "Condition/123"; draft orders keep their own id ("MedicationRequest/draft-1")
    date: str | None = None  # ISO 8601 date or dateTime as found in the resource
    code: str | None = None  # "ICD-10-CM F33.2", "LOINC 44261-6", "RxNorm 36437"
    display: str | None = None  # human label of the code or resource
    value: str | None = None  # "18", "172/95 mm[Hg]", "84 % of days covered"
    note: str | None = None  # how the evidence was interpreted
    path: str | None = None  # where inside the resource the value was read ("component[0].valueQuantity.value")

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class Bounds:
    """A number known only between two bounds (a partial date's age, a PDC with an unknown fill, an age from a
    birth year). A comparison with it is decided only when it holds the same way at both ends."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ValueError(f"Bounds low {self.low} above high {self.high}")

    @property
    def exact(self) -> bool:
        return self.low == self.high

    def __str__(self) -> str:
        def show(v: float) -> str:
            return f"{v:g}" if abs(v) < 1e15 else ("∞" if v > 0 else "-∞")

        return show(self.low) if self.exact else f"{show(self.low)}–{show(self.high)}"


def exact_or_bounds(low: float, high: float) -> float | Bounds:
    """A plain number when both ends agree, else Bounds."""
    return low if low == high else Bounds(low, high)


class FactState(StrEnum):
    PRESENT = "present"  # the fact has a value backed by evidence
    ABSENT = "absent"  # the data it depends on was read completely and holds nothing
    UNAVAILABLE = "unavailable"  # the data could not be read (or only partly, with nothing found)


@dataclass(frozen=True)
class Fact:
    """A named statement about the patient or the order, with the evidence behind it."""

    name: str
    state: FactState
    value: Any = None
    evidence: tuple[Evidence, ...] = ()
    detail: str = ""  # PHI-free explanation: why unavailable, which window, how computed
    complete: bool = True  # False when the data behind it was only partly read: absence proves nothing

    @property
    def present(self) -> bool:
        return self.state is FactState.PRESENT


class Status(StrEnum):
    """Three-valued criterion status. For an exclusion, MET means the exclusion holds."""

    MET = "met"
    NOT_MET = "not-met"
    UNKNOWN = "unknown"


class CriterionKind(StrEnum):
    REQUIREMENT = "requirement"
    EXCLUSION = "exclusion"


@dataclass(frozen=True)
class CriterionResult:
    id: str
    kind: CriterionKind
    title: str
    quote: str  # the policy sentence implemented
    status: Status
    evidence: tuple[Evidence, ...] = ()
    explanation: str = ""  # what the data showed, in one or two sentences
    missing: str = ""  # the exact ask when status is UNKNOWN (or what would change a NOT_MET)
    cleared_by: tuple[Evidence, ...] = ()  # exclusion present but lifted by documented clearance
    case_by_case: bool = False  # the policy leaves it to individual review: needs documentation, not a guess
    clearable: bool = False  # an exclusion the policy lets documented specialist clearance lift
    suggestion: Mapping[str, Any] | None = None  # {"label", "resource", "code"}: an order that would help
    # Resource types the criterion needed but could not (fully) read, when that is why it is unknown: a
    # technical gap (CRD 2.2 `indeterminate`), not missing documentation.
    unavailable: tuple[str, ...] = ()

    def evidence_refs(self) -> list[str]:
        refs: list[str] = []
        for ev in (*self.evidence, *self.cleared_by):
            if ev.reference not in refs:
                refs.append(ev.reference)
        return refs


class Outcome(StrEnum):
    LIKELY_AUTHORIZED = "likely-authorized"
    CRITERIA_NOT_MET = "criteria-not-met"
    BLOCKED = "blocked"
    DOCUMENTATION_NEEDED = "documentation-needed"
    NOT_COVERED = "not-covered"
    PLAN_VARIATION = "plan-variation"
    NOT_APPLICABLE = "not-applicable"
    NO_POLICY = "no-policy"  # no active coverage, ambiguous coverage or a payer without a policy here


@dataclass(frozen=True)
class PolicyRef:
    """The policy a decision was made under, as the card names it."""

    id: str  # "mgbhp-031"
    title: str
    number: str  # "Medical Policy 031"
    payer: str  # "Mass General Brigham Health Plan"
    url: str
    prior_authorization: str = "required"  # "required" | "not-stated" (the policy does not say)


@dataclass(frozen=True)
class Decision:
    """The outcome for one group of draft orders (one service) under one policy, with its reasons."""

    outcome: Outcome
    order_refs: tuple[str, ...]  # the draft orders this decision is about ("MedicationRequest/abc")
    order_label: str  # human-friendly: "IV ketamine infusion (MedicationRequest/abc)"
    policy: PolicyRef | None = None
    phase: str | None = None  # "initial" | "reauthorization" (policies with phases), else None
    service: str | None = None  # which covered service (MP-054: "eligibility-consultation" | "integration-therapy")
    criteria: tuple[CriterionResult, ...] = ()
    coverage_ref: str | None = None  # "Coverage/123" the decision assumed, when one was identified
    headline: str = ""  # one sentence on why (names the failing requirement / exclusion / program)
    notes: tuple[str, ...] = ()  # informational notes: dosing, plan details, obligations after service
    obligations: tuple[str, ...] = ()  # documentation the policy requires after a covered service
    program: str | None = None  # plan-variation: the governing program ("CMS Medicare Benefit Policy Manual ch. 15")
    links: tuple[tuple[str, str], ...] = ()  # (label, absolute URL) of references the card should link
    authorization_days: int | None = None  # length of the authorization the phase asks for
    mapping_version: str = ""
    payer: str | None = None  # the insurer's name, also when no policy applies (plan variation, pointer)
    facts: tuple[Fact, ...] = field(default=(), compare=False)  # for explain tools; not rendered

    def by_status(self, kind: CriterionKind, status: Status) -> list[CriterionResult]:
        return [c for c in self.criteria if c.kind is kind and c.status is status]

    def to_extension(self) -> dict[str, Any]:
        """The machine-readable `ketamine-cds.decision` card extension."""
        ext: dict[str, Any] = {
            "policy": self.policy.id if self.policy else None,
            "outcome": self.outcome.value,
            "orders": list(self.order_refs),
            "criteria": [
                {
                    "id": c.id,
                    "kind": c.kind.value,
                    "status": c.status.value,
                    "evidence": c.evidence_refs(),  # always present: [] when the criterion rests on no resource
                    **({"cleared": True} if c.cleared_by else {}),
                    **({"caseByCase": True} if c.case_by_case else {}),
                }
                for c in self.criteria
            ],
        }
        if self.coverage_ref:
            ext["coverage"] = self.coverage_ref
        if self.phase:
            ext["phase"] = self.phase
        if self.service:
            ext["service"] = self.service
        if self.program:
            ext["program"] = self.program
        if self.mapping_version:
            ext["mappingVersion"] = self.mapping_version
        return {k: v for k, v in ext.items() if v is not None and v != []}
