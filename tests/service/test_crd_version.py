"""CRD 2.0 and 2.2 through the service over real HTTP: discovery declares both, `davinci-crd.requestedVersion`
absent / "2.0" / "2.2" / unsupported, the 2.2 coverage-information, the 2.2 error statuses (400 vs 422, hook-13)
and unknown context, configuration and extension elements ignored — every response checked for conformance."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from cards import conformance_problems, discovery_problems
from cards.coverage import COVERAGE_INFORMATION_URL
from tests.harness import mocked_fhir, order_sign_request, start_service

BASE_CASE = Path(__file__).parents[2] / "fhir_mappings/policies/mgbhp-031.cases/base.json"
NO_PHQ9 = Path(__file__).parents[2] / "fhir_mappings/policies/mgbhp-031.cases/no-phq9-in-30-days.json"
TEMP = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"
THO_CARD_TYPES = "http://terminology.hl7.org/CodeSystem/cdshooks-card-type"

NON_KETAMINE_ORDER = {
    "resourceType": "MedicationRequest",
    "id": "amox-1",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/p1"},
    "requester": {"reference": "Practitioner/prac-1"},
    "authoredOn": "2026-01-15",
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "308182", "display": "amox"}]
    },
}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    svc = start_service(tmp_path_factory.mktemp("crd-version"))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def base_patient() -> dict[str, Any]:
    return json.loads(BASE_CASE.read_text())


def resources(base: dict[str, Any]) -> list[dict[str, Any]]:
    return [copy.deepcopy(e["resource"]) for e in base["bundle"]["entry"]]


def with_version(body: dict[str, Any], version: Any) -> dict[str, Any]:
    """`body` with `davinci-crd.requestedVersion` set (None: the extension object without it; ... : no extension)."""
    body = copy.deepcopy(body)
    if version is not ...:
        body["extension"] = {} if version is None else {"davinci-crd.requestedVersion": version}
    return body


def ketamine_request(base: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return order_sign_request(
        copy.deepcopy(base["draft_orders"]),
        patient_id=base["patient_id"],
        user_id=base["user_id"],
        encounter_id=base["encounter_id"],
        **kwargs,
    )


def post(service: Any, body: Any, fhir: list[dict[str, Any]] | None = None, **mock: Any) -> Any:
    if fhir is None:
        return service.post_hook(body)
    rsps, _ = mocked_fhir(service, fhir, **mock)
    with rsps:
        return service.post_hook(body)


def coverage_information(response: dict[str, Any]) -> list[dict[str, list[Any]]]:
    """For each system action: url -> values of its coverage-information extension."""
    out = []
    for action in response["systemActions"]:
        [extension] = [e for e in action["resource"]["extension"] if e["url"] == COVERAGE_INFORMATION_URL]
        values: dict[str, list[Any]] = {}
        for part in extension["extension"]:
            value = part if part["url"] == "detail" else next(part[k] for k in part if k.startswith("value"))
            values.setdefault(part["url"], []).append(value)
        out.append(values)
    return out


# --- discovery -----------------------------------------------------------------------------------------------
def test_discovery_declares_every_served_version(service) -> None:
    import requests

    document = requests.get(service.base_url + "/cds-services", timeout=10).json()
    (svc,) = document["services"]
    assert svc["extension"]["davinci-crd.version"] == ["2.0", "2.2"]
    assert "davinci-crd.requestedVersion" in svc["usageRequirements"]
    assert discovery_problems(document) == []


# --- negotiation -----------------------------------------------------------------------------------------------
def test_absent_or_20_is_the_20_answer_byte_for_byte(service, base_patient) -> None:
    body = ketamine_request(base_patient)
    answers = {}
    for label, version in (("no extension", ...), ("empty extension", None), ("2.0", "2.0")):
        r = post(service, with_version(body, version), resources(base_patient))
        assert r.status_code == 200, r.text
        answers[label] = r.content
    assert len(set(answers.values())) == 1, "requestedVersion absent and '2.0' must answer identically"
    response = json.loads(answers["2.0"])
    assert conformance_problems(response, base_patient["draft_orders"], crd_version="2.0") == []
    assert response["cards"][0]["source"]["topic"]["system"] == TEMP
    [values] = coverage_information(response)
    assert "expiry-date" not in values and "detail" not in values


def test_22_answer(service, base_patient) -> None:
    r = post(service, with_version(ketamine_request(base_patient), "2.2"), resources(base_patient))
    assert r.status_code == 200, r.text
    response = r.json()
    assert conformance_problems(response, base_patient["draft_orders"], crd_version="2.2") == []
    (card,) = response["cards"]
    assert card["source"]["topic"]["system"] == THO_CARD_TYPES
    assert card["extension"]["ketamine-cds.decision"]["outcome"] == "likely-authorized"
    [values] = coverage_information(response)
    assert values["covered"] == ["covered"] and values["pa-needed"] == ["auth-needed"]
    assert values["expiry-date"] == ["2026-02-11"]  # 28-day initial authorization from 2026-01-15, inclusive
    assert values["detail"] and all(
        any(e["url"] == "value" and e["valueUrl"].startswith("https://") for e in d["extension"])
        for d in values["detail"]
    )


def test_non_ketamine_orders_answer_the_same_in_both_versions(service) -> None:
    body = order_sign_request([copy.deepcopy(NON_KETAMINE_ORDER)], patient_id="p1")
    for version in (..., "2.0", "2.2"):
        r = post(service, with_version(body, version))
        assert r.status_code == 200 and r.json() == {"cards": [], "systemActions": []}


@pytest.mark.parametrize("value", ["2.1", "3.0", "2.2.1", "", 2.2, ["2.2"], None])
def test_an_unsupported_version_is_422_naming_the_supported_ones(service, value: Any) -> None:
    body = order_sign_request([copy.deepcopy(NON_KETAMINE_ORDER)], patient_id="p1")
    body["extension"] = {"davinci-crd.requestedVersion": value}
    r = service.post_hook(body)
    assert r.status_code == 422, r.text
    [issue] = r.json()["issue"]
    assert issue["code"] == "not-supported" and "supported: 2.0, 2.2" in issue["diagnostics"]
    assert issue["expression"] == ["extension.davinci-crd.requestedVersion"]


# --- data that could not be read: indeterminate in 2.2 -----------------------------------------------------
def test_unreadable_fhir_data_is_indeterminate_in_22_and_documentation_needed_in_20(service, base_patient) -> None:
    body = ketamine_request(base_patient)
    answers = {}
    for version in ("2.0", "2.2"):
        r = post(service, with_version(body, version), resources(base_patient), fail_types={"Observation"})
        assert r.status_code == 200, r.text
        answers[version] = r.json()
        assert conformance_problems(answers[version], base_patient["draft_orders"], crd_version=version) == []
        assert answers[version]["cards"][0]["extension"]["ketamine-cds.decision"]["outcome"] == "documentation-needed"
    [old] = coverage_information(answers["2.0"])
    assert old["doc-needed"] == ["clinical"] and old["doc-purpose"] == ["withpa"]
    [new] = coverage_information(answers["2.2"])
    assert new["covered"] == ["indeterminate"]  # the blood-pressure and pregnancy exclusions could not be read
    assert new["doc-needed"] == ["indeterminate"] and "doc-purpose" not in new
    [reason] = new["reason"]
    assert reason["coding"][0]["code"] == "technical" and reason["text"].startswith("Observation could not be read")


def test_missing_documentation_is_not_indeterminate(service, base_patient) -> None:
    case = json.loads(NO_PHQ9.read_text())
    kept = [r for r in resources(base_patient) if f"{r['resourceType']}/{r['id']}" not in case["remove"]]
    r = post(service, with_version(ketamine_request(base_patient), "2.2"), kept)
    assert r.status_code == 200, r.text
    assert conformance_problems(r.json(), base_patient["draft_orders"], crd_version="2.2") == []
    [values] = coverage_information(r.json())
    assert values["doc-needed"] == ["clinical"] and values["covered"] == ["covered"]
    assert all("coding" not in reason for reason in values["reason"])


# --- error statuses ---------------------------------------------------------------------------------------------
def test_unparsable_json_is_400_in_every_version(service) -> None:
    assert (
        service.post_hook(b'{"hook": "order-sign", "extension": {"davinci-crd.requestedVersion": "2.2"').status_code
        == 400
    )


@pytest.mark.parametrize(
    ("name", "break_it"),
    [
        ("hookInstance not a UUID (CDS Hooks)", lambda b: b.update(hookInstance="not-a-uuid")),
        ("userId missing (CDS Hooks)", lambda b: b["context"].pop("userId")),
        ("fhirAuthorization without fhirServer (CDS Hooks)", lambda b: b.pop("fhirServer")),
        ("intent missing (FHIR core)", lambda b: b["context"]["draftOrders"]["entry"][0]["resource"].pop("intent")),
        ("Bundle.type missing (FHIR core)", lambda b: b["context"]["draftOrders"].pop("type")),
    ],
)
def test_cds_hooks_and_fhir_violations_are_422_in_20_and_400_in_22(service, name: str, break_it: Any) -> None:
    body = order_sign_request([copy.deepcopy(NON_KETAMINE_ORDER)], patient_id="p1")
    break_it(body)
    for version, status in ((..., 422), ("2.0", 422), ("2.2", 400)):
        r = service.post_hook(with_version(body, version))
        assert r.status_code == status, (name, version, r.text)
        assert r.json()["resourceType"] == "OperationOutcome"


def test_an_invalid_fhir_draft_order_is_400_in_22(service, base_patient) -> None:
    body = ketamine_request(base_patient)
    body["context"]["draftOrders"]["entry"][0]["resource"]["authoredOn"] = "yesterday"
    assert service.post_hook(with_version(body, "2.0")).status_code == 422
    r = service.post_hook(with_version(body, "2.2"))
    assert r.status_code == 400 and "authoredOn" in r.text


@pytest.mark.parametrize(
    ("name", "break_it"),
    [
        (
            "requester missing (CRD order profile)",
            lambda b: b["context"]["draftOrders"]["entry"][0]["resource"].pop("requester"),
        ),
        (
            "duplicate draft order id (CRD)",
            lambda b: b["context"]["draftOrders"]["entry"].append(
                copy.deepcopy(b["context"]["draftOrders"]["entry"][0])
            ),
        ),
    ],
)
def test_crd_only_violations_are_422_in_both_versions(service, name: str, break_it: Any) -> None:
    body = order_sign_request([copy.deepcopy(NON_KETAMINE_ORDER)], patient_id="p1")
    break_it(body)
    for version in (..., "2.0", "2.2"):
        r = service.post_hook(with_version(body, version))
        assert r.status_code == 422, (name, version, r.text)


def _coverage_variant(base: dict[str, Any], change: str) -> list[dict[str, Any]]:
    found = resources(base)
    coverage = next(r for r in found if r["resourceType"] == "Coverage")
    if change == "payer-not-handled":
        found.append({"resourceType": "Organization", "id": "payer-other", "name": "Another Health Plan"})
        coverage["payor"] = [{"reference": "Organization/payer-other"}]
    elif change == "no-active-coverage":
        found.remove(coverage)
    elif change == "coverage-ambiguous":
        found.append({**copy.deepcopy(coverage), "id": "mgb-second-cov"})
    return found


@pytest.mark.parametrize("change", ["payer-not-handled", "no-active-coverage", "coverage-ambiguous"])
def test_unhandled_coverage_is_400_in_22_and_an_info_card_in_20(service, base_patient, change: str) -> None:
    body = ketamine_request(base_patient)
    fhir = _coverage_variant(base_patient, change)
    old = post(service, with_version(body, "2.0"), fhir)
    assert old.status_code == 200, old.text
    (card,) = old.json()["cards"]
    assert card["extension"]["ketamine-cds.decision"]["outcome"] == "no-policy" and old.json()["systemActions"] == []
    assert conformance_problems(old.json(), base_patient["draft_orders"]) == []
    new = post(service, with_version(body, "2.2"), fhir)
    assert new.status_code == 400, new.text
    [issue] = new.json()["issue"]
    assert "hook-13" in issue["diagnostics"] and issue["severity"] == "error"


# --- unknown context, configuration and extension elements: ignored ----------------------------------------
@pytest.mark.parametrize("version", ["2.0", "2.2"])
def test_unknown_context_configuration_and_extensions_are_ignored(service, base_patient, version: str) -> None:
    body = with_version(ketamine_request(base_patient), version)
    plain = post(service, body, resources(base_patient))
    noisy = copy.deepcopy(body)
    noisy["hookInstance"] = body["hookInstance"]
    noisy["context"]["futureContextField"] = {"anything": [1, 2]}
    noisy["context"]["selections"] = ["MedicationRequest/x"]
    noisy["extension"]["com.example.tracking"] = {"id": str(uuid.uuid4())}
    noisy["extension"]["davinci-crd.configuration"] = {"unknown-option": True, "max-cards": "five", "guideline": 1}
    noisy["somethingFromCdsHooks3"] = True
    answer = post(service, noisy, resources(base_patient))
    assert plain.status_code == answer.status_code == 200, answer.text
    assert answer.content == plain.content
    assert conformance_problems(answer.json(), base_patient["draft_orders"], crd_version=version) == []


@pytest.mark.parametrize("version", ["2.0", "2.2"])
def test_supported_configuration_is_honoured_in_both_versions(service, base_patient, version: str) -> None:
    body = with_version(ketamine_request(base_patient), version)
    body["extension"]["davinci-crd.configuration"] = {"coverage-info": False, "guideline": False}
    r = post(service, body, resources(base_patient))
    assert r.status_code == 200 and r.json() == {"cards": [], "systemActions": []}
