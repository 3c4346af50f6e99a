"""Payer / plan routing across both payers, end to end through `Mappings.decide(record, groups)`.

Records are the fixture base patients — MGB 031 (`mgbhp-031.cases/base.json`: IV ketamine for TRD, MGB commercial)
and MP-054 (`uuhp-mp-054.cases/base.json`: KAP integration psychotherapy 90837, U of U commercial) — with only the
Coverage / payer (and, where a test is about order kinds, the draft orders) changed. Every type a prefetch query
supplies is read completely and references are resolvable, so routing is the only thing that varies.

Sandbox payer conventions: payer Organizations `payer-mgbhp` / `payer-uuhp` with identifier
https://ketamine-cds.example.org/payer-id MGBHP / UUHP; Coverage.type in SOPT (https://nahdo.org/sopt).
"""

from __future__ import annotations

import copy
import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fhir_mappings.mappings import MappingError, Mappings, SiteConfig, load_engine
from fhir_mappings.model import Decision, Outcome
from fhir_mappings.record import PatientRecord

POLICIES = Path(__file__).resolve().parents[2] / "fhir_mappings" / "policies"
MGB = POLICIES / "mgbhp-031.cases" / "base.json"
UUHP = POLICIES / "uuhp-mp-054.cases" / "base.json"

SOPT = "https://nahdo.org/sopt"
PAYER_ID = "https://ketamine-cds.example.org/payer-id"
RX = "http://www.nlm.nih.gov/research/umls/rxnorm"
CPT = "http://www.ama-assn.org/go/cpt"
HCPCS = "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets"
SCT = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"
NAIC = "http://www.naic.org/cocode"  # an identifier system an EHR might send for the payer (site configuration)

Resource = dict[str, Any]


# --- building records -----------------------------------------------------------------------------
@functools.cache
def _base_text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def base(path: Path) -> dict[str, Any]:
    return json.loads(_base_text(path))


def cc(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def sopt(code: str, display: str = "") -> dict[str, Any]:
    return cc(SOPT, code, display or f"SOPT {code}")


def coverage(
    path: Path,
    cid: str,
    payor: list[dict[str, Any]] | None = None,
    *,
    type_: dict[str, Any] | None = None,
    plan: str | None = None,
    status: str = "active",
    period: dict[str, str] | None = None,
    order: int | None = None,
    contained: list[Resource] | None = None,
) -> Resource:
    """A Coverage for the base's patient; `plan` is the Coverage.class (type plan) name and value."""
    patient = base(path)["patient_id"]
    cov: Resource = {
        "resourceType": "Coverage",
        "id": cid,
        "status": status,
        "beneficiary": {"reference": f"Patient/{patient}"},
        "payor": payor if payor is not None else [{"reference": "Organization/payer-mgbhp"}],
        "period": period or {"start": "2025-01-01"},
    }
    if type_ is not None:
        cov["type"] = type_
    if plan is not None:
        cov["class"] = [
            {
                "type": cc("http://terminology.hl7.org/CodeSystem/coverage-class", "plan", "Plan"),
                "value": plan.upper().replace(" ", "-"),
                "name": plan,
            }
        ]
    if order is not None:
        cov["order"] = order
    if contained:
        cov["contained"] = contained
    return cov


def org(oid: str, name: str | None = None, identifier: tuple[str, str] | None = None, alias: list[str] | None = None):
    resource: Resource = {"resourceType": "Organization", "id": oid}
    if name:
        resource["name"] = name
    if identifier:
        resource["identifier"] = [{"system": identifier[0], "value": identifier[1]}]
    if alias:
        resource["alias"] = alias
    return resource


def build(
    path: Path,
    *,
    coverages: list[Resource] | None = None,
    add: list[Resource] = (),  # type: ignore[assignment]
    drop: tuple[str, ...] = (),
    orders: list[Resource] | None = None,
    add_orders: list[Resource] = (),  # type: ignore[assignment]
    engine: Mappings | None = None,
) -> PatientRecord:
    """The base patient with its Coverage(s) replaced (None: keep the base's), resources added / dropped."""
    b = base(path)
    engine = engine or load_engine()
    resources = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"] for e in b["bundle"]["entry"]}
    if coverages is not None:
        resources = {k: v for k, v in resources.items() if not k.startswith("Coverage/")}
        resources.update({f"Coverage/{c['id']}": c for c in coverages})
    for key in drop:
        resources.pop(key, None)
    for resource in add:
        resources[f"{resource['resourceType']}/{resource['id']}"] = resource
    draft = copy.deepcopy(orders if orders is not None else b["draft_orders"]) + copy.deepcopy(list(add_orders))
    return PatientRecord.from_resources(
        b["patient_id"],
        datetime.fromisoformat(b["anchor_date"] + "T17:00:00+00:00"),
        copy.deepcopy(list(resources.values())),
        engine.queries.supplied_types(),
        draft,
        user_id=b.get("user_id"),
        encounter_id=b.get("encounter_id"),
        references_resolvable=True,
    )


def decide(record: PatientRecord, engine: Mappings | None = None) -> list[Decision]:
    engine = engine or load_engine()
    return engine.decide(record, engine.triage(record.draft_orders))


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, [(d.outcome.value, d.order_refs, d.headline) for d in decisions]
    return decisions[0]


def criterion_ids(decision: Decision) -> set[str]:
    return {c.id for c in decision.criteria}


# Orders used beside the bases' own draft orders.
KETAMINE_IM_KAP: Resource = {
    "resourceType": "MedicationRequest",
    "id": "uu-ketamine-im",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/uu-base"},
    "authoredOn": "2026-01-15",
    "medicationCodeableConcept": cc(RX, "238083", "ketamine 100 MG/ML Injectable Solution"),
    "reasonCode": [cc(ICD, "F33.1", "Major depressive disorder, recurrent, moderate")],
    "dosageInstruction": [
        {
            "text": "ketamine 0.75 mg/kg IM at the next KAP dosing session",
            "route": cc(SCT, "78421000", "Intramuscular route"),
        }
    ],
}
INFUSION_96365: Resource = {
    "resourceType": "ServiceRequest",
    "id": "mgb-infusion",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/mgb-base"},
    "code": cc(CPT, "96365", "Intravenous infusion, for therapy, prophylaxis, or diagnosis; initial, up to 1 hour"),
    "authoredOn": "2026-01-15",
}
PSYCHOTHERAPY_90837: Resource = {
    "resourceType": "ServiceRequest",
    "id": "mgb-psychotherapy",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/mgb-base"},
    "code": cc(CPT, "90837", "Psychotherapy, 60 minutes with patient"),
    "occurrenceDateTime": "2026-01-20T10:00:00-05:00",
    "reasonCode": [cc(ICD, "F33.2", "Major depressive disorder, recurrent severe without psychotic features")],
}


def spravato(patient: str) -> Resource:
    return {
        "resourceType": "MedicationRequest",
        "id": f"{patient}-spravato",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient}"},
        "authoredOn": "2026-01-15",
        "medicationCodeableConcept": cc(RX, "2119387", "esketamine 140 MG/ML Nasal Spray [Spravato]"),
        "dosageInstruction": [
            {"text": "56 mg intranasal twice weekly (induction)", "route": cc(SCT, "46713006", "Nasal route")}
        ],
    }


def g2082(patient: str) -> Resource:
    return {
        "resourceType": "ServiceRequest",
        "id": f"{patient}-g2082",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient}"},
        "code": cc(HCPCS, "G2082", "Esketamine nasal self administration, up to 56 mg, with 2 hours observation"),
        "authoredOn": "2026-01-15",
    }


MGB_PAYER = [{"reference": "Organization/payer-mgbhp"}]
UUHP_PAYER = [{"reference": "Organization/payer-uuhp"}]


def mgb(**kwargs: Any) -> Resource:
    return coverage(MGB, kwargs.pop("cid", "mgb-cov"), kwargs.pop("payor", MGB_PAYER), **kwargs)


def uuhp(**kwargs: Any) -> Resource:
    return coverage(UUHP, kwargs.pop("cid", "uu-cov"), kwargs.pop("payor", UUHP_PAYER), **kwargs)


# --- MGB Health Plan ------------------------------------------------------------------------------
def test_mgb_commercial_is_decided_under_031() -> None:
    """The 031 base as is: SOPT 512 commercial PPO -> Medical Policy 031 evaluated (not a variation)."""
    decision = only(decide(build(MGB)))
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"
    assert decision.outcome is Outcome.LIKELY_AUTHORIZED
    assert decision.phase == "initial" and decision.program is None
    assert decision.coverage_ref == "Coverage/mgb-base-cov"
    assert decision.order_refs == ("MedicationRequest/mgb-base-ketamine",)


@pytest.mark.parametrize(
    "cov",
    [
        pytest.param(mgb(plan="MGB ACO"), id="class-MGB-ACO"),
        pytest.param(
            mgb(plan="Mass General Brigham ACO", type_=sopt("21", "Medicaid (Managed Care)")), id="class+SOPT-21"
        ),
        pytest.param(mgb(plan="MGBHP-PLAN-4410", type_=sopt("21", "Medicaid (Managed Care)")), id="SOPT-21-only"),
    ],
)
def test_mgb_aco_is_the_masshealth_drug_list_without_031_criteria(cov: Resource) -> None:
    decision = only(decide(build(MGB, coverages=[cov])))
    assert decision.outcome is Outcome.PLAN_VARIATION
    assert "MassHealth Drug List" in (decision.program or "")
    assert "Mass General Brigham ACO" in decision.headline
    # the MassHealth Variation is a section of Policy 031: the decision names 031 but does not apply its criteria
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"
    assert decision.criteria == () and decision.phase is None
    assert decision.coverage_ref == "Coverage/mgb-cov"


@pytest.mark.parametrize(
    "cov",
    [
        pytest.param(mgb(type_=sopt("111", "Medicare HMO"), plan="MGB Health Plan Medicare HMO"), id="SOPT-111"),
        pytest.param(mgb(plan="Mass General Brigham Health Plan Medicare Advantage"), id="class-medicare-advantage"),
    ],
)
def test_mgb_medicare_advantage_is_cms_first_with_031_criteria_shown(cov: Resource) -> None:
    commercial = only(decide(build(MGB)))
    decision = only(decide(build(MGB, coverages=[cov])))
    assert decision.outcome is Outcome.PLAN_VARIATION
    assert "Medicare Benefit Policy Manual, Chapter 15" in (decision.program or "")
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"  # the fallback, shown for reference
    assert criterion_ids(decision) == criterion_ids(commercial) and decision.criteria
    assert decision.phase == "initial"
    assert "Medical Policy 031 applies only where CMS is silent" in decision.headline
    assert any("bp102c15" in url for _, url in decision.links)


@pytest.mark.parametrize(
    "cov",
    [
        pytest.param(mgb(type_=sopt("142", "FIDE-SNP"), plan="One Care"), id="one-care"),
        pytest.param(mgb(plan="MGB Health Plan OneCare"), id="onecare-spelling"),
        pytest.param(mgb(type_=sopt("141", "D-SNP"), plan="Senior Care Options"), id="senior-care-options"),
        pytest.param(mgb(plan="MGB SCO"), id="sco"),
    ],
)
def test_mgb_one_care_and_sco_are_cms_then_masshealth_then_031(cov: Resource) -> None:
    commercial = only(decide(build(MGB)))
    decision = only(decide(build(MGB, coverages=[cov])))
    assert decision.outcome is Outcome.PLAN_VARIATION
    program = decision.program or ""
    assert program.index("CMS") < program.index("MassHealth"), program  # CMS first, then MassHealth ...
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"  # ... then 031
    assert criterion_ids(decision) == criterion_ids(commercial)
    assert "One Care and Senior Care Options" in decision.headline


def test_mgb_one_care_plan_named_after_masshealth_is_still_one_care() -> None:
    """One Care is a MassHealth + Medicare plan and plan names say so. A One Care member whose Coverage.class reads
    "MGB One Care (MassHealth + Medicare)" (SOPT 142, dual) must get the One Care variation (CMS, then MassHealth,
    then 031), not the MGB ACO one: routing.yaml checks One Care / SCO / Medicare Advantage before the ACO."""
    cov = mgb(type_=sopt("142", "FIDE-SNP"), plan="MGB One Care (MassHealth + Medicare)")
    decision = only(decide(build(MGB, coverages=[cov])))
    assert decision.outcome is Outcome.PLAN_VARIATION
    assert (decision.program or "").startswith("CMS guidance"), decision.program
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"


@pytest.mark.parametrize(
    "cov",
    [
        pytest.param(mgb(plan="MGBHP-GROUP-004417"), id="class-says-nothing"),
        pytest.param(mgb(type_=sopt("121", "Medicare FFS")), id="original-medicare-type"),
        pytest.param(mgb(), id="no-type-no-class"),
    ],
)
def test_mgb_plan_not_recognised_is_no_policy(cov: Resource) -> None:
    decision = only(decide(build(MGB, coverages=[cov])))
    assert decision.outcome is Outcome.NO_POLICY
    assert decision.program == "plan-not-recognised"
    assert decision.coverage_ref == "Coverage/mgb-cov"
    assert decision.policy is None and decision.criteria == ()


def test_mgb_psychotherapy_is_not_031s_business() -> None:
    """031 governs ketamine administration only: a psychotherapy order for an MGB member gets no decision,
    neither under 031 (commercial) nor under the ACO variation."""
    assert decide(build(MGB, orders=[PSYCHOTHERAPY_90837])) == []
    assert decide(build(MGB, coverages=[mgb(plan="MGB ACO")], orders=[PSYCHOTHERAPY_90837])) == []


# --- U of U Health Plans ----------------------------------------------------------------------------
MP054_INTEGRATION = {
    "a-credentialed-clinic",
    "b-diagnosis",
    "c-timing",
    "f-onsite-monitor",
    "g-licensed-provider",
    "g-kap-training",
}


def test_uuhp_commercial_is_decided_under_mp054() -> None:
    """The MP-054 base as is (SOPT 512). Without a site credentialed-clinic list A is unknown (documentation
    needed); with the fixture folder's site.yaml every criterion is met."""
    decision = only(decide(build(UUHP)))
    assert decision.policy is not None and decision.policy.id == "uuhp-mp-054"
    assert decision.service == "integration-therapy" and decision.program is None
    assert decision.coverage_ref == "Coverage/uu-base-cov"
    assert decision.outcome is Outcome.DOCUMENTATION_NEEDED
    assert {c.id: c.status.value for c in decision.criteria}["a-credentialed-clinic"] == "unknown"

    site = Mappings.load(SiteConfig.from_file(POLICIES / "uuhp-mp-054.cases" / "site.yaml"))
    decision = only(decide(build(UUHP, engine=site), site))
    assert decision.outcome is Outcome.LIKELY_AUTHORIZED
    assert criterion_ids(decision) == MP054_INTEGRATION


@pytest.mark.parametrize(
    "cov",
    [
        pytest.param(uuhp(type_=sopt("23", "Medicaid/SCHIP"), plan="UUHP-PLAN-2301"), id="SOPT-23"),
        pytest.param(uuhp(plan="CHIP"), id="class-CHIP"),
        pytest.param(uuhp(type_=sopt("23", "Medicaid/SCHIP"), plan="Utah CHIP"), id="both"),
    ],
)
def test_uuhp_chip_has_the_commercial_criteria(cov: Resource) -> None:
    decision = only(decide(build(UUHP, coverages=[cov])))
    assert decision.outcome is not Outcome.PLAN_VARIATION
    assert decision.policy is not None and decision.policy.id == "uuhp-mp-054"
    assert decision.service == "integration-therapy"
    assert criterion_ids(decision) == MP054_INTEGRATION


@pytest.mark.parametrize(
    ("cov", "payers"),
    [
        pytest.param(
            uuhp(payor=[{"reference": "Organization/payer-healthy-u"}], plan="UUHP-HU-ADULT"),
            [org("payer-healthy-u", "Healthy U")],
            id="payer-name-Healthy-U",
        ),
        pytest.param(uuhp(plan="Healthy U Medicaid"), [], id="class-Healthy-U-Medicaid"),
        pytest.param(uuhp(type_=sopt("21", "Medicaid (Managed Care)"), plan="UUHP-PLAN-2104"), [], id="SOPT-21"),
    ],
)
def test_healthy_u_is_utah_medicaid_with_mp054_as_fallback(cov: Resource, payers: list[Resource]) -> None:
    decision = only(decide(build(UUHP, coverages=[cov], add=payers)))
    assert decision.outcome is Outcome.PLAN_VARIATION
    assert decision.program == "State of Utah Medicaid program"
    assert decision.policy is not None and decision.policy.id == "uuhp-mp-054"
    assert decision.service == "integration-therapy"
    assert criterion_ids(decision) == MP054_INTEGRATION  # the commercial criteria, shown for reference
    assert any("medicaid.utah.gov" in url for _, url in decision.links)


def test_healthy_u_psychotherapy_without_kap_context_gets_no_decision() -> None:
    """The fallback policy is silent on ordinary psychotherapy (no KAP session, nothing naming KAP), so the plan
    variation is silent too."""
    record = build(
        UUHP,
        coverages=[uuhp(plan="Healthy U Medicaid")],
        drop=("Procedure/uu-base-kap-session", "MedicationAdministration/uu-base-kap-ketamine"),
    )
    assert decide(record) == []


def test_uuhp_plan_not_recognised_is_no_policy() -> None:
    decision = only(decide(build(UUHP, coverages=[uuhp(plan="UUHP-GROUP-88120")])))
    assert decision.outcome is Outcome.NO_POLICY and decision.program == "plan-not-recognised"


def test_uuhp_medicare_advantage_is_not_an_mp054_plan() -> None:
    """MP-054 covers the Commercial, CHIP and Healthy U plans only: a U of U Medicare Advantage coverage is not a plan
    routing.yaml knows - no policy, never MP-054's commercial criteria."""
    decision = only(decide(build(UUHP, coverages=[uuhp(type_=sopt("111", "Medicare HMO"), plan="UUHP-MA-HMO")])))
    assert decision.outcome is Outcome.NO_POLICY and decision.program == "plan-not-recognised"


def test_healthy_u_ketamine_for_kap_shows_mp054_not_covered_for_reference() -> None:
    """Ketamine for KAP for a Healthy U member: Utah Medicaid decides (plan variation); MP-054's commercial position
    (ketamine for KAP not covered) is what the card shows for reference."""
    decision = only(decide(build(UUHP, coverages=[uuhp(plan="Healthy U Medicaid")], orders=[KETAMINE_IM_KAP])))
    assert decision.outcome is Outcome.PLAN_VARIATION and decision.program == "State of Utah Medicaid program"
    assert {c.id: c.status.value for c in decision.criteria} == {"ketamine-for-kap-not-covered": "not-met"}


def test_uuhp_ketamine_for_kap_and_psychotherapy_are_two_decisions() -> None:
    """Ketamine administration (not covered for KAP) and the integration session signed together: one decision
    per order group, each naming only its own order."""
    decisions = decide(build(UUHP, add_orders=[KETAMINE_IM_KAP]))
    assert len(decisions) == 2
    by_ref = {d.order_refs: d for d in decisions}
    ketamine = by_ref[("MedicationRequest/uu-ketamine-im",)]
    therapy = by_ref[("ServiceRequest/uu-base-integration",)]
    assert ketamine.outcome is Outcome.NOT_COVERED and ketamine.policy and ketamine.policy.id == "uuhp-mp-054"
    assert therapy.service == "integration-therapy" and therapy.policy and therapy.policy.id == "uuhp-mp-054"
    assert therapy.outcome in (Outcome.DOCUMENTATION_NEEDED, Outcome.LIKELY_AUTHORIZED)


def test_uuhp_ketamine_for_anaesthesia_is_not_applicable() -> None:
    order = copy.deepcopy(KETAMINE_IM_KAP)
    order["reasonCode"] = [cc(ICD, "Z01.818", "Encounter for other preprocedural examination")]
    decision = only(decide(build(UUHP, orders=[order])))
    assert decision.outcome is Outcome.NOT_APPLICABLE and decision.policy and decision.policy.id == "uuhp-mp-054"


# --- which coverage --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "coverages",
    [
        pytest.param([], id="none"),
        pytest.param([uuhp(status="cancelled")], id="cancelled"),
        pytest.param([uuhp(period={"start": "2024-01-01", "end": "2025-12-31"})], id="period-ended"),
        pytest.param([uuhp(period={"start": "2026-02-01"})], id="period-not-started"),
        pytest.param([uuhp(status="draft")], id="draft"),
    ],
)
def test_no_active_coverage_is_one_no_policy_decision_for_all_orders(coverages: list[Resource]) -> None:
    record = build(UUHP, coverages=coverages, add_orders=[KETAMINE_IM_KAP])
    assert len(load_engine().triage(record.draft_orders)) == 2  # two order groups ...
    decision = only(decide(record))  # ... one decision
    assert decision.outcome is Outcome.NO_POLICY and decision.program == "no-active-coverage"
    assert set(decision.order_refs) == {"ServiceRequest/uu-base-integration", "MedicationRequest/uu-ketamine-im"}
    assert decision.coverage_ref is None and decision.policy is None


def test_two_active_coverages_without_order_are_ambiguous() -> None:
    record = build(
        UUHP,
        coverages=[uuhp(cid="uu-cov-a"), mgb(cid="mgb-cov-b", type_=sopt("512"))],
        add=[org("payer-mgbhp", "Mass General Brigham Health Plan", (PAYER_ID, "MGBHP"))],
    )
    decision = only(decide(record))
    assert decision.outcome is Outcome.NO_POLICY and decision.program == "coverage-ambiguous"
    assert any("Coverage/uu-cov-a" in n for n in decision.notes) and any(
        "Coverage/mgb-cov-b" in n for n in decision.notes
    )


def test_two_active_coverages_one_without_order_are_ambiguous() -> None:
    record = build(
        MGB, coverages=[mgb(cid="mgb-cov-a", type_=sopt("512"), order=1), mgb(cid="mgb-cov-b", plan="MGB ACO")]
    )
    assert only(decide(record)).program == "coverage-ambiguous"


@pytest.mark.parametrize(
    ("path", "primary", "expected_policy"),
    [
        pytest.param(MGB, "mgb", "mgbhp-031", id="MGB-primary-UUHP-secondary"),
        pytest.param(UUHP, "uuhp", "uuhp-mp-054", id="UUHP-primary-MGB-secondary"),
    ],
)
def test_two_active_coverages_with_order_use_the_primary(path: Path, primary: str, expected_policy: str) -> None:
    mgb_cov = mgb(cid="mgb-cov", type_=sopt("512"), order=1 if primary == "mgb" else 2)
    uu_cov = uuhp(cid="uu-cov", type_=sopt("512"), order=1 if primary == "uuhp" else 2)
    payers = [
        org("payer-mgbhp", "Mass General Brigham Health Plan", (PAYER_ID, "MGBHP")),
        org("payer-uuhp", "University of Utah Health Plans", (PAYER_ID, "UUHP")),
    ]
    decision = only(decide(build(path, coverages=[mgb_cov, uu_cov], add=payers)))
    assert decision.policy is not None and decision.policy.id == expected_policy
    assert decision.coverage_ref == ("Coverage/mgb-cov" if primary == "mgb" else "Coverage/uu-cov")


def test_primary_coverage_with_an_unhandled_payer_is_no_policy() -> None:
    """Aetna primary (order 1), MGB secondary (order 2): the primary payer decides prior authorization, and it has no
    policy here - no policy, not the secondary's 031."""
    aetna = org("payer-aetna", "Aetna", (PAYER_ID, "AETNA"))
    covs = [
        coverage(MGB, "aetna-cov", [{"reference": "Organization/payer-aetna"}], type_=sopt("512"), order=1),
        mgb(cid="mgb-cov", type_=sopt("512"), order=2),
    ]
    decision = only(decide(build(MGB, coverages=covs, add=[aetna])))
    assert decision.outcome is Outcome.NO_POLICY and decision.program == "payer-not-handled"
    assert decision.coverage_ref == "Coverage/aetna-cov"


# --- which payer ------------------------------------------------------------------------------------
def test_unknown_payer_is_payer_not_handled() -> None:
    aetna = org("payer-aetna", "Aetna", (PAYER_ID, "AETNA"))
    cov = coverage(
        MGB, "aetna-cov", [{"reference": "Organization/payer-aetna"}], type_=sopt("512"), plan="Aetna Choice POS II"
    )
    decision = only(decide(build(MGB, coverages=[cov], add=[aetna])))
    assert decision.outcome is Outcome.NO_POLICY and decision.program == "payer-not-handled"
    assert decision.coverage_ref == "Coverage/aetna-cov"


@pytest.mark.parametrize(
    ("payer", "expected"),
    [
        pytest.param(org("payer-x", identifier=(PAYER_ID, "MGBHP")), "mgbhp-031", id="identifier-only-MGB"),
        pytest.param(org("payer-x", "Claims Dept 7", (PAYER_ID, "UUHP")), "uuhp-mp-054", id="identifier-only-UUHP"),
        pytest.param(org("payer-x", "Mass General Brigham Health Plan"), "mgbhp-031", id="name-only-MGB"),
        pytest.param(org("payer-x", "MASS GENERAL BRIGHAM HEALTH PLAN, INC."), "mgbhp-031", id="name-case-punctuation"),
        pytest.param(org("payer-x", "University of Utah Health Plans"), "uuhp-mp-054", id="name-only-UUHP"),
        pytest.param(org("payer-x", "MGB Health Plan"), "mgbhp-031", id="alias-MGB-Health-Plan"),
        pytest.param(org("payer-x", "AllWays Health Partners"), "mgbhp-031", id="alias-AllWays"),
        pytest.param(org("payer-x", "U of U Health Plans"), "uuhp-mp-054", id="alias-U-of-U-Health-Plans"),
        pytest.param(org("payer-x", "AWHP", alias=["AllWays Health Partners"]), "mgbhp-031", id="Organization.alias"),
    ],
)
def test_payer_matched_by_identifier_name_or_alias(payer: Resource, expected: str) -> None:
    path = MGB if expected == "mgbhp-031" else UUHP
    cov = coverage(path, "cov-x", [{"reference": "Organization/payer-x"}], type_=sopt("512"))
    decision = only(decide(build(path, coverages=[cov], add=[payer])))
    assert decision.policy is not None and decision.policy.id == expected, decision.headline


def test_payer_as_contained_organization() -> None:
    contained = org("payer", "University of Utah Health Plans", (PAYER_ID, "UUHP"))
    cov = coverage(UUHP, "cov-contained", [{"reference": "#payer"}], type_=sopt("512"), contained=[contained])
    decision = only(decide(build(UUHP, coverages=[cov], drop=("Organization/payer-uuhp",))))
    assert decision.policy is not None and decision.policy.id == "uuhp-mp-054"


@pytest.mark.parametrize(
    "payor",
    [
        pytest.param({"display": "Mass General Brigham Health Plan"}, id="display-only"),
        pytest.param({"identifier": {"system": PAYER_ID, "value": "MGBHP"}}, id="logical-identifier"),
        pytest.param(
            {"reference": "Organization/not-in-record", "display": "MGB Health Plan"}, id="unresolved-with-display"
        ),
    ],
)
def test_payer_from_a_logical_reference(payor: dict[str, Any]) -> None:
    cov = coverage(MGB, "cov-logical", [payor], type_=sopt("512"))
    decision = only(decide(build(MGB, coverages=[cov], drop=("Organization/payer-mgbhp",))))
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"


def test_self_pay_is_no_policy() -> None:
    cov = coverage(
        UUHP, "cov-self", [{"reference": "Patient/uu-base"}], type_=cc("https://nahdo.org/sopt", "81", "Self-pay")
    )
    decision = only(decide(build(UUHP, coverages=[cov])))
    assert decision.outcome is Outcome.NO_POLICY and decision.policy is None


# --- esketamine ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "cov", "order", "program"),
    [
        pytest.param(MGB, None, spravato("mgb-base"), "Spravato pharmacy policy", id="MGB-commercial-RxNorm"),
        pytest.param(MGB, None, g2082("mgb-base"), "Spravato pharmacy policy", id="MGB-commercial-G2082"),
        pytest.param(MGB, mgb(plan="MGB ACO"), spravato("mgb-base"), "Antidepressants pharmacy policy", id="MGB-ACO"),
        pytest.param(UUHP, None, spravato("uu-base"), "U of U Health Plans pharmacy policy", id="UUHP-commercial"),
        pytest.param(UUHP, None, g2082("uu-base"), "U of U Health Plans pharmacy policy", id="UUHP-G2082"),
    ],
)
def test_esketamine_points_to_the_pharmacy_policy(
    path: Path, cov: Resource | None, order: Resource, program: str
) -> None:
    record = build(path, coverages=[cov] if cov else None, orders=[order])
    decision = only(decide(record))
    assert decision.outcome is Outcome.NOT_APPLICABLE
    assert program in (decision.program or ""), decision.program
    assert decision.policy is None and decision.criteria == ()  # never a 031 / MP-054 evaluation
    assert decision.order_refs == (f"{order['resourceType']}/{order['id']}",)


@pytest.mark.parametrize(
    ("path", "cov", "program"),
    [
        pytest.param(MGB, mgb(type_=sopt("111", "Medicare HMO")), "CMS guidance", id="MGB-Medicare-Advantage"),
        pytest.param(MGB, mgb(type_=sopt("142", "FIDE-SNP"), plan="One Care"), "CMS guidance", id="MGB-One-Care"),
        pytest.param(MGB, mgb(plan="Senior Care Options"), "CMS guidance", id="MGB-SCO"),
        pytest.param(UUHP, uuhp(plan="Healthy U Medicaid"), "pharmacy policy", id="Healthy-U"),
    ],
)
def test_esketamine_in_plan_variations_is_not_applicable_and_never_evaluated(
    path: Path, cov: Resource, program: str
) -> None:
    """The plan variations speak of ketamine; esketamine goes to a pointer and is never evaluated under a
    fallback policy. MGB's CMS-governed plans (Medicare Advantage, One Care, SCO) point to CMS guidance, not to
    the commercial Spravato policy; U of U has one pharmacy pointer for all plans."""
    patient = base(path)["patient_id"]
    decision = only(decide(build(path, coverages=[cov], orders=[spravato(patient)])))
    assert decision.outcome is Outcome.NOT_APPLICABLE
    assert decision.policy is None and decision.criteria == ()
    assert program in (decision.program or ""), decision.program
    assert "not governed by" in decision.headline


def test_esketamine_beside_ketamine_is_never_evaluated_under_031() -> None:
    decisions = decide(build(MGB, add_orders=[spravato("mgb-base")]))
    assert len(decisions) == 2
    by_ref = {d.order_refs: d for d in decisions}
    assert by_ref[("MedicationRequest/mgb-base-spravato",)].outcome is Outcome.NOT_APPLICABLE
    assert by_ref[("MedicationRequest/mgb-base-spravato",)].policy is None
    assert by_ref[("MedicationRequest/mgb-base-ketamine",)].policy.id == "mgbhp-031"  # type: ignore[union-attr]


# --- order groups -----------------------------------------------------------------------------------
def test_infusion_and_ketamine_are_one_decision() -> None:
    decision = only(decide(build(MGB, add_orders=[INFUSION_96365])))
    assert set(decision.order_refs) == {"MedicationRequest/mgb-base-ketamine", "ServiceRequest/mgb-infusion"}
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"


# --- site configuration ------------------------------------------------------------------------------
def _naic_record(engine: Mappings) -> PatientRecord:
    payer = org("payer-naic", "Claims Processing Center", (NAIC, "10982"))
    cov = coverage(MGB, "cov-naic", [{"reference": "Organization/payer-naic"}], type_=sopt("512"))
    return build(MGB, coverages=[cov], add=[payer], drop=("Organization/payer-mgbhp",), engine=engine)


def test_site_payer_identifier_routes_the_coverage() -> None:
    shipped = load_engine()
    assert only(decide(_naic_record(shipped), shipped)).program == "payer-not-handled"
    site = Mappings.load(
        SiteConfig.from_mapping({"payers": {"mgbhp": {"identifiers": [{"system": NAIC, "value": "10982"}]}}})
    )
    decision = only(decide(_naic_record(site), site))
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"
    assert site.version != shipped.version  # the site addition is part of the mapping-set version


def test_site_payer_name_routes_the_coverage() -> None:
    site = Mappings.load(SiteConfig.from_mapping({"payers": {"mgbhp": {"names": ["Claims Processing Center"]}}}))
    decision = only(decide(_naic_record(site), site))
    assert decision.policy is not None and decision.policy.id == "mgbhp-031"


def test_site_payer_for_an_unknown_payer_id_is_refused() -> None:
    with pytest.raises(MappingError, match="unknown payer"):
        Mappings.load(SiteConfig.from_mapping({"payers": {"aetna": {"names": ["Aetna"]}}}))


def test_no_policy_card_false_gives_no_decision() -> None:
    site = Mappings.load(SiteConfig.from_mapping({"no_policy_card": False}))
    assert decide(build(UUHP, coverages=[], engine=site), site) == []
    aetna = org("payer-aetna", "Aetna", (PAYER_ID, "AETNA"))
    cov = coverage(UUHP, "aetna-cov", [{"reference": "Organization/payer-aetna"}], type_=sopt("512"))
    assert decide(build(UUHP, coverages=[cov], add=[aetna], engine=site), site) == []
    # a handled payer still gets its decision
    assert only(decide(build(UUHP, engine=site), site)).policy.id == "uuhp-mp-054"  # type: ignore[union-attr]
