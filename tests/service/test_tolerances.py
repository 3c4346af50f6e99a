"""`--lenient` tolerances (cds_service/tolerances.py): each one named, applied once before validation, producing R4;
nothing else accepted; the README lists exactly these."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest

from cds_service.errors import ServiceError
from cds_service.hook_request import validate_orders_fhir, validate_request
from cds_service.tolerances import TOLERANCES, TOLERANCES_BY_NAME, apply_tolerances
from tests.harness import order_sign_request, start_service

README = Path(__file__).parents[2] / "README.md"

KETAMINE_ORDER: dict[str, Any] = {
    "resourceType": "MedicationRequest",
    "id": "request-123",
    "status": "draft",
    "intent": "order",
    "subject": {"reference": "Patient/p1"},
    "category": {
        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/medicationrequest-category", "code": "community"}]
    },
    "medicationCodeableConcept": {
        "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "238082"}],
        "text": "ketamine 10 MG/ML Injectable Solution",
    },
}


def app_like_request(**order_changes: Any) -> dict[str, Any]:
    order = {**copy.deepcopy(KETAMINE_ORDER), **order_changes}
    order = {k: v for k, v in order.items() if v is not None}
    return order_sign_request([order], patient_id="p1", bundle_type=None, fhir_server=None)


def first_order(body: dict[str, Any]) -> dict[str, Any]:
    return body["context"]["draftOrders"]["entry"][0]["resource"]


def test_every_tolerance_is_named_documented_and_of_a_known_kind() -> None:
    assert len(TOLERANCES_BY_NAME) == len(TOLERANCES)
    for tolerance in TOLERANCES:
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", tolerance.name)
        assert tolerance.kind in ("normalise", "accept")
        assert (tolerance.apply is not None) == (tolerance.kind == "normalise")
        assert tolerance.accepts and tolerance.becomes


def test_the_readme_lists_exactly_the_tolerances() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("#### What `--lenient` accepts", 1)[1].split("\n#", 1)[0]
    listed = re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.MULTILINE)
    assert listed == [t.name for t in TOLERANCES]


def test_the_app_order_becomes_valid_r4_and_the_callers_body_is_untouched() -> None:
    body = app_like_request()
    before = copy.deepcopy(body)
    normalised = apply_tolerances(body)
    assert body == before  # the parsed request is not rewritten in place
    assert normalised["context"]["draftOrders"]["type"] == "collection"
    assert first_order(normalised)["category"] == [KETAMINE_ORDER["category"]]
    MedicationRequest.model_validate(first_order(normalised))
    # strict rules now hold but for the one thing that cannot be made up (accept-only: requester-missing) ...
    with pytest.raises(ServiceError) as refused:
        validate_request(normalised, lenient=False)
    assert [i.diagnostics for i in refused.value.issues] == [
        "context.draftOrders.entry[0].resource.requester: missing (required by CRD order profiles)"
    ]
    assert validate_request(normalised, lenient=True).draft_orders == [first_order(normalised)]
    with pytest.raises(ServiceError, match="category"):
        validate_orders_fhir([first_order(body)], {})  # ... and R4, which the raw order does not pass


def test_prefetch_is_passed_through_not_copied() -> None:
    body = app_like_request()
    body["prefetch"] = {"patient": {"resourceType": "Patient", "id": "p1"}}
    assert apply_tolerances(body)["prefetch"] is body["prefetch"]


def test_intent_missing_becomes_order_only_for_types_whose_intent_is_required() -> None:
    body = order_sign_request(
        [
            {"resourceType": "MedicationRequest", "id": "m1", "status": "draft"},
            {"resourceType": "ServiceRequest", "id": "s1", "status": "draft", "intent": "plan"},
            {"resourceType": "CommunicationRequest", "id": "c1", "status": "draft"},
        ],
        patient_id="p1",
    )
    orders = [e["resource"] for e in apply_tolerances(body)["context"]["draftOrders"]["entry"]]
    assert [o.get("intent") for o in orders] == ["order", "plan", None]  # R4 CommunicationRequest has no intent


def test_a_list_category_and_a_typed_bundle_are_left_alone() -> None:
    body = app_like_request(category=[KETAMINE_ORDER["category"]])
    body["context"]["draftOrders"]["type"] = "collection"
    assert apply_tolerances(body) is body


@pytest.mark.parametrize(
    "body",
    [
        None,
        [1, 2],
        "text",
        {"hook": "order-sign"},
        {"context": "x"},
        {"context": {"draftOrders": []}},
        {"context": {"draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": "x"}}},
        {"context": {"draftOrders": {"resourceType": "Bundle", "type": "collection", "entry": [1, {"resource": 2}]}}},
    ],
)
def test_malformed_requests_are_left_for_validation_to_refuse(body: Any) -> None:
    assert apply_tolerances(body) == body


def test_applied_tolerances_are_logged_by_name_without_request_values(caplog: pytest.LogCaptureFixture) -> None:
    body = app_like_request()
    with caplog.at_level(logging.INFO, logger="ketamine_cds.tolerances"):
        apply_tolerances(body)
    (record,) = caplog.records
    assert "category-single-object" in record.getMessage() and "bundle-type-missing" in record.getMessage()
    assert "p1" not in caplog.text and "238082" not in caplog.text


def test_what_no_real_client_sends_is_still_refused_in_lenient_mode(tmp_path: Path) -> None:
    """Lenient is not "anything goes": a category that is a string, an unknown order type, a missing patientId."""
    service = start_service(tmp_path, lenient=True)
    try:
        for broken in (
            app_like_request(category="community"),
            app_like_request(resourceType="Observation"),
        ):
            assert service.post_hook(broken).status_code == 422
        missing_patient = app_like_request()
        del missing_patient["context"]["patientId"]
        assert service.post_hook(missing_patient).status_code == 422
    finally:
        service.stop()
