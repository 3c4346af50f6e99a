"""CRD 2.2 coverage-information: indeterminate only for data that could not be read, expiry-date, policy links,
the plan-not-recognised assertion — and CRD 2.0 rendering untouched by any of it."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from cards import build_response, conformance_problems
from cards.coverage import COVERAGE_INFORMATION_URL, unavailable_data
from fhir_mappings.engine import evaluate_policy
from fhir_mappings.model import Decision, Status
from fhir_mappings.policies.test_policy_cases import build_case, engine_for
from fhir_mappings.record import Availability, QueryOutcome
from tests.cards import fixtures as fx

POLICIES = Path(__file__).parents[2] / "fhir_mappings/policies"
TECHNICAL = {"system": "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp", "code": "technical"}
UNREAD = "checked 3 MedicationStatement, 0 MedicationDispense; not fully available: MedicationDispense"
UNREAD_TYPES = ("MedicationDispense",)


def respond(decisions: list[Decision], version: str = "2.2", **kw: Any) -> dict[str, Any]:
    orders = list({f"{o['resourceType']}/{o['id']}": o for d in decisions for o in fx.orders_for(d)}.values())
    args: dict[str, Any] = dict(hook_instance=fx.HOOK, patient_id=fx.PATIENT, user_id=fx.USER, today=fx.TODAY)
    response = build_response(decisions, orders, crd_version=version, **{**args, **kw})
    assert conformance_problems(response, orders, crd_version=version) == []
    return response


def parts(response: dict[str, Any], action: int = 0) -> dict[str, list[Any]]:
    """url -> values of the coverage-information extension of one system action."""
    resource = response["systemActions"][action]["resource"]
    [extension] = [e for e in resource["extension"] if e["url"] == COVERAGE_INFORMATION_URL]
    values: dict[str, list[Any]] = {}
    for part in extension["extension"]:
        value = part if part["url"] == "detail" else next(part[k] for k in part if k.startswith("value"))
        values.setdefault(part["url"], []).append(value)
    return values


def technical(decision_parts: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [r for r in decision_parts.get("reason", []) if any(c["code"] == "technical" for c in r.get("coding", []))]


# --------------------------------------------------------------------------------- same mapping as 2.0


@pytest.mark.parametrize("name", [n for n in fx.all_decisions() if n != "no-policy"])
def test_without_unread_data_the_22_codes_are_the_20_codes(name: str) -> None:
    decision = fx.all_decisions()[name]
    old, new = parts(respond([decision], "2.0")), parts(respond([decision], "2.2"))
    for url in ("coverage", "covered", "pa-needed", "doc-needed", "doc-purpose", "info-needed", "date"):
        assert new.get(url) == old.get(url), url
    assert new["reason"] == old["reason"] and not technical(new)
    assert new["coverage-assertion-id"] == old["coverage-assertion-id"]


def test_20_topic_system_and_22_topic_system() -> None:
    decision = fx.likely_authorized()
    assert respond([decision], "2.0")["cards"][0]["source"]["topic"]["system"] == (
        "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
    )
    topic = respond([decision], "2.2")["cards"][0]["source"]["topic"]
    assert topic == {
        "system": "http://terminology.hl7.org/CodeSystem/cdshooks-card-type",
        "code": "guideline",
        "display": "Guideline",
    }


def test_an_unknown_version_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match=r"2\.0, 2\.2"):
        build_response([], [], hook_instance=fx.HOOK, patient_id="p", user_id=fx.USER, today=fx.TODAY, crd_version="3")
    with pytest.raises(ValueError):
        conformance_problems({"cards": [], "systemActions": []}, crd_version="2.1")


# ---------------------------------------------------------------------------------- unread vs undocumented


def with_unread_trials(decision: Decision, explanation: str = UNREAD) -> Decision:
    criteria = tuple(
        replace(c, explanation=explanation, unavailable=UNREAD_TYPES) if c is fx.TRIALS_UNKNOWN else c
        for c in decision.criteria
    )
    return replace(decision, criteria=criteria)


def test_the_engine_field_tells_unread_from_undocumented() -> None:
    assert unavailable_data(replace(fx.TRIALS_UNKNOWN, unavailable=UNREAD_TYPES)) == ("MedicationDispense",)
    assert unavailable_data(fx.TRIALS_UNKNOWN) == ()  # "2 adequate trials found": simply not documented
    assert unavailable_data(fx.SEVERITY_UNKNOWN) == ()  # "checked 12 Observation (all read)"
    assert unavailable_data(replace(fx.AGE_MET, unavailable=UNREAD_TYPES)) == ()  # only an unknown can be unread
    case_review = replace(fx.TRIALS_UNKNOWN, unavailable=UNREAD_TYPES, case_by_case=True)
    assert unavailable_data(case_review) == ()  # the policy leaves it to review: determined as such


def test_the_engine_sets_unavailable_only_for_unread_types() -> None:
    """The real engine: a criterion unknown because its data was not read names those types; one unknown
    because the record does not document it names none."""
    from fhir_mappings.engine import evaluate_policy
    from fhir_mappings.policies.test_policy_cases import HERE, build_case, engine_for

    for name, expected in (("observations-unavailable", ("Observation",)), ("no-phq9-in-30-days", ())):
        path = HERE / "mgbhp-031.cases" / f"{name}.json"
        _case, record, policy_id = build_case(path)
        engine = engine_for(path.parent)
        group = engine.classifier.classify(record.draft_orders)[0]
        decision = evaluate_policy(engine.policies[policy_id], record, group, coverage_ref=None, version="t")
        assert decision is not None
        severity = next(c for c in decision.criteria if c.id == "initial-3-severity")
        assert severity.status is Status.UNKNOWN and unavailable_data(severity) == expected, name


def test_mixed_unknowns_need_documentation_and_are_also_indeterminate() -> None:
    decision = with_unread_trials(fx.documentation_needed())
    assert any(c.status is Status.UNKNOWN and not unavailable_data(c) for c in decision.criteria)  # severity
    values = parts(respond([decision]))
    assert values["covered"] == ["covered"]  # only a requirement is unread: no exclusion could hold
    assert values["pa-needed"] == ["auth-needed"]
    assert values["doc-needed"] == ["clinical", "indeterminate"]
    assert values["doc-purpose"] == ["withpa"]
    documentation, unread = values["reason"]
    assert "Record a depression rating" in documentation["text"] and "Four adequate trials" not in documentation["text"]
    assert unread["coding"] == [{**TECHNICAL, "display": "Technical issues"}]
    assert "MedicationDispense could not be read" in unread["text"] and "Four adequate trials" in unread["text"]
    assert "documentation requirements not determined" in respond([decision])["systemActions"][0]["description"]
    # the same decision in 2.0: documentation needed, exactly as before
    old = parts(respond([decision], "2.0"))
    assert old["doc-needed"] == ["clinical"] and not technical(old) and "expiry-date" not in old


def test_only_unread_unknowns_leave_documentation_indeterminate() -> None:
    criteria = (fx.AGE_MET, fx.MDD_MET, fx.TRIALS_UNKNOWN, fx.PREGNANCY_ABSENT)
    decision = with_unread_trials(replace(fx.documentation_needed(), criteria=criteria))
    values = parts(respond([decision]))
    assert values["doc-needed"] == ["indeterminate"] and "doc-purpose" not in values
    assert [r["coding"][0]["code"] for r in values["reason"]] == ["technical"]


def test_an_unread_exclusion_leaves_coverage_indeterminate() -> None:
    unread_exclusion = replace(
        fx.PSYCHOSIS_UNKNOWN,
        case_by_case=False,
        explanation="checked 0 Condition; not fully available: Condition",
        unavailable=("Condition",),
    )
    decision = replace(fx.documentation_needed(), criteria=(fx.AGE_MET, fx.MDD_MET, unread_exclusion))
    values = parts(respond([decision]))
    assert values["covered"] == ["indeterminate"] and values["doc-needed"] == ["indeterminate"]
    assert "Condition could not be read" in technical(values)[0]["text"]


@pytest.mark.parametrize("name", ["criteria-not-met", "blocked"])
def test_a_determined_outcome_stays_determined_whatever_could_not_be_read(name: str) -> None:
    decision = fx.all_decisions()[name]
    unread = replace(fx.TRIALS_UNKNOWN, id="initial-9-other", explanation=UNREAD, unavailable=UNREAD_TYPES)
    values = parts(respond([replace(decision, criteria=(*decision.criteria, unread))]))
    assert "indeterminate" not in values["covered"] + values.get("doc-needed", []) and not technical(values)


def test_mp054_unread_data_keeps_its_conditional_prior_authorization() -> None:
    unread = replace(fx.TRIALS_UNKNOWN, explanation=UNREAD, unavailable=UNREAD_TYPES)
    decision = replace(fx.documentation_needed(), policy=fx.UUHP, criteria=(fx.AGE_MET, unread))
    decision = replace(decision, policy=replace(fx.UUHP, prior_authorization="not-stated"))
    values = parts(respond([decision]))
    assert values["covered"] == ["covered"] and values["pa-needed"] == ["conditional"]
    assert values["doc-needed"] == ["indeterminate"] and values["info-needed"] == ["OTH"]
    assert "doc-purpose" not in values


# ---------------------------------------------------------------------------- expiry-date, policy links


@pytest.mark.parametrize(
    ("days", "expiry"), [(28, "2026-02-11"), (365, "2027-01-14"), (1, "2026-01-15"), (None, None), (0, None)]
)
def test_expiry_date_is_the_last_day_of_the_authorization_period(days: int | None, expiry: str | None) -> None:
    values = parts(respond([fx.likely_authorized(authorization_days=days)]))
    assert values.get("expiry-date") == ([expiry] if expiry else None)
    assert values["date"] == [fx.TODAY.isoformat()]


def test_expiry_date_only_where_an_authorization_is_sought() -> None:
    assert "expiry-date" in parts(respond([fx.documentation_needed(authorization_days=28)]))
    for name in ("criteria-not-met", "blocked", "not-covered", "plan-variation", "not-applicable"):
        decision = replace(fx.all_decisions()[name], authorization_days=28)
        assert "expiry-date" not in parts(respond([decision])), name


def test_policy_and_program_links_are_policy_link_details() -> None:
    decision = fx.plan_variation()
    details = parts(respond([decision]))["detail"]
    links = [{e["url"]: e for e in d["extension"]} for d in details]
    urls = [link["value"]["valueUrl"] for link in links]
    assert urls == [fx.CMS_LINK[1], fx.MGB.url]  # governing program first, then the policy (each once)
    for link in links:
        assert link["category"] == {"url": "category", "valueCode": "cat-other"}
        assert link["code"]["valueCodeableConcept"]["coding"] == [
            {
                "system": "http://terminology.hl7.org/CodeSystem/crd-coverage-detail",
                "code": "policy-link",
                "display": "Policy Link",
            },
            {
                "system": "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp",
                "code": "policy-link",
                "display": "Policy Link",
            },
        ]
        assert link["qualification"]["valueString"]
    assert "detail" not in parts(respond([decision], "2.0"))


# ---------------------------------------------------------------------------------------------- no policy


def test_a_handled_payer_with_an_unrecognised_plan_gets_conditional_coverage_information_in_22() -> None:
    decision = fx.no_policy(
        program="plan-not-recognised",
        payer="Mass General Brigham Health Plan",
        headline="The Mass General Brigham Health Plan plan type could not be recognised from Coverage.type.",
    )
    values = parts(respond([decision]))
    assert values["covered"] == ["conditional"] and values["pa-needed"] == ["conditional"]
    assert values["info-needed"] == ["OTH"] and "could not be recognised" in values["reason"][0]["text"]
    assert respond([decision], "2.0")["systemActions"] == []  # 2.0: no determination, no assertion (as before)


def test_other_no_policy_reasons_get_no_coverage_information_and_are_400_in_22() -> None:
    """hook-13: CRD 2.2 answers 400 for them (the service refuses before rendering); a 2.2 response carrying such a
    card is not conformant, a 2.0 one is (the info card, as before)."""
    orders = fx.orders_for(fx.no_policy())
    for reason in ("payer-not-handled", "no-active-coverage", "coverage-ambiguous"):
        for version in ("2.0", "2.2"):
            decision = fx.no_policy(program=reason)
            args: dict[str, Any] = dict(hook_instance=fx.HOOK, patient_id="p", user_id=fx.USER, today=fx.TODAY)
            response = build_response([decision], orders, crd_version=version, **args)
            assert response["systemActions"] == [], (reason, version)
            problems = conformance_problems(response, orders, crd_version=version)
            if version == "2.0":
                assert problems == []
            else:
                assert problems == [f"cards[0]: a no-policy card for {reason}: CRD 2.2 answers HTTP 400 (hook-13)"]


# ------------------------------------------------------------------------ the real engine, data unread


def engine_decision(case: str, availability: dict[str, Availability]) -> tuple[Decision, list[dict[str, Any]]]:
    """A shipped case decided by the real engine with some queries not (fully) read."""
    path = POLICIES / case
    _case, record, policy_id = build_case(path)
    queries = dict(record.queries)
    for rtype, state in availability.items():
        queries[rtype] = QueryOutcome(rtype, (rtype,), state, "fhir-server", "HTTP 503")
    kept = [r for r in record.resources if availability.get(r["resourceType"]) is not Availability.UNAVAILABLE]
    record = dataclasses.replace(record, queries=queries, resources=kept)
    engine = engine_for(path.parent)
    group = engine.classifier.classify(record.draft_orders)[0]
    decision = evaluate_policy(engine.policies[policy_id], record, group, coverage_ref="Coverage/case", version="t")
    assert decision is not None
    return decision, record.draft_orders


def engine_parts(decision: Decision, orders: list[dict[str, Any]]) -> dict[str, list[Any]]:
    args: dict[str, Any] = dict(hook_instance=fx.HOOK, patient_id="p", user_id=fx.USER, today=date(2026, 1, 15))
    response = build_response([decision], orders, crd_version="2.2", **args)
    assert conformance_problems(response, orders, crd_version="2.2") == []
    return parts(response)


UNAVAILABLE, PARTIAL = Availability.UNAVAILABLE, Availability.PARTIAL


@pytest.mark.parametrize(
    ("case", "availability", "covered", "doc_needed", "unread"),
    [
        # the prior-ketamine exclusion reads MedicationAdministration: unread, it could hold
        (
            "mgbhp-031.cases/base.json",
            {"MedicationAdministration": UNAVAILABLE},
            "indeterminate",
            ["indeterminate"],
            "MedicationAdministration",
        ),
        # a page of Observations missing: absence of an exclusion proves nothing
        ("mgbhp-031.cases/base.json", {"Observation": PARTIAL}, "indeterminate", ["indeterminate"], "Observation"),
        # dispenses feed only the adherence of the treatment trials (a requirement)
        (
            "mgbhp-031.cases/base.json",
            {"MedicationDispense": UNAVAILABLE},
            "covered",
            ["indeterminate"],
            "MedicationDispense",
        ),
        # no PHQ-9 in 30 days (undocumented) and MedicationAdministration unread
        (
            "mgbhp-031.cases/no-phq9-in-30-days.json",
            {"MedicationAdministration": UNAVAILABLE},
            "indeterminate",
            ["clinical", "indeterminate"],
            "MedicationAdministration",
        ),
    ],
)
def test_engine_decisions_with_unread_data(
    case: str, availability: dict[str, Availability], covered: str, doc_needed: list[str], unread: str
) -> None:
    decision, orders = engine_decision(case, availability)
    assert decision.outcome.value == "documentation-needed"
    values = engine_parts(decision, orders)
    assert values["covered"] == [covered] and values["doc-needed"] == doc_needed
    assert values["pa-needed"] == ["auth-needed"]
    [reason] = technical(values)
    assert reason["text"].startswith(f"{unread} could not be read")


def test_engine_decision_without_unread_data_is_not_indeterminate() -> None:
    decision, orders = engine_decision("mgbhp-031.cases/no-phq9-in-30-days.json", {})
    values = engine_parts(decision, orders)
    assert values["doc-needed"] == ["clinical"] and not technical(values)


def test_engine_blocked_decision_with_unread_data_stays_not_covered() -> None:
    decision, orders = engine_decision("mgbhp-031.cases/bp-172-95.json", {"MedicationAdministration": UNAVAILABLE})
    assert decision.outcome.value == "blocked"
    values = engine_parts(decision, orders)
    assert values["covered"] == ["not-covered"] and not technical(values) and "pa-needed" not in values
