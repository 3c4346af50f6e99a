"""conformance_problems(crd_version="2.2") and discovery_problems detect each problem they claim to: broken copies
of a conformant CRD 2.2 response (every invariant crd-ci-q1..q9, the 2.2 value sets, removed elements, detail,
card types, hook-13/16) and of the service's discovery document."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from cards import CONFIGURATION_OPTIONS, build_response, conformance_problems, discovery_problems
from cards.coverage import COVERAGE_INFORMATION_URL
from fhir_mappings.model import Decision
from tests.cards import fixtures as fx

UNREAD = "checked 0 MedicationDispense; not fully available: MedicationDispense"


def _decisions() -> list[Decision]:
    trials_unread = replace(fx.TRIALS_UNKNOWN, explanation=UNREAD, unavailable=("MedicationDispense",))
    technical = replace(
        fx.documentation_needed(),
        order_refs=("MedicationRequest/mr-2",),
        criteria=(fx.AGE_MET, fx.SEVERITY_UNKNOWN, trials_unread),
    )
    plan_unknown = fx.no_policy(
        order_refs=("MedicationRequest/mr-3",),
        program="plan-not-recognised",
        payer="Mass General Brigham Health Plan",
        coverage_ref=fx.COVERAGE,
        headline="The Mass General Brigham Health Plan plan type could not be recognised.",
    )
    blocked = fx.blocked(order_refs=("MedicationRequest/mr-4",))
    return [fx.likely_authorized(), technical, plan_unknown, blocked]


DECISIONS = _decisions()
ORDERS = list({f"{o['resourceType']}/{o['id']}": o for d in DECISIONS for o in fx.orders_for(d)}.values())
ARGS: dict[str, Any] = dict(hook_instance=fx.HOOK, patient_id=fx.PATIENT, user_id=fx.USER, today=fx.TODAY)
GOOD = build_response(DECISIONS, ORDERS, crd_version="2.2", **ARGS)
GOOD_20 = build_response(DECISIONS, ORDERS, crd_version="2.0", **ARGS)
LA, DN, NP, BL = 0, 2, 3, 4  # system action indexes (likely-authorized has two orders)


def test_the_base_response_is_conformant_and_uses_what_22_adds() -> None:
    assert conformance_problems(GOOD, ORDERS, crd_version="2.2") == []
    assert conformance_problems(GOOD, crd_version="2.2") == []
    assert conformance_problems(GOOD_20, ORDERS) == []
    assert len(GOOD["systemActions"]) == 5 and len(GOOD_20["systemActions"]) == 4  # 2.2: + plan not recognised
    urls = [p["url"] for p in parts(GOOD, DN)]
    assert urls.count("doc-needed") == 2 and urls.count("reason") == 2 and "expiry-date" in urls and "detail" in urls


def parts(response: dict[str, Any], action: int) -> list[dict[str, Any]]:
    [extension] = [
        e for e in response["systemActions"][action]["resource"]["extension"] if e["url"] == COVERAGE_INFORMATION_URL
    ]
    return extension["extension"]


def drop(url: str, action: int) -> Callable[[dict[str, Any]], None]:
    def mutate(response: dict[str, Any]) -> None:
        parts(response, action)[:] = [p for p in parts(response, action) if p["url"] != url]

    return mutate


def add(action: int, **part: Any) -> Callable[[dict[str, Any]], None]:
    return lambda response: parts(response, action).append(dict(part))


def set_code(url: str, code: str, action: int) -> Callable[[dict[str, Any]], None]:
    def mutate(response: dict[str, Any]) -> None:
        for part in parts(response, action):
            if part["url"] == url:
                part["valueCode"] = code

    return mutate


def first(url: str, action: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda response: next(p for p in parts(response, action) if p["url"] == url)


def technical_reason(response: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in parts(response, DN) if p["url"] == "reason" and "coding" in p["valueCodeableConcept"])[
        "valueCodeableConcept"
    ]


def detail_parts(response: dict[str, Any]) -> list[dict[str, Any]]:
    return first("detail", LA)(response)["extension"]


Mutation = Callable[[dict[str, Any]], Any]

CASES: list[tuple[str, Mutation, str]] = [
    # --- value sets, cardinality, value types (CoverageInformation.fsh / CoverageInformationValuesets.fsh, 2.2.1)
    ("covered code unknown", set_code("covered", "maybe", LA), "code 'maybe' not in the CRD 2.2 value set"),
    ("pa-needed code unknown", set_code("pa-needed", "required", LA), "code 'required' not in the CRD 2.2"),
    ("doc-needed both removed", set_code("doc-needed", "both", DN), "code 'both' was removed in CRD 2.2"),
    ("info-needed code unknown", set_code("info-needed", "payer", NP), "code 'payer' not in the CRD 2.2 value set"),
    (
        "response removed",
        add(DN, url="response", valueReference={"reference": "QuestionnaireResponse/1"}),
        "removed from coverage-information in CRD 2.1",
    ),
    ("unknown sub-extension", add(LA, url="decision", valueString="x"), "unknown coverage-information sub-extension"),
    (
        "contact as ContactPoint",
        add(LA, url="contact", valueContactPoint={"system": "phone", "value": "555"}),
        "contact: needs exactly one valueContactDetail",
    ),
    ("coverage missing", drop("coverage", LA), "coverage: required (min 1)"),
    ("date missing", drop("date", LA), "date: required (min 1)"),
    ("two expiry dates", add(LA, url="expiry-date", valueDate="2026-02-01"), "expiry-date: 2 repetitions (max 1)"),
    ("expiry not a date", lambda r: first("expiry-date", LA)(r).update(valueDate="soon"), "valueDate must be a FHIR"),
    (
        "expiry before date",
        lambda r: first("expiry-date", LA)(r).update(valueDate="2025-12-31"),
        "expiry-date: 2025-12-31 is before the assertion date 2026-01-15",
    ),
    ("two pa-needed", add(LA, url="pa-needed", valueCode="no-auth"), "pa-needed: 2 repetitions (max 1)"),
    # --- invariants, as their FHIRPath expressions state them
    ("q1", add(LA, url="questionnaire", valueCanonical="http://x.org/Questionnaire/1"), "crd-ci-q1"),
    ("q2", add(BL, url="pa-needed", valueCode="auth-needed"), "crd-ci-q2: no pa-needed when covered is not-covered"),
    ("q3 conditional without info-needed", drop("info-needed", NP), "crd-ci-q3: info-needed required"),
    (
        "q3 info-needed without conditional",
        add(LA, url="info-needed", valueCode="performer"),
        "crd-ci-q3: info-needed only",
    ),
    ("q4", set_code("pa-needed", "no-auth", DN), "crd-ci-q4: no doc-purpose withpa"),
    ("q5 id without satisfied", add(LA, url="satisfied-pa-id", valueString="PA-1"), "crd-ci-q5"),
    ("q5 satisfied without id", set_code("pa-needed", "satisfied", LA), "crd-ci-q5"),
    ("q6", drop("reason", NP), "crd-ci-q6: info-needed OTH needs a reason"),
    (
        "q7",
        lambda r: first("reason", LA)(r).update(
            valueCodeableConcept={"coding": [{"system": "http://x.org/reasons", "code": "nope"}]}
        ),
        "crd-ci-q7: a coding outside coverageAssertionReasons needs text",
    ),
    ("q8", drop("reason", DN), "crd-ci-q8: doc-purpose needs a reason"),
    ("q9", drop("reason", DN), "crd-ci-q9: indeterminate needs a reason"),
    ("resp-43 technical without text", lambda r: technical_reason(r).pop("text"), "resp-43: a technical reason gives"),
    (
        "resp-43 indeterminate without technical",
        lambda r: technical_reason(r).pop("coding"),
        "resp-43: indeterminate needs a reason coded technical",
    ),
    ("reason coding without system", lambda r: technical_reason(r)["coding"][0].pop("system"), "needs system and code"),
    # --- detail
    ("detail without category", lambda r: detail_parts(r).pop(0), "detail.category: 0 repetitions"),
    ("detail category unknown", lambda r: detail_parts(r)[0].update(valueCode="cat-x"), "detail.category: valueCode"),
    (
        "policy link as string",
        lambda r: detail_parts(r)[2].update({"valueString": "see policy"}) or detail_parts(r)[2].pop("valueUrl"),
        "a policy-link's value is an absolute http(s) valueUrl",
    ),
    (
        "detail value two types",
        lambda r: detail_parts(r)[2].update(valueBoolean=True),
        "detail.value: needs exactly one",
    ),
    ("detail unknown part", lambda r: detail_parts(r).append({"url": "why", "valueString": "x"}), "unknown detail sub"),
    ("detail with value", lambda r: first("detail", LA)(r).update(valueString="x"), "detail: a complex extension"),
    # --- cards and orders
    (
        "20 card type in 22",
        lambda r: r["cards"][0]["source"]["topic"].update(system="http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"),
        "CRD 2.2 card types are in http://terminology.hl7.org/CodeSystem/cdshooks-card-type",
    ),
    (
        "hook-16 plan not recognised without coverage information",
        lambda r: r["systemActions"].pop(NP),
        "MedicationRequest/mr-3 has a no-policy determination but no coverage-information action",
    ),
    (
        "second assertion id for one coverage",
        lambda r: first("coverage-assertion-id", DN)(r).update(valueString="other"),
        "2 coverage-assertion-ids for Coverage/cov-mgb",
    ),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_22_problem_is_detected(name: str, mutate: Mutation, expected: str) -> None:
    broken = copy.deepcopy(GOOD)
    mutate(broken)
    problems = conformance_problems(broken, ORDERS, crd_version="2.2")
    assert any(expected in p for p in problems), problems


def test_22_allows_what_22_defines() -> None:
    ok = copy.deepcopy(GOOD)
    parts(ok, LA).append({"url": "contact", "valueContactDetail": {"name": "Prior authorization desk"}})
    parts(ok, DN).append({"url": "doc-needed", "valueCode": "patient"})
    assert conformance_problems(ok, ORDERS, crd_version="2.2") == []


def test_a_22_response_is_not_a_20_response_and_back() -> None:
    as_20 = conformance_problems(GOOD, ORDERS)
    for expected in (
        "code 'indeterminate' exists only in CRD 2.2",
        "expiry-date: 2.2-only sub-extension",
        "detail: its shape differs between CRD 2.0.1 and 2.2",
        "CRD 2.0 card types are in http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp",
    ):
        assert any(expected in p for p in as_20), (expected, as_20)
    as_22 = conformance_problems(GOOD_20, ORDERS, crd_version="2.2")
    assert any("CRD 2.2 card types are in" in p for p in as_22), as_22


# ---------------------------------------------------------------------------------------------- discovery

DISCOVERY: dict[str, Any] = {
    "services": [
        {
            "hook": "order-sign",
            "id": "ketamine-prior-auth",
            "description": "d",
            "extension": {
                "davinci-crd.version": ["2.0", "2.2"],
                "davinci-crd.configuration-options": copy.deepcopy(CONFIGURATION_OPTIONS),
            },
        }
    ]
}


def service_ext(document: dict[str, Any]) -> dict[str, Any]:
    return document["services"][0]["extension"]


def option(document: dict[str, Any], n: int = 0) -> dict[str, Any]:
    return service_ext(document)["davinci-crd.configuration-options"][n]


DISCOVERY_CASES: list[tuple[str, Mutation, str]] = [
    ("no version", lambda d: service_ext(d).pop("davinci-crd.version"), "SHALL list at least one CRD version"),
    ("empty versions", lambda d: service_ext(d).update({"davinci-crd.version": []}), "at least one CRD version"),
    ("patch version", lambda d: service_ext(d)["davinci-crd.version"].append("2.2.1"), "'2.2.1' is not a CRD"),
    ("version number", lambda d: service_ext(d)["davinci-crd.version"].append(2.2), "2.2 is not a CRD major.minor"),
    ("repeated version", lambda d: service_ext(d)["davinci-crd.version"].append("2.2"), "versions repeat"),
    ("no extension", lambda d: d["services"][0].pop("extension"), "required for davinci-crd.version"),
    ("option without default", lambda d: option(d).pop("default"), "default: required (dev-4)"),
    ("boolean default wrong", lambda d: option(d).update(default="true"), "default: must be a JSON boolean"),
    ("integer default bool", lambda d: option(d, 3).update(default=True), "default: must be a JSON integer"),
    ("option type string", lambda d: option(d).update(type="string"), "type: must be boolean or integer"),
    ("option without name", lambda d: option(d).pop("name"), "name: required string missing"),
    ("duplicate code", lambda d: option(d, 1).update(code=option(d)["code"]), "is not unique within the service"),
    ("no services", lambda d: d.pop("services"), "services: required array missing"),
    ("service id missing", lambda d: d["services"][0].pop("id"), "services[0].id: required string missing"),
]


def test_the_discovery_extensions_are_conformant() -> None:
    assert discovery_problems(DISCOVERY) == []


@pytest.mark.parametrize(("name", "mutate", "expected"), DISCOVERY_CASES, ids=[c[0] for c in DISCOVERY_CASES])
def test_each_discovery_problem_is_detected(name: str, mutate: Mutation, expected: str) -> None:
    broken = copy.deepcopy(DISCOVERY)
    mutate(broken)
    problems = discovery_problems(broken)
    assert any(expected in p for p in problems), problems
