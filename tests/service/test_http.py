"""The service over real HTTP: discovery, order-sign (validation, triage, prefetch tri-state, FHIR
fallback, 412), JWT, CORS, feedback and the audit trail — as an EHR or the CDS Hooks sandbox sees it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import requests

from cards import conformance_problems
from sandbox.signing import sign_cds_jwt
from tests.harness import ISSUER, SERVICE_PATH, mocked_fhir, order_sign_request, start_service

BASE_CASE = Path(__file__).parents[2] / "fhir_mappings/policies/mgbhp-031.cases/base.json"


@pytest.fixture(scope="module")
def base_patient() -> dict[str, Any]:
    return json.loads(BASE_CASE.read_text())


@pytest.fixture
def service(tmp_path: Path):
    svc = start_service(tmp_path)
    yield svc
    svc.stop()


def _resources(base: dict[str, Any]) -> list[dict[str, Any]]:
    return [copy.deepcopy(e["resource"]) for e in base["bundle"]["entry"]]


def _request(base: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return order_sign_request(
        copy.deepcopy(base["draft_orders"]),
        patient_id=base["patient_id"],
        user_id=base["user_id"],
        encounter_id=base["encounter_id"],
        **kwargs,
    )


NON_KETAMINE_ORDER = {
    "resourceType": "MedicationRequest",
    "id": "amox-1",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/p1"},
    "requester": {"reference": "Practitioner/prac-1"},
    "authoredOn": "2026-01-15",
    "medicationCodeableConcept": {
        "coding": [
            {
                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                "code": "308182",
                "display": "amoxicillin 250 MG Oral Capsule",
            }
        ]
    },
}


# --- discovery -----------------------------------------------------------------------------------------
def test_discovery_without_token(service) -> None:
    r = requests.get(service.base_url + "/cds-services", timeout=10)
    assert r.status_code == 200
    (svc,) = r.json()["services"]
    assert svc["id"] == "ketamine-prior-auth" and svc["hook"] == "order-sign"
    assert svc["title"] and svc["description"]
    for key, template in svc["prefetch"].items():
        tokens = {t.strip() for t in __import__("re").findall(r"{{(.*?)}}", template)}
        assert tokens <= {
            "context.patientId",
            "context.encounterId",
            "context.userId",
            "userPractitionerId",
            "userPractitionerRoleId",
        }, key
    for needed in (
        "patient",
        "coverage",
        "conditions",
        "medication_statements",
        "medication_requests",
        "medication_dispenses",
        "observations",
        "procedures",
        "allergies",
    ):
        assert needed in svc["prefetch"]
    options = svc["extension"]["davinci-crd.configuration-options"]
    assert all({"code", "type", "name", "description", "default"} <= set(o) for o in options)
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_discovery_with_bad_token_is_refused(service) -> None:
    r = requests.get(service.base_url + "/cds-services", headers={"Authorization": "Bearer nonsense"}, timeout=10)
    assert r.status_code == 401
    good = service.token("/cds-services")
    assert (
        requests.get(
            service.base_url + "/cds-services", headers={"Authorization": f"Bearer {good}"}, timeout=10
        ).status_code
        == 200
    )


def test_double_slash_path_from_sandbox_is_served(service) -> None:
    r = requests.get(service.base_url + "//cds-services", timeout=10)
    assert r.status_code == 200


# --- CORS ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/cds-services", SERVICE_PATH, SERVICE_PATH + "/feedback"])
def test_preflight_needs_no_auth_and_allows_private_network(service, path: str) -> None:
    r = requests.options(
        service.base_url + path,
        headers={
            "Origin": "https://sandbox.cds-hooks.org",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
            "Access-Control-Request-Private-Network": "true",
        },
        timeout=10,
    )
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in r.headers["Access-Control-Allow-Methods"]
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    assert r.headers["Access-Control-Allow-Private-Network"] == "true"


def test_cors_headers_on_errors(service) -> None:
    r = service.post_hook(b"{not json", headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert r.status_code == 400
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = service.post_hook({}, token=None, headers={"Origin": "https://sandbox.cds-hooks.org"})
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == "*"


# --- validation ------------------------------------------------------------------------------------------
def test_unparsable_json_is_400_with_operation_outcome(service) -> None:
    r = service.post_hook(b'{"hook": ')
    assert r.status_code == 400
    body = r.json()
    assert body["resourceType"] == "OperationOutcome" and "not valid JSON" in body["issue"][0]["diagnostics"]
    assert "Traceback" not in r.text


def test_non_object_is_400(service) -> None:
    assert service.post_hook([1, 2]).status_code == 400


def test_nonconformant_request_is_422_listing_problems(service) -> None:
    body = order_sign_request([NON_KETAMINE_ORDER], patient_id="p1")
    del body["context"]["userId"]
    body["hookInstance"] = "not-a-uuid"
    r = service.post_hook(body)
    assert r.status_code == 422
    issues = r.json()["issue"]
    text = " ".join(i["diagnostics"] for i in issues)
    assert "userId" in text and "hookInstance" in text
    assert all(i["severity"] == "error" for i in issues)


def test_fhir_authorization_without_fhir_server_is_422(service) -> None:
    body = order_sign_request([NON_KETAMINE_ORDER], patient_id="p1")
    del body["fhirServer"]
    r = service.post_hook(body)
    assert r.status_code == 422 and "fhirServer" in r.text


def test_unknown_keys_are_ignored(service) -> None:
    body = order_sign_request([NON_KETAMINE_ORDER], patient_id="p1")
    body["somethingNew"] = {"x": 1}
    body["context"]["futureField"] = "y"
    assert service.post_hook(body).status_code == 200


def test_sandbox_quirks_need_lenient_mode(tmp_path: Path) -> None:
    order = dict(NON_KETAMINE_ORDER)
    order.pop("intent")
    order.pop("requester")
    body = order_sign_request([order], patient_id="p1", bundle_type=None)
    strict = start_service(tmp_path / "strict")
    lenient = start_service(tmp_path / "lenient", lenient=True)
    try:
        assert strict.post_hook(body).status_code == 422
        r = lenient.post_hook(body)
        assert r.status_code == 200 and r.json() == {"cards": [], "systemActions": []}
    finally:
        strict.stop()
        lenient.stop()


# --- triage ------------------------------------------------------------------------------------------------
def test_non_ketamine_order_gets_empty_answer_without_fhir_access(service) -> None:
    rsps, fhir = mocked_fhir(service, [])
    with rsps:
        r = service.post_hook(order_sign_request([NON_KETAMINE_ORDER], patient_id="p1"))
    assert r.status_code == 200
    assert r.json() == {"cards": [], "systemActions": []}
    assert fhir.calls == []


# --- evaluation through prefetch and FHIR fallback ------------------------------------------------------
def test_ketamine_order_evaluated_from_fhir_server(service, base_patient) -> None:
    rsps, fhir = mocked_fhir(service, _resources(base_patient))
    with rsps:
        r = service.post_hook(_request(base_patient))
    assert r.status_code == 200, r.text
    body = r.json()
    assert conformance_problems(body, base_patient["draft_orders"]) == []
    (card,) = body["cards"]
    decision = card["extension"]["ketamine-cds.decision"]
    assert (
        decision["policy"] == "mgbhp-031"
        and decision["outcome"] == "likely-authorized"
        and decision["phase"] == "initial"
    )
    # the machine-readable extension's shape is a contract: every criterion has id, kind, status and evidence
    assert all({"id", "kind", "status", "evidence"} <= set(c) for c in decision["criteria"])
    assert any(
        c["kind"] == "exclusion" and c["status"] == "not-met" and c["evidence"] == [] for c in decision["criteria"]
    )
    assert len(body["systemActions"]) == 1
    # every fetch carried the EHR's bearer token, and they were made for the missing keys in parallel
    assert fhir.calls and all(h == "Bearer ehr-access-token-123" for h in fhir.auth_headers)


def test_prefetch_tri_state(service, base_patient) -> None:
    resources = _resources(base_patient)

    def bundle(rtype: str) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": r} for r in resources if r["resourceType"] == rtype],
        }

    patient = next(r for r in resources if r["resourceType"] == "Patient")
    prefetch = {
        "patient": patient,
        "coverage": {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [
                {"resource": r}
                for r in resources
                if r["resourceType"] in ("Coverage", "Organization")
                and r.get("id", "").startswith(("mgb-base-cov", "payer-"))
            ],
        },
        "conditions": bundle("Condition"),
        "medication_statements": bundle("MedicationStatement"),
        "medication_requests": None,  # null: no data — must not be fetched
        "medication_dispenses": bundle("MedicationDispense"),
        "observations": {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "timeout"}],
        },  # failed: refetch
        "procedures": bundle("Procedure"),
        "allergies": {"resourceType": "Bundle", "type": "searchset", "entry": []},  # empty: no data
        # absent keys (encounters, care_teams, consents, user_roles, medication_administrations): fetched
    }
    rsps, fhir = mocked_fhir(service, resources)
    with rsps:
        r = service.post_hook(_request(base_patient, prefetch=prefetch))
    assert r.status_code == 200, r.text
    fetched_types = {c.split("/fhir/")[1].split("?")[0].split("/")[0] for c in fhir.calls}
    assert "Observation" in fetched_types and "Encounter" in fetched_types
    assert not fetched_types & {
        "Condition",
        "MedicationStatement",
        "MedicationRequest",
        "AllergyIntolerance",
        "Patient",
        "Coverage",
    }
    decision = r.json()["cards"][0]["extension"]["ketamine-cds.decision"]
    assert decision["outcome"] == "likely-authorized"


def test_unavailable_data_is_unknown_never_absent(service, base_patient) -> None:
    rsps, fhir = mocked_fhir(service, _resources(base_patient), fail_types={"Observation", "MedicationDispense"})
    with rsps:
        r = service.post_hook(_request(base_patient))
    assert r.status_code == 200
    assert any("/Observation?" in c for c in fhir.calls)  # it was asked for, and failed
    decision = r.json()["cards"][0]["extension"]["ketamine-cds.decision"]
    statuses = {c["id"]: c["status"] for c in decision["criteria"]}
    assert decision["outcome"] == "documentation-needed"
    assert statuses["initial-3-severity"] == "unknown"  # PHQ-9 could not be read
    assert statuses["exclusion-10-cardiovascular"] == "unknown"  # blood pressure could not be read


def test_required_data_neither_prefetched_nor_fetchable_is_412(service, base_patient) -> None:
    body = _request(base_patient, fhir_server=None)
    r = service.post_hook(body)
    assert r.status_code == 412
    assert r.json()["resourceType"] == "OperationOutcome"


def test_fhir_server_not_registered_for_issuer_is_refused(service, base_patient) -> None:
    rsps, fhir = mocked_fhir(service, _resources(base_patient), base="https://evil.example/fhir")
    with rsps:
        r = service.post_hook(_request(base_patient, fhir_server="https://evil.example/fhir"))
    assert r.status_code == 412
    assert fhir.calls == []


# --- JWT ---------------------------------------------------------------------------------------------------
def test_hook_requires_valid_jwt(service, base_patient) -> None:
    body = order_sign_request([NON_KETAMINE_ORDER], patient_id="p1")
    assert service.post_hook(body, token=None).status_code == 401
    wrong_aud = service.token("/cds-services/other")
    r = service.post_hook(body, token=wrong_aud)
    assert r.status_code == 401 and r.json()["issue"][0]["diagnostics"] == "authentication failed"
    token = service.token()
    assert service.post_hook(body, token=token).status_code == 200
    assert service.post_hook(body, token=token).status_code == 401  # replayed jti


def test_insecure_mode_accepts_calls_without_token(tmp_path: Path) -> None:
    svc = start_service(tmp_path, insecure=True)
    try:
        assert svc.post_hook(order_sign_request([NON_KETAMINE_ORDER], patient_id="p1"), token=None).status_code == 200
    finally:
        svc.stop()


# --- feedback and audit --------------------------------------------------------------------------------------
def test_feedback_stored_idempotently(service) -> None:
    item = {
        "card": "0d6d3a52-7b8c-4f0f-9a2c-1c2f7f0b5d11",
        "outcome": "overridden",
        "overrideReason": {
            "reason": {
                "code": "clinical-exception",
                "system": "https://ketamine-cds.example.org/CodeSystem/override-reason",
            },
            "userComment": "case review",
        },
        "outcomeTimestamp": "2026-01-15T17:01:02Z",
    }
    url = service.base_url + SERVICE_PATH + "/feedback"
    for _ in range(2):
        token = service.token(SERVICE_PATH + "/feedback")
        r = requests.post(url, json={"feedback": [item]}, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200
    assert len(service.audit.feedback_for(item["card"])) == 1
    assert requests.post(url, json={"feedback": [item]}, timeout=10).status_code == 401
    token = service.token(SERVICE_PATH + "/feedback")
    bad = requests.post(
        url, json={"feedback": [{"card": "x"}]}, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert bad.status_code == 422


def test_audit_trail_records_every_call_without_tokens(service, base_patient) -> None:
    rsps, _ = mocked_fhir(service, _resources(base_patient))
    with rsps:
        evaluated = _request(base_patient)
        assert service.post_hook(evaluated).status_code == 200
    triaged = order_sign_request([NON_KETAMINE_ORDER], patient_id="p1")
    assert service.post_hook(triaged).status_code == 200
    assert service.post_hook(triaged, token=None).status_code == 401
    service.audit.flush()
    rows = service.audit.recent_calls()
    by_instance = {r["hook_instance"]: r for r in rows}
    assert by_instance[evaluated["hookInstance"]]["outcome"] == "evaluated"
    assert by_instance[evaluated["hookInstance"]]["decisions"][0]["outcome"] == "likely-authorized"
    assert by_instance[triaged["hookInstance"]]["outcome"] in ("triaged-out", "refused")
    assert {r["status_code"] for r in rows} >= {200, 401}
    assert all(r["mapping_version"] and r["latency_ms"] is not None for r in rows)
    assert "ehr-access-token-123" not in json.dumps(rows, default=str)


def test_replayed_token_refused_by_another_instance_on_the_same_database(tmp_path: Path) -> None:
    """Two service instances sharing one audit database (two gunicorn workers, or two hosts on PostgreSQL):
    a jti used at one is a replay at the other."""
    from sandbox.signing import generate_key

    key = generate_key("ES384")
    first = start_service(tmp_path, key=key)
    second = start_service(tmp_path, key=key)  # same tmp_path: same trusted issuers and the same SQLite file
    try:
        body = order_sign_request([NON_KETAMINE_ORDER], patient_id="p1")
        used = sign_cds_jwt(key, iss=ISSUER, aud=first.base_url + SERVICE_PATH, jti="shared-jti-1")
        assert first.post_hook(body, token=used).status_code == 200
        replay = sign_cds_jwt(key, iss=ISSUER, aud=second.base_url + SERVICE_PATH, jti="shared-jti-1")
        assert second.post_hook(body, token=replay).status_code == 401
        fresh = sign_cds_jwt(key, iss=ISSUER, aud=second.base_url + SERVICE_PATH, jti="shared-jti-2")
        assert second.post_hook(body, token=fresh).status_code == 200
    finally:
        first.stop()
        second.stop()
