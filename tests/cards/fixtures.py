"""Hand-built decisions for every outcome and realistic draft orders (CRD-profile-valid, FHIR R4)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

from fhir_mappings.model import (
    CriterionKind,
    CriterionResult,
    Decision,
    Evidence,
    Outcome,
    PolicyRef,
    Status,
)

HOOK = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
OTHER_HOOK = "0f9e6b0a-7d3c-4f4e-9a51-2b8c3d4e5f60"
PATIENT = "pat-1"
USER = "PractitionerRole/prac-psych-role"
TODAY = date(2026, 1, 15)
COVERAGE = "Coverage/cov-mgb"
OTHER_COVERAGE = "Coverage/cov-uuhp"
REQ = CriterionKind.REQUIREMENT
EXC = CriterionKind.EXCLUSION

MGB = PolicyRef(
    id="mgbhp-031",
    title="Intravenous Ketamine for Treatment-Resistant Depression",
    number="Medical Policy 031",
    payer="Mass General Brigham Health Plan",
    url="https://massgeneralbrighamhealthplan.org/providers/medical-policies",
)
UUHP = PolicyRef(
    id="uuhp-mp-054",
    title="Ketamine-Assisted Psychotherapy",
    number="MP-054",
    payer="University of Utah Health Plans",
    url="https://uhealthplan.utah.edu/medicalpolicy/",
)


@dataclass(frozen=True)
class FakeSuggestion:
    """Shape of fhir_mappings.policy.Suggestion."""

    label: str
    resource_type: str
    code: dict[str, str]


@dataclass(frozen=True)
class ResultWithSuggestion(CriterionResult):
    """CriterionResult plus the proposed `suggestion` field."""

    suggestion: Any = None


PHQ9_SUGGESTION = FakeSuggestion(
    "Order a PHQ-9 depression assessment",
    "ServiceRequest",
    {"system": "http://loinc.org", "code": "44249-1", "display": "PHQ-9 quick depression assessment panel"},
)


def medication_request(order_id: str = "mr-ketamine", **changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{PATIENT}"},
        "authoredOn": "2026-01-15",
        "requester": {"reference": USER},
        "medicationCodeableConcept": {
            "coding": [
                {
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "code": "238082",
                    "display": "ketamine 10 MG/ML Injectable Solution",
                }
            ],
            "text": "ketamine 10 MG/ML Injectable Solution",
        },
        "dosageInstruction": [{"text": "0.5 mg/kg IV over 40 minutes, twice weekly for 4 weeks"}],
    }
    resource.update(changes)
    return resource


def service_request(order_id: str = "sr-infusion", code: str = "96365", **changes: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "id": order_id,
        "status": "draft",
        "intent": "order",
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": code}]},
        "subject": {"reference": f"Patient/{PATIENT}"},
        "authoredOn": "2026-01-15",
        "requester": {"reference": USER},
    }
    resource.update(changes)
    return resource


def drafts() -> list[dict[str, Any]]:
    return [copy.deepcopy(medication_request()), copy.deepcopy(service_request())]


def ev(ref: str, **kw: Any) -> Evidence:
    return Evidence(ref, **kw)


# ------------------------------------------------------------------------------------------------ criteria

AGE_MET = CriterionResult(
    "initial-age",
    REQ,
    "Age 18 or older",
    "The member is 18 years or older",
    Status.MET,
    evidence=(ev("Patient/pat-1", value="42", note="age on the order date"),),
)
MDD_MET = CriterionResult(
    "initial-1-unipolar-mdd",
    REQ,
    "Unipolar major depressive disorder (DSM-5)",
    "1. ...",
    Status.MET,
    evidence=(
        ev("Condition/c1", date="2025-01-10T09:00:00Z", code="ICD-10-CM F33.2", display="MDD recurrent severe"),
        ev("Condition/c2", date="2024-11-02", code="ICD-10-CM F32.2"),
        ev("Condition/c3", date="2024-05-02", code="ICD-10-CM F32.1"),
        ev("Condition/c4", date="2023-05-02", code="ICD-10-CM F32.0"),
        ev("Condition/c5", date="2022-05-02", code="ICD-10-CM F32.9"),
    ),
)
SEVERITY_UNKNOWN = ResultWithSuggestion(
    "initial-3-severity",
    REQ,
    "Severe current episode on a rating scale within 30 days",
    "3. ...",
    Status.UNKNOWN,
    explanation="checked 12 Observation (all read)",
    missing=(
        "Record a depression rating within the last 30 days (PHQ-9 ≥ 15, HAM-D ≥ 17, MADRS ≥ 28 or QIDS-SR16 ≥ 16)."
    ),
    suggestion=PHQ9_SUGGESTION,
)
TRIALS_UNKNOWN = CriterionResult(
    "initial-4-treatment-trials",
    REQ,
    "Four adequate trials from two or more antidepressant classes in the current episode",
    "4. ...",
    Status.UNKNOWN,
    evidence=(ev("MedicationStatement/ms1", date="2025-03-01", code="RxNorm 36437", value="84 % of days covered"),),
    explanation="2 adequate trials found",
    missing="Document two more antidepressant trials | each ≥ 6 weeks at ≥ 80 % adherence.",
)
TRIALS_NOT_MET = replace(
    TRIALS_UNKNOWN,
    status=Status.NOT_MET,
    explanation="Only 3 trials in the current episode",
    missing="A fourth adequate trial would meet it.",
)
EVAL_CASE = CriterionResult(
    "initial-5-psychiatrist-evaluation",
    REQ,
    "Psychiatrist evaluation documented",
    "5. ...",
    Status.UNKNOWN,
    explanation="PTSD with severe depressive symptoms: case by case",
    missing="Document the psychiatrist's evaluation supporting individual review.",
    case_by_case=True,
)
PREGNANCY_ABSENT = CriterionResult(
    "exclusion-1-pregnancy",
    EXC,
    "Pregnant, breastfeeding or at risk of becoming pregnant",
    "...",
    Status.NOT_MET,
    explanation="checked 3 Condition (all read)",
)
DEMENTIA_ABSENT = CriterionResult("exclusion-3-dementia", EXC, "Dementia", "...", Status.NOT_MET)
BP_HOLDS = CriterionResult(
    "exclusion-10-cardiovascular",
    EXC,
    "Uncontrolled hypertension, arrhythmia or unstable cardiovascular disease without cardiology clearance",
    "...",
    Status.MET,
    evidence=(ev("Observation/bp1", date="2026-01-10", code="LOINC 85354-9", value="172/95 mm[Hg]"),),
    explanation="present, no cardiology clearance on record",
    missing="Document cardiology clearance for IV ketamine.",
)
AVM_CLEARED = CriterionResult(
    "exclusion-8-aneurysm-avm",
    EXC,
    "Aneurysmal vascular disease or AVM without specialist clearance",
    "...",
    Status.NOT_MET,
    evidence=(ev("Condition/avm1", date="2020-02-02", code="ICD-10-CM Q28.2"),),
    explanation="present, lifted by documented neurovascular clearance",
    cleared_by=(ev("DocumentReference/clear1", date="2025-12-01", note="neurovascular clearance"),),
)
PSYCHOSIS_UNKNOWN = CriterionResult(
    "exclusion-2-psychotic-disorder",
    EXC,
    "Primary psychotic disorder (psychotic features in severe depression case by case)",
    "...",
    Status.UNKNOWN,
    evidence=(ev("Condition/psy1", date="2025-06-01", code="ICD-10-CM F32.3"),),
    explanation="psychotic features documented: case by case",
    missing="Document whether psychotic features are part of the severe depressive episode.",
    case_by_case=True,
)
RELEASE_UNKNOWN = CriterionResult(
    "exclusion-16-ongoing-care-release",
    EXC,
    "Not under ongoing psychiatric/APRN/PCP care, or no release of information",
    "...",
    Status.UNKNOWN,
    missing="Document ongoing psychiatric care and a signed release of information.",
)


_BASE: dict[str, Any] = dict(
    order_refs=("MedicationRequest/mr-ketamine", "ServiceRequest/sr-infusion"),
    order_label="ketamine administration: MedicationRequest/mr-ketamine, ServiceRequest/sr-infusion",
    policy=MGB,
    coverage_ref=COVERAGE,
    links=(("MGB Health Plan medical policies (Policy 031)", MGB.url),),
    mapping_version="ms-0123456789ab",
)
_INITIAL: dict[str, Any] = dict(phase="initial", authorization_days=28)
OBLIGATION = "Evaluate therapeutic benefit on a rating scale at the end of the induction phase."


def likely_authorized(**kw: Any) -> Decision:
    decision = Decision(
        outcome=Outcome.LIKELY_AUTHORIZED,
        criteria=(AGE_MET, MDD_MET, AVM_CLEARED, PREGNANCY_ABSENT, DEMENTIA_ABSENT),
        headline="All 2 requirements are documented and none of the 3 exclusions applies.",
        notes=("Induction: 0.5 mg/kg over 40 minutes, 2–3 times a week, weeks 1–4 (ordered: 35 mg for 70 kg).",),
        obligations=(OBLIGATION,),
        **_INITIAL,
        **_BASE,
    )
    return replace(decision, **kw)


def documentation_needed(**kw: Any) -> Decision:
    decision = Decision(
        outcome=Outcome.DOCUMENTATION_NEEDED,
        criteria=(
            AGE_MET,
            MDD_MET,
            SEVERITY_UNKNOWN,
            TRIALS_UNKNOWN,
            EVAL_CASE,
            PSYCHOSIS_UNKNOWN,
            RELEASE_UNKNOWN,
            PREGNANCY_ABSENT,
            DEMENTIA_ABSENT,
        ),
        headline="Not documented: severity; trials; evaluation; psychosis; release",
        obligations=(OBLIGATION,),
        **_INITIAL,
        **_BASE,
    )
    return replace(decision, **kw)


def criteria_not_met(**kw: Any) -> Decision:
    decision = Decision(
        outcome=Outcome.CRITERIA_NOT_MET,
        criteria=(AGE_MET, TRIALS_NOT_MET, SEVERITY_UNKNOWN, PREGNANCY_ABSENT),
        headline="Requirement not met: Four adequate trials from two or more antidepressant classes",
        **_INITIAL,
        **_BASE,
    )
    return replace(decision, **kw)


def blocked(**kw: Any) -> Decision:
    decision = Decision(
        outcome=Outcome.BLOCKED,
        criteria=(AGE_MET, MDD_MET, BP_HOLDS, PREGNANCY_ABSENT),
        headline="Exclusion applies: Uncontrolled hypertension, arrhythmia or unstable cardiovascular disease",
        **_INITIAL,
        **_BASE,
    )
    return replace(decision, **kw)


def not_covered(**kw: Any) -> Decision:
    decision = Decision(
        outcome=Outcome.NOT_COVERED,
        order_refs=("MedicationRequest/mr-kap",),
        order_label="ketamine administration (MedicationRequest/mr-kap, RxNorm 6130 ketamine)",
        policy=UUHP,
        coverage_ref=OTHER_COVERAGE,
        headline="Ketamine administration for KAP is investigational and not covered under MP-054.",
        notes=("Ketamine administration in any form for KAP is considered investigational.",),
        links=(("U of U Health Plans medical policies", "https://uhealthplan.utah.edu/medicalpolicy/"),),
        mapping_version="ms-0123456789ab",
    )
    return replace(decision, **kw)


CMS_LINK = (
    "Medicare Benefit Policy Manual, Chapter 15",
    "https://www.cms.gov/Regulations-and-Guidance/Guidance/Manuals/Downloads/bp102c15.pdf",
)


def plan_variation(**kw: Any) -> Decision:
    decision = Decision(
        outcome=Outcome.PLAN_VARIATION,
        criteria=(AGE_MET, SEVERITY_UNKNOWN, PREGNANCY_ABSENT),
        headline=(
            "For Medicare Advantage members the plan decides under CMS guidance; "
            "Policy 031 criteria are shown for reference."
        ),
        notes=("Mass General Brigham Health Plan uses guidance from CMS for medical necessity determinations.",),
        program="CMS: Medicare Benefit Policy Manual, Chapter 15 (Covered Medical and Other Health Services)",
        **_INITIAL,
        **{**_BASE, "links": (CMS_LINK, *_BASE["links"])},
    )
    return replace(decision, **kw)


def not_applicable(**kw: Any) -> Decision:
    decision = Decision(
        outcome=Outcome.NOT_APPLICABLE,
        order_refs=("MedicationRequest/mr-spravato",),
        order_label="intranasal esketamine (Spravato) (MedicationRequest/mr-spravato, RxNorm 2119365 esketamine)",
        coverage_ref=COVERAGE,
        headline="Esketamine nasal spray (Spravato) is not governed by Medical Policy 031.",
        program="Mass General Brigham Health Plan Spravato pharmacy policy",
        mapping_version="ms-0123456789ab",
    )
    return replace(decision, **kw)


def no_policy(**kw: Any) -> Decision:
    decision = Decision(
        outcome=Outcome.NO_POLICY,
        order_refs=("MedicationRequest/mr-ketamine",),
        order_label="IV ketamine administration (MedicationRequest/mr-ketamine, RxNorm 238082 ketamine)",
        coverage_ref="Coverage/cov-other",
        headline="The patient's payer has no ketamine policy configured in this service.",
        program="payer-not-handled",
        notes=("Coverage/cov-other (commercial)",),
        mapping_version="ms-0123456789ab",
    )
    return replace(decision, **kw)


def all_decisions() -> dict[str, Decision]:
    return {
        "likely-authorized": likely_authorized(),
        "documentation-needed": documentation_needed(),
        "criteria-not-met": criteria_not_met(),
        "blocked": blocked(),
        "not-covered": not_covered(),
        "plan-variation": plan_variation(),
        "not-applicable": not_applicable(),
        "no-policy": no_policy(),
    }


def orders_for(decision: Decision) -> list[dict[str, Any]]:
    """Draft orders matching a decision's order refs (MedicationRequest / ServiceRequest)."""
    out = []
    for ref in decision.order_refs:
        rtype, rid = ref.split("/")
        out.append(medication_request(rid) if rtype == "MedicationRequest" else service_request(rid))
    return out
