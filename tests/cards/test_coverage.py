"""Coverage-information system actions: the outcome mapping, one per order, assertion ids, the echoed order."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest

from cards import build_response, conformance_problems
from cards.coverage import COVERAGE_INFORMATION_URL, assertion_id
from fhir_mappings.model import Decision
from tests.cards import fixtures as fx

MODELS = {"MedicationRequest": MedicationRequest, "ServiceRequest": ServiceRequest}


def respond(decisions: list[Decision], orders: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    if orders is None:
        orders = [o for d in decisions for o in fx.orders_for(d)]
    args: dict[str, Any] = dict(hook_instance=fx.HOOK, patient_id=fx.PATIENT, user_id=fx.USER, today=fx.TODAY)
    args.update(kw)
    return build_response(decisions, orders, **args)


def sub_extensions(action: dict[str, Any]) -> dict[str, list[Any]]:
    """url -> values of the one coverage-information extension on an action's resource."""
    [extension] = [e for e in action["resource"]["extension"] if e["url"] == COVERAGE_INFORMATION_URL]
    values: dict[str, list[Any]] = {}
    for part in extension["extension"]:
        [key] = [k for k in part if k.startswith("value")]
        values.setdefault(part["url"], []).append(part[key])
    return values


# outcome -> (covered, pa-needed, doc-needed, doc-purpose, info-needed, words the reason must contain)
MAPPING = {
    "likely-authorized": ("covered", "auth-needed", None, None, None, "appear met"),
    "documentation-needed": ("covered", "auth-needed", "clinical", "withpa", None, "Record a depression rating"),
    "criteria-not-met": ("conditional", "auth-needed", None, None, "OTH", "Four adequate trials"),
    "blocked": ("not-covered", None, None, None, None, "Uncontrolled hypertension"),
    "not-covered": ("not-covered", None, None, None, None, "not covered under MP-054"),
    "plan-variation": ("conditional", "conditional", None, None, "OTH", "CMS: Medicare Benefit Policy Manual"),
    "not-applicable": ("conditional", "conditional", None, None, "OTH", "Spravato"),
}


@pytest.mark.parametrize("name", sorted(MAPPING))
def test_mapping_table_every_cell(name: str) -> None:
    covered, pa, doc, purpose, info, reason_words = MAPPING[name]
    decision = fx.all_decisions()[name]
    response = respond([decision])
    assert len(response["systemActions"]) == len(decision.order_refs)
    for action in response["systemActions"]:
        assert action["type"] == "update"
        assert action["description"].startswith("Record coverage information on ")
        values = sub_extensions(action)
        assert values["coverage"] == [{"reference": decision.coverage_ref}]
        assert values["covered"] == [covered]
        assert values.get("pa-needed") == ([pa] if pa else None)
        assert values.get("doc-needed") == ([doc] if doc else None)
        assert values.get("doc-purpose") == ([purpose] if purpose else None)
        assert values.get("info-needed") == ([info] if info else None)
        [reason] = values["reason"]
        assert set(reason) == {"text"} and reason_words in reason["text"]
        assert values["date"] == ["2026-01-15"]
        assert values["coverage-assertion-id"] == [assertion_id(fx.HOOK, decision.coverage_ref)]
        assert not set(values) - {
            "coverage",
            "covered",
            "pa-needed",
            "doc-needed",
            "doc-purpose",
            "info-needed",
            "reason",
            "date",
            "coverage-assertion-id",
        }
    assert conformance_problems(response, fx.orders_for(decision)) == []


def test_documentation_needed_reason_lists_every_missing_item() -> None:
    decision = fx.documentation_needed()
    [reason] = sub_extensions(respond([decision])["systemActions"][0])["reason"]
    for criterion in decision.criteria:
        if criterion.missing:
            assert criterion.missing.rstrip(".") in reason["text"]
    assert ".;" not in reason["text"]


def test_no_policy_and_missing_coverage_give_no_coverage_information() -> None:
    assert respond([fx.no_policy()])["systemActions"] == []
    assert respond([fx.likely_authorized(coverage_ref=None)])["systemActions"] == []
    response = respond([fx.blocked(coverage_ref=None)])
    assert response["systemActions"] == [] and len(response["cards"]) == 1
    assert conformance_problems(response, fx.drafts()) == []


def test_echoed_order_is_input_plus_extension_and_validates_r4b() -> None:
    orders = fx.drafts()
    snapshot = copy.deepcopy(orders)
    response = respond([fx.documentation_needed()], orders)
    assert orders == snapshot  # input untouched
    for action, order in zip(response["systemActions"], orders, strict=True):
        resource = action["resource"]
        extensions = resource["extension"]
        assert [e["url"] for e in extensions] == [COVERAGE_INFORMATION_URL]
        assert {k: v for k, v in resource.items() if k != "extension"} == order
        MODELS[resource["resourceType"]].model_validate(resource)


def test_existing_extensions_kept_and_old_coverage_information_replaced() -> None:
    other = {"url": "http://example.org/fhir/StructureDefinition/local", "valueString": "keep me"}
    stale = {
        "url": COVERAGE_INFORMATION_URL,
        "extension": [
            {"url": "coverage", "valueReference": {"reference": fx.COVERAGE}},
            {"url": "covered", "valueCode": "not-covered"},
            {"url": "date", "valueDate": "2025-12-01"},
            {"url": "coverage-assertion-id", "valueString": "old"},
        ],
    }
    orders = [fx.medication_request(extension=[other, stale]), fx.service_request()]
    response = respond([fx.likely_authorized()], orders)
    resource = response["systemActions"][0]["resource"]
    assert resource["extension"][0] == other
    assert len(resource["extension"]) == 2
    assert sub_extensions(response["systemActions"][0])["covered"] == ["covered"]
    MedicationRequest.model_validate(resource)
    assert conformance_problems(response, orders) == []


def test_one_action_per_order_first_decision_wins() -> None:
    first = fx.blocked()
    second = fx.likely_authorized()  # same orders (should not happen): ignored for coverage information
    response = respond([first, second], fx.drafts())
    assert len(response["systemActions"]) == 2
    assert all(sub_extensions(a)["covered"] == ["not-covered"] for a in response["systemActions"])
    assert len(response["cards"]) == 2
    assert conformance_problems(response, fx.drafts()) == []


def test_orders_not_in_the_request_are_skipped() -> None:
    response = respond([fx.likely_authorized()], [fx.medication_request()])
    assert [a["resource"]["id"] for a in response["systemActions"]] == ["mr-ketamine"]
    bundle_entries = [{"resource": fx.medication_request()}, {"resource": fx.service_request()}]
    assert len(respond([fx.likely_authorized()], bundle_entries)["systemActions"]) == 2


def test_assertion_ids_same_for_same_coverage_distinct_for_different() -> None:
    mgb_a = fx.likely_authorized()
    mgb_b = fx.not_applicable()  # same coverage, other order
    uuhp = fx.not_covered()  # other coverage
    response = respond([mgb_a, mgb_b, uuhp])
    ids: dict[str, set[str]] = {}
    for action in response["systemActions"]:
        values = sub_extensions(action)
        ids.setdefault(values["coverage"][0]["reference"], set()).update(values["coverage-assertion-id"])
    assert len(response["systemActions"]) == 4
    assert {k: len(v) for k, v in ids.items()} == {fx.COVERAGE: 1, fx.OTHER_COVERAGE: 1}
    assert ids[fx.COVERAGE] != ids[fx.OTHER_COVERAGE]
    assert conformance_problems(response, [o for d in (mgb_a, mgb_b, uuhp) for o in fx.orders_for(d)]) == []


def test_assertion_id_depends_on_hook_instance() -> None:
    assert assertion_id(fx.HOOK, fx.COVERAGE) == assertion_id(fx.HOOK, fx.COVERAGE)
    assert assertion_id(fx.HOOK, fx.COVERAGE) != assertion_id(fx.OTHER_HOOK, fx.COVERAGE)


def test_reason_falls_back_to_headline_and_stays_bounded() -> None:
    bare = replace(fx.blocked(), criteria=(), headline="Exclusion applies: something")
    [reason] = sub_extensions(respond([bare])["systemActions"][0])["reason"]
    assert reason["text"] == "Exclusion applies: something"
    huge = replace(fx.not_covered(), headline="word " * 400)
    [reason] = sub_extensions(respond([huge])["systemActions"][0])["reason"]
    assert len(reason["text"]) <= 500 and reason["text"].endswith("…")


def test_json_copy_is_a_deep_copy_equal_to_deepcopy() -> None:
    import copy as _copy

    from cards.coverage import _json_copy

    order = {"resourceType": "MedicationRequest", "dosageInstruction": [{"doseAndRate": [{"doseQuantity": 0.5}]}]}
    copied = _json_copy(order)
    assert copied == _copy.deepcopy(order)
    copied["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"] = 9
    assert order["dosageInstruction"][0]["doseAndRate"][0]["doseQuantity"] == 0.5  # nothing shared
    odd = {"big": 2**80, "t": (1, 2), "nan": float("nan")}  # not JSON orjson writes back: deep-copied as before
    assert _json_copy(odd)["big"] == 2**80 and _json_copy(odd)["t"] == (1, 2)
