"""The EHR simulator against a stub CDS service and the real FHIR server: request shape, prefetch, JWT, checks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import date
from typing import Any

import jwt
import pytest

from sandbox.ehr import (
    EhrError,
    EhrSimulator,
    FireResult,
    ObservedDecision,
    check,
    extract_decisions,
    normalize_service_base,
    render_cards,
    resolve_template,
)
from sandbox.fhir_server import FhirServerProcess
from sandbox.loader import load_into
from sandbox.scenarios import PATIENTS_DIR, Scenario, load_scenario
from sandbox.signing import SandboxKey, generate_key
from tests.sandbox.helpers import EXAMPLE_IDS, SERVICE_ID, StubCdsService, decision_card, example_responder

TODAY = date(2026, 11, 23)
TEMPLATES = {
    "patient": "Patient/{{context.patientId}}",
    "coverage": "Coverage?patient={{context.patientId}}&status=active&_include=Coverage:payor",
    "encounter": "Encounter/{{ context.encounterId }}",
    "user_role": "PractitionerRole/{{userPractitionerRoleId}}",
    "user_roles_of_practitioner": "PractitionerRole?practitioner={{userPractitionerId}}",  # user is a role: skipped
    "related_person": "RelatedPerson/{{context.patientId}}",  # read that 404s: null
    "broken_query": "NotAResourceType?patient={{context.patientId}}",  # failed query: omitted
    "crd_draft_token": "MedicationRequest?_id={{context.draftOrders.MedicationRequest.id}}",  # not CDS Hooks 2.0
    "first_page_only": "Patient?_count=1",
}


def scenario(scenario_id: str = "example-ketamine-minimal") -> Scenario:
    return load_scenario(PATIENTS_DIR / f"{scenario_id}.json")


@pytest.fixture(scope="module")
def loaded_fhir(fhir_server: FhirServerProcess) -> FhirServerProcess:
    load_into(
        fhir_server.base_url,
        [scenario(scenario_id) for scenario_id in EXAMPLE_IDS],
        token=fhir_server.token,
        today=TODAY,
    )
    return fhir_server


@pytest.fixture(scope="module")
def key() -> SandboxKey:
    return generate_key("ES384")


@pytest.fixture
def stub() -> Iterator[StubCdsService]:
    service = StubCdsService(TEMPLATES, example_responder()).start()
    yield service
    service.stop()


@pytest.fixture
def simulator(stub: StubCdsService, loaded_fhir: FhirServerProcess, key: SandboxKey) -> Iterator[EhrSimulator]:
    with EhrSimulator(
        stub.base_url, loaded_fhir.base_url, fhir_token=loaded_fhir.token, key=key, issuer="https://ehr.test"
    ) as ehr:
        yield ehr


# ---------------------------------------------------------------------- with the real FHIR server


@pytest.mark.fhir_server
def test_prefetch_request_has_the_exact_ehr_shape(
    simulator: EhrSimulator, stub: StubCdsService, loaded_fhir: FhirServerProcess
) -> None:
    body = simulator.build_request(scenario(), mode="prefetch", today=TODAY)

    assert set(body) == {"hook", "hookInstance", "fhirServer", "fhirAuthorization", "context", "prefetch"}
    assert body["hook"] == "order-sign"
    assert uuid.UUID(body["hookInstance"]).version == 4
    assert body["fhirServer"] == loaded_fhir.base_url
    assert body["fhirAuthorization"] == {
        "access_token": loaded_fhir.token,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/*.read user/*.read",
        "subject": "ketamine-cds",
        "patient": "ex-km-patient",
    }
    context = body["context"]
    assert (context["userId"], context["patientId"], context["encounterId"]) == (
        "PractitionerRole/ex-psych-role",
        "ex-km-patient",
        "ex-km-visit",
    )
    draft_orders = context["draftOrders"]
    assert draft_orders["resourceType"] == "Bundle" and draft_orders["type"] == "collection"
    order = draft_orders["entry"][0]["resource"]
    assert order["id"] == "ex-km-ketamine" and order["authoredOn"] == TODAY.isoformat()

    prefetch = body["prefetch"]
    assert set(prefetch) == {"patient", "coverage", "encounter", "user_role", "related_person", "first_page_only"}
    assert prefetch["patient"]["id"] == "ex-km-patient"
    assert prefetch["patient"]["birthDate"] != "1985-09-02", "FHIR data was loaded shifted"
    assert prefetch["coverage"]["type"] == "searchset"
    assert {entry["resource"]["resourceType"] for entry in prefetch["coverage"]["entry"]} == {
        "Coverage",
        "Organization",
    }
    assert prefetch["encounter"]["id"] == "ex-km-visit"
    assert prefetch["user_role"]["id"] == "ex-psych-role"
    assert prefetch["related_person"] is None  # read answered 404
    first_page = prefetch["first_page_only"]
    assert len(first_page["entry"]) == 1
    assert any(link["relation"] == "next" for link in first_page["link"]), "pagination is left to the service"


@pytest.mark.fhir_server
def test_fire_signs_a_jwt_for_the_exact_hook_url(
    simulator: EhrSimulator, stub: StubCdsService, key: SandboxKey
) -> None:
    result = simulator.fire(scenario(), "prefetch", today=TODAY)

    assert result.status == 200 and result.error is None
    assert result.latency_ms > 0
    assert result.decisions == [
        ObservedDecision(
            "MedicationRequest/ex-km-ketamine",
            "mgbhp-031",
            "criteria-not-met",
            "initial",
            "mgbhp-031: criteria-not-met",
        )
    ]
    assert check(scenario(), result) == []

    discovery_call, hook_call = stub.calls
    for call, audience in ((discovery_call, f"{stub.base_url}/cds-services"), (hook_call, stub.hook_url)):
        token = call["headers"]["Authorization"].removeprefix("Bearer ")
        header = jwt.get_unverified_header(token)
        assert (header["alg"], header["typ"], header["kid"]) == ("ES384", "JWT", key.kid)
        claims = jwt.decode(token, key.private_key.public_key(), algorithms=["ES384"], audience=audience)
        assert claims["iss"] == "https://ehr.test"
        assert claims["exp"] > claims["iat"] and claims["jti"]
    assert hook_call["headers"]["Content-Type"] == "application/json"
    assert hook_call["json"]["prefetch"]["patient"]["id"] == "ex-km-patient"

    again = simulator.fire(scenario(), "prefetch", today=TODAY)
    tokens = [call["headers"]["Authorization"] for call in stub.hook_calls()]
    assert again.status == 200 and tokens[0] != tokens[1], "a fresh JWT (new jti) per call"


@pytest.mark.fhir_server
def test_fallback_mode_sends_no_prefetch_key(simulator: EhrSimulator, stub: StubCdsService) -> None:
    result = simulator.fire(scenario("example-non-ketamine"), "fallback", today=TODAY)
    sent = stub.hook_calls()[-1]["json"]
    assert "prefetch" not in sent
    assert "encounterId" not in sent["context"]  # null in the scenario: not sent at all
    assert result.prefetch_keys == ()
    assert check(scenario("example-non-ketamine"), result) == []


@pytest.mark.fhir_server
def test_without_fhir_token_no_fhir_authorization(
    stub: StubCdsService, loaded_fhir: FhirServerProcess, key: SandboxKey
) -> None:
    with EhrSimulator(stub.base_url + "/cds-services/", loaded_fhir.base_url, fhir_token=None, key=key) as ehr:
        body = ehr.build_request(scenario(), mode="prefetch", today=TODAY)
    assert "fhirAuthorization" not in body
    assert body["fhirServer"] == loaded_fhir.base_url
    # this FHIR server needs a token: every query answers 401, which is a failure (omitted), not a 404 (null)
    assert body["prefetch"] == {}


@pytest.mark.fhir_server
def test_discovery_without_our_service_is_an_error(loaded_fhir: FhirServerProcess, key: SandboxKey) -> None:
    service = StubCdsService(TEMPLATES).start()
    try:
        ehr = EhrSimulator(service.base_url, loaded_fhir.base_url, fhir_token=None, key=key, service_id="other")
        with ehr, pytest.raises(EhrError, match="does not list service 'other'"):
            ehr.discover()
    finally:
        service.stop()


def test_unreachable_service_is_reported_not_raised(key: SandboxKey) -> None:
    ehr = EhrSimulator("http://127.0.0.1:9", "http://127.0.0.1:9/fhir", fhir_token=None, key=key)
    ehr._discovery = {"services": [{"id": SERVICE_ID, "prefetch": {}}]}  # skip discovery: only the POST fails
    result = ehr.fire(scenario(), "fallback", today=TODAY)
    assert result.status == 0 and result.error
    assert check(scenario(), result)[0].startswith("HTTP 0:")
    ehr.close()


# ---------------------------------------------------------------------- templates


def test_resolve_template_tokens() -> None:
    context = {"patientId": "p1", "userId": "Practitioner/dr1", "encounterId": "e1", "draftOrders": {}}
    assert resolve_template("Patient/{{context.patientId}}", context) == "Patient/p1"
    assert resolve_template("Encounter?_id={{ context.encounterId }}&x={{context.userId}}", context) == (
        "Encounter?_id=e1&x=Practitioner/dr1"
    )
    assert resolve_template("PractitionerRole?practitioner={{userPractitionerId}}", context) == (
        "PractitionerRole?practitioner=dr1"
    )
    assert resolve_template("PractitionerRole/{{userPractitionerRoleId}}", context) is None
    assert resolve_template("X?_id={{context.draftOrders.MedicationRequest.id}}", context) is None
    assert resolve_template("Observation?date=ge{{today() - 30 days}}", context) is None
    assert (
        resolve_template("Encounter/{{context.encounterId}}", {"patientId": "p1", "userId": "Practitioner/a"}) is None
    )
    assert resolve_template("Patient?_count=5", context) == "Patient?_count=5"


def test_normalize_service_base() -> None:
    for url in ("http://h:1", "http://h:1/", "http://h:1/cds-services", "http://h:1/cds-services/"):
        assert normalize_service_base(url) == "http://h:1"


# ---------------------------------------------------------------------- check()


def _result(cards: list[dict[str, Any]], status: int = 200, actions: list[dict[str, Any]] | None = None) -> FireResult:
    response: dict[str, Any] = {"cards": cards, "systemActions": actions or []}
    example = scenario()
    return FireResult(
        scenario_id=example.id,
        mode="prefetch",
        status=status,
        response=response,
        latency_ms=12.0,
        decisions=extract_decisions(response, example.order_refs) if status == 200 else [],
    )


ORDER = "MedicationRequest/ex-km-ketamine"


def test_check_passes_on_exact_match_and_ignores_plain_info_cards() -> None:
    info_card = {"summary": "Esketamine has its own pharmacy policy", "indicator": "info", "source": {"label": "x"}}
    result = _result([decision_card(ORDER, "mgbhp-031", "criteria-not-met", "initial"), info_card])
    assert check(scenario(), result) == []


def test_check_reports_wrong_outcome_phase_and_policy() -> None:
    assert check(scenario(), _result([decision_card(ORDER, "mgbhp-031", "likely-authorized", "initial")])) == [
        f"{ORDER}: expected mgbhp-031 criteria-not-met initial, got mgbhp-031 likely-authorized initial"
    ]
    assert check(scenario(), _result([decision_card(ORDER, "mgbhp-031", "criteria-not-met", "reauthorization")])) == [
        f"{ORDER}: expected mgbhp-031 criteria-not-met initial, got mgbhp-031 criteria-not-met reauthorization"
    ]
    assert check(scenario(), _result([decision_card(ORDER, "uuhp-mp-054", "not-covered")])) == [
        f"{ORDER}: expected mgbhp-031 criteria-not-met initial, got uuhp-mp-054 not-covered"
    ]


def test_check_reports_missing_and_unexpected_decisions() -> None:
    assert check(scenario(), _result([])) == [
        f"{ORDER}: expected mgbhp-031 criteria-not-met initial, got no decision card"
    ]
    extra = _result(
        [
            decision_card(ORDER, "mgbhp-031", "criteria-not-met", "initial"),
            decision_card(ORDER, "uuhp-mp-054", "not-covered"),
            decision_card("MedicationRequest/elsewhere", "mgbhp-031", "blocked"),
        ]
    )
    assert check(scenario(), extra) == [
        f"unexpected decision for {ORDER}: uuhp-mp-054 not-covered",
        "decision for MedicationRequest/elsewhere, which is not a draft order: mgbhp-031 blocked",
    ]


def test_check_http_errors_and_no_cards_expectation() -> None:
    failed = _result([], status=500)
    failed.response = {"resourceType": "OperationOutcome", "issue": [{"diagnostics": "boom"}]}
    assert check(scenario(), failed) == ["HTTP 500: boom"]

    no_cards = scenario("example-non-ketamine")
    assert check(no_cards, _result([])) == []
    card = decision_card("MedicationRequest/ex-nk-sertraline", None, "no-policy")
    action = {"type": "update", "description": "x", "resource": {"resourceType": "MedicationRequest", "id": "a"}}
    assert check(no_cards, _result([card], actions=[action])) == [
        "expected no cards, got 1: None: no-policy",
        "expected no system actions, got 1",
    ]


def test_decision_without_orders_applies_to_every_draft_order() -> None:
    card = decision_card(ORDER, None, "no-policy")
    card["extension"]["ketamine-cds.decision"]["orders"] = []
    decisions = extract_decisions({"cards": [card]}, [ORDER, "ServiceRequest/s1"])
    assert [(decision.order, decision.outcome) for decision in decisions] == [
        (ORDER, "no-policy"),
        ("ServiceRequest/s1", "no-policy"),
    ]


def test_background_scenario_without_expectations_always_passes_unless_http_fails() -> None:
    background = replace(scenario(), expected=(), background=True)
    assert check(background, _result([decision_card(ORDER, "mgbhp-031", "blocked")])) == []
    assert check(background, _result([], status=412)) != []


# ---------------------------------------------------------------------- rendering


def test_render_cards_shows_everything_a_clinician_and_developer_need() -> None:
    card = decision_card(ORDER, "mgbhp-031", "criteria-not-met", "initial")
    card.update(
        {
            "indicator": "warning",
            "summary": "IV ketamine: prior authorization needs a PHQ-9 from the last 30 days",
            "source": {"label": "Mass General Brigham Health Plan", "url": "https://example.org/031"},
            "detail": "| criterion | status |\n|---|---|\n| PHQ-9 ≥ 15 | unknown |",
            "links": [{"label": "Policy 031", "url": "https://example.org/031.pdf", "type": "absolute"}],
            "selectionBehavior": "at-most-one",
            "suggestions": [{"label": "Order a PHQ-9", "uuid": "s1", "isRecommended": True}],
            "overrideReasons": [{"code": "x", "system": "y", "display": "Documented elsewhere"}],
        }
    )
    coverage_information = {
        "url": "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information",
        "extension": [
            {"url": "coverage", "valueReference": {"reference": "Coverage/ex-km-coverage"}},
            {"url": "covered", "valueCode": "covered"},
            {"url": "pa-needed", "valueCode": "auth-needed"},
            {"url": "doc-needed", "valueCode": "clinical"},
            {"url": "reason", "valueCodeableConcept": {"text": "PHQ-9 within 30 days not found"}},
        ],
    }
    action = {
        "type": "update",
        "description": "Coverage information for the IV ketamine order",
        "resource": {"resourceType": "MedicationRequest", "id": "ex-km-ketamine", "extension": [coverage_information]},
    }
    text = render_cards({"cards": [card], "systemActions": [action]})

    assert "1. [WARNING] IV ketamine: prior authorization needs a PHQ-9 from the last 30 days" in text
    assert "source: Mass General Brigham Health Plan <https://example.org/031>" in text
    assert f"decision: mgbhp-031 · criteria-not-met · initial · {ORDER}" in text
    assert "       | | PHQ-9 ≥ 15 | unknown |" in text
    assert "link: Policy 031 <https://example.org/031.pdf> (absolute)" in text
    assert "suggestions (at-most-one):" in text and "- Order a PHQ-9 [recommended]" in text
    assert "override reasons: Documented elsewhere" in text
    assert "update MedicationRequest/ex-km-ketamine: Coverage information for the IV ketamine order" in text
    assert 'coverage-information: covered=covered pa-needed=auth-needed doc-needed=clinical reason="PHQ-9' in text


def test_render_cards_empty_and_missing() -> None:
    assert render_cards({"cards": [], "systemActions": []}) == "(no cards)"
    assert render_cards(None) == "(no JSON response)"
