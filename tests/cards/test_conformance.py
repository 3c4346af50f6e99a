"""conformance_problems really detects each problem it claims to: broken copies of a conformant response."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from cards import build_response, conformance_problems
from cards.coverage import COVERAGE_INFORMATION_URL
from tests.cards import fixtures as fx

DECISIONS = list(fx.all_decisions().values())  # LA, DN, CNM, BL, NC, PV, NA, NP
ORDERS = list({f"{o['resourceType']}/{o['id']}": o for d in DECISIONS for o in fx.orders_for(d)}.values())
GOOD = build_response(DECISIONS, ORDERS, hook_instance=fx.HOOK, patient_id=fx.PATIENT, user_id=fx.USER, today=fx.TODAY)
DN, BL = 1, 3  # card indexes: documentation-needed has a suggestion, blocked has override reasons


def test_the_base_response_is_conformant() -> None:
    assert conformance_problems(GOOD, ORDERS) == []
    assert conformance_problems(GOOD) == []
    assert len(GOOD["systemActions"]) == 4


def ci_parts(response: dict[str, Any], action: int = 0) -> list[dict[str, Any]]:
    resource = response["systemActions"][action]["resource"]
    [extension] = [e for e in resource["extension"] if e["url"] == COVERAGE_INFORMATION_URL]
    return extension["extension"]


def set_part(response: dict[str, Any], url: str, value: dict[str, Any] | None, action: int = 0) -> None:
    """Replace (or with None remove) the sub-extension `url`; add it when absent."""
    parts = ci_parts(response, action)
    kept = [p for p in parts if p["url"] != url]
    if value is not None:
        kept.append({"url": url, **value})
    parts[:] = kept


def assertion_of(response: dict[str, Any], action: int) -> str:
    return next(p["valueString"] for p in ci_parts(response, action) if p["url"] == "coverage-assertion-id")


def card(response: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return response["cards"][i]


Mutation = Callable[[dict[str, Any]], Any]

CASES: list[tuple[str, Mutation, str]] = [
    # --- response and card structure (Inferno test 8)
    ("no cards key", lambda r: r.pop("cards"), "cards: required array missing"),
    ("no systemActions key", lambda r: r.pop("systemActions"), "systemActions: required on order-sign"),
    ("systemActions not array", lambda r: r.update(systemActions={}), "systemActions: must be an array"),
    ("summary 140 chars", lambda r: card(r).update(summary="x" * 140), "cards[0].summary: 140 characters"),
    ("summary missing", lambda r: card(r).pop("summary"), "cards[0].summary: required string missing"),
    ("summary not string", lambda r: card(r).update(summary=5), "cards[0].summary: must be a non-empty string"),
    ("indicator invalid", lambda r: card(r).update(indicator="urgent"), "cards[0].indicator: 'urgent' is not"),
    ("source missing", lambda r: card(r).pop("source"), "cards[0].source: required object missing"),
    ("source label missing", lambda r: card(r)["source"].pop("label"), "cards[0].source.label: required"),
    ("topic missing", lambda r: card(r)["source"].pop("topic"), "cards[0].source.topic: required Coding missing"),
    ("topic system missing", lambda r: card(r)["source"]["topic"].pop("system"), "source.topic.system: required"),
    ("topic code missing", lambda r: card(r)["source"]["topic"].pop("code"), "source.topic.code: required"),
    ("source url relative", lambda r: card(r)["source"].update(url="/x"), "source.url: must be an absolute"),
    ("not JSON", lambda r: card(r).update(detail=float("nan")), "response: not serializable as JSON"),
    ("card not object", lambda r: r["cards"].append("card"), "cards[8]: card must be an object"),
    # --- optional card fields (Inferno test 9) and CRD card rules
    ("uuid missing", lambda r: card(r).pop("uuid"), "cards[0].uuid: missing"),
    ("uuid duplicate", lambda r: card(r, 1).update(uuid=card(r)["uuid"]), "cards[1].uuid: same uuid as cards[0]"),
    ("detail not string", lambda r: card(r).update(detail=["x"]), "cards[0].detail: must be a string"),
    ("detail raw html", lambda r: card(r).update(detail="see <b>this</b>"), "cards[0].detail: contains raw HTML"),
    ("detail too long", lambda r: card(r).update(detail="x" * 7000), "cards[0].detail: 7000 bytes"),
    (
        "suggestions without selectionBehavior",
        lambda r: card(r, DN).pop("selectionBehavior"),
        f"cards[{DN}].selectionBehavior: required when suggestions are present",
    ),
    (
        "selectionBehavior invalid",
        lambda r: card(r, DN).update(selectionBehavior="all"),
        f"cards[{DN}].selectionBehavior: 'all' is not",
    ),
    (
        "suggestion label missing",
        lambda r: card(r, DN)["suggestions"][0].pop("label"),
        f"cards[{DN}].suggestions[0].label: required",
    ),
    (
        "suggestion uuid missing",
        lambda r: card(r, DN)["suggestions"][0].pop("uuid"),
        f"cards[{DN}].suggestions[0].uuid: required",
    ),
    (
        "suggestion actions empty",
        lambda r: card(r, DN)["suggestions"][0].update(actions=[]),
        f"cards[{DN}].suggestions[0].actions: must be a non-empty array",
    ),
    (
        "suggestion action description missing",
        lambda r: card(r, DN)["suggestions"][0]["actions"][0].pop("description"),
        f"cards[{DN}].suggestions[0].actions[0].description: required",
    ),
    (
        "suggestion isRecommended not boolean",
        lambda r: card(r, DN)["suggestions"][0].update(isRecommended="no"),
        "isRecommended: must be a boolean",
    ),
    (
        "created resource invalid R4B",
        lambda r: card(r, DN)["suggestions"][0]["actions"][0]["resource"].update(bogus=1),
        "resource: R4B validation: bogus",
    ),
    (
        "created resource lacks requester",
        lambda r: card(r, DN)["suggestions"][0]["actions"][0]["resource"].pop("requester"),
        "resource.requester: required by the CRD ServiceRequest profile",
    ),
    (
        "override reason display missing",
        lambda r: card(r, BL)["overrideReasons"][0].pop("display"),
        f"cards[{BL}].overrideReasons[0].display: required",
    ),
    ("link url missing", lambda r: card(r)["links"][0].pop("url"), "cards[0].links[0].url: required"),
    ("link url relative", lambda r: card(r)["links"][0].update(url="policies/031"), "links[0].url: must be an http"),
    ("link label missing", lambda r: card(r)["links"][0].pop("label"), "cards[0].links[0].label: required"),
    ("link type invalid", lambda r: card(r)["links"][0].update(type="web"), "links[0].type: 'web' is not"),
    ("appContext on absolute", lambda r: card(r)["links"][0].update(appContext="x"), "appContext: only allowed"),
    ("links not array", lambda r: card(r).update(links={"a": 1}), "cards[0].links: must be an array"),
    (
        "associated-resource malformed",
        lambda r: card(r)["extension"].update({"davinci-crd.associated-resource": ["not a ref"]}),
        "must be an array of 'Type/id' strings",
    ),
    ("empty string value", lambda r: card(r).update(detail=""), "cards[0].detail: empty value ''"),
    ("null value", lambda r: card(r)["source"].update(icon=None), "cards[0].source.icon: empty value None"),
    ("empty array", lambda r: card(r).update(links=[]), "cards[0].links: empty value []"),
    # --- actions (Inferno test 8)
    (
        "system action description missing",
        lambda r: r["systemActions"][0].pop("description"),
        "systemActions[0].description: required string missing",
    ),
    ("system action type invalid", lambda r: r["systemActions"][0].update(type="modify"), "'modify' is not create"),
    ("system action type missing", lambda r: r["systemActions"][0].pop("type"), "systemActions[0].type: required"),
    ("update without resource", lambda r: r["systemActions"][0].pop("resource"), "resource: required for update"),
    (
        "delete without resourceId",
        lambda r: r["systemActions"].append({"type": "delete", "description": "d"}),
        "systemActions[4].resourceId: required",
    ),
    (
        "delete with bad resourceId",
        lambda r: r["systemActions"].append({"type": "delete", "description": "d", "resourceId": "mr 1"}),
        "resourceId: must be a relative reference",
    ),
    (
        "unknown resourceType",
        lambda r: r["systemActions"].append({"type": "create", "description": "d", "resource": {"resourceType": "X"}}),
        "unknown FHIR R4 resourceType 'X'",
    ),
    # --- coverage-information (Inferno tests 13/14)
    ("ci as create", lambda r: r["systemActions"][0].update(type="create"), "must be delivered as an 'update'"),
    (
        "pa-needed with not-covered",
        lambda r: set_part(r, "covered", {"valueCode": "not-covered"}),
        "crd-ci-q2 (2.2): no pa-needed when covered is not-covered",
    ),
    (
        "covered without pa-needed",
        lambda r: set_part(r, "pa-needed", None),
        "crd-ci-q2 (2.0.1): pa-needed required",
    ),
    (
        "info-needed without conditional",
        lambda r: set_part(r, "info-needed", {"valueCode": "OTH"}),
        "crd-ci-q3: info-needed only when",
    ),
    (
        "questionnaire without doc-needed",
        lambda r: set_part(r, "questionnaire", {"valueCanonical": "http://example.org/Questionnaire/q"}),
        "crd-ci-q1: questionnaire/response only with doc-needed",
    ),
    (
        "satisfied with withpa",
        lambda r: (
            set_part(r, "pa-needed", {"valueCode": "satisfied"}),
            set_part(r, "doc-purpose", {"valueCode": "withpa"}),
            set_part(r, "satisfied-pa-id", {"valueString": "PA-1"}),
        ),
        "crd-ci-q4: no doc-purpose withpa",
    ),
    (
        "satisfied without satisfied-pa-id",
        lambda r: set_part(r, "pa-needed", {"valueCode": "satisfied"}),
        "crd-ci-q5: satisfied-pa-id present if and only if",
    ),
    (
        "satisfied-pa-id without satisfied",
        lambda r: set_part(r, "satisfied-pa-id", {"valueString": "PA-1"}),
        "crd-ci-q5: satisfied-pa-id present if and only if",
    ),
    (
        "info-needed OTH without reason",
        lambda r: (
            set_part(r, "reason", None),
            set_part(r, "covered", {"valueCode": "conditional"}),
            set_part(r, "info-needed", {"valueCode": "OTH"}),
        ),
        "crd-ci-q6 (2.2): info-needed OTH needs a reason",
    ),
    (
        "doc-purpose without reason",
        lambda r: (set_part(r, "reason", None), set_part(r, "doc-purpose", {"valueCode": "withpa"})),
        "crd-ci-q8 (2.2): doc-purpose needs a reason",
    ),
    (
        "two assertion ids for one coverage",
        lambda r: set_part(r, "coverage-assertion-id", {"valueString": "another-id"}, action=1),
        "2 coverage-assertion-ids for Coverage/cov-mgb; must be one",
    ),
    (
        "one assertion id for two coverages",
        lambda r: set_part(r, "coverage-assertion-id", {"valueString": assertion_of(r, 0)}, action=2),
        "share coverage-assertion-id",
    ),
    (
        "two satisfied-pa-ids for one coverage",
        lambda r: [
            (
                set_part(r, "pa-needed", {"valueCode": "satisfied"}, action=a),
                set_part(r, "satisfied-pa-id", {"valueString": f"PA-{a}"}, action=a),
            )
            for a in (0, 1)
        ],
        "2 satisfied-pa-ids for Coverage/cov-mgb",
    ),
    ("2.2-only code", lambda r: set_part(r, "covered", {"valueCode": "indeterminate"}), "exists only in CRD 2.2"),
    ("removed code both", lambda r: set_part(r, "doc-needed", {"valueCode": "both"}), "'both' was removed in CRD 2.2"),
    ("unknown code", lambda r: set_part(r, "covered", {"valueCode": "maybe"}), "code 'maybe' not in"),
    ("expiry-date", lambda r: set_part(r, "expiry-date", {"valueDate": "2026-12-31"}), "2.2-only sub-extension"),
    ("contact", lambda r: set_part(r, "contact", {"valueContactPoint": {"value": "x"}}), "differs between CRD 2.0.1"),
    ("unknown sub-extension", lambda r: set_part(r, "colour", {"valueCode": "red"}), "unknown coverage-information"),
    ("date not a date", lambda r: set_part(r, "date", {"valueDate": "15/01/2026"}), "valueDate must be a FHIR date"),
    ("date missing", lambda r: set_part(r, "date", None), ".date: required (min 1)"),
    ("assertion id missing", lambda r: set_part(r, "coverage-assertion-id", None), "coverage-assertion-id: required"),
    ("coverage missing", lambda r: set_part(r, "coverage", None), ".coverage: required (min 1)"),
    (
        "covered twice",
        lambda r: ci_parts(r).append({"url": "covered", "valueCode": "covered"}),
        ".covered: 2 repetitions (max 1)",
    ),
    ("wrong value type", lambda r: set_part(r, "covered", {"valueString": "covered"}), "needs exactly one valueCode"),
    ("reason empty", lambda r: set_part(r, "reason", {"valueCodeableConcept": {"id": "x"}}), "reason needs text"),
    (
        "two coverage-information actions for one order",
        lambda r: r["systemActions"].append(copy.deepcopy(r["systemActions"][0])),
        "second coverage-information action for MedicationRequest/mr-ketamine",
    ),
    (
        "echoed order changed",
        lambda r: r["systemActions"][0]["resource"].update(dosageInstruction=[{"text": "changed"}]),
        "changes MedicationRequest/mr-ketamine beyond the coverage-information extension",
    ),
    (
        "echoed order not a draft order",
        lambda r: r["systemActions"][0]["resource"].update(id="mr-elsewhere"),
        "MedicationRequest/mr-elsewhere is not one of the draft orders",
    ),
    (
        "echoed order invalid R4B",
        lambda r: r["systemActions"][0]["resource"].update(subject="Patient/pat-1"),
        "systemActions[0].resource: R4B validation: subject",
    ),
    (
        "echoed order not draft",
        lambda r: r["systemActions"][0]["resource"].update(status="active"),
        "status: CRD 2.0.1 order profiles fix status to 'draft'",
    ),
    (
        "echoed order lacks authoredOn",
        lambda r: r["systemActions"][0]["resource"].pop("authoredOn"),
        "resource.authoredOn: required by the CRD MedicationRequest profile",
    ),
    (
        "echoed order lacks medication",
        lambda r: r["systemActions"][0]["resource"].pop("medicationCodeableConcept"),
        "resource.medication[x]: required by the CRD MedicationRequest profile",
    ),
    (
        "determination without coverage-information",
        lambda r: r.update(systemActions=r["systemActions"][2:]),
        "MedicationRequest/mr-ketamine has a likely-authorized determination but no coverage-information action",
    ),
    (
        "card names an order that was not drafted",
        lambda r: card(r)["extension"]["davinci-crd.associated-resource"].append("MedicationRequest/ghost"),
        "MedicationRequest/ghost is not a draft order",
    ),
]


@pytest.mark.parametrize(("name", "mutate", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_problem_is_detected(name: str, mutate: Mutation, expected: str) -> None:
    broken = copy.deepcopy(GOOD)
    mutate(broken)
    problems = conformance_problems(broken, ORDERS)
    assert any(expected in p for p in problems), problems


def test_summary_of_139_is_fine() -> None:
    ok = copy.deepcopy(GOOD)
    card(ok).update(summary="x" * 139)
    assert conformance_problems(ok, ORDERS) == []


def test_escaped_angle_bracket_is_not_html() -> None:
    ok = copy.deepcopy(GOOD)
    card(ok).update(detail="score \\<5 and a ≥ b")
    assert conformance_problems(ok, ORDERS) == []


def test_not_an_object() -> None:
    assert conformance_problems([]) == ["response: not a JSON object"]  # type: ignore[arg-type]


def test_order_checks_need_draft_orders() -> None:
    broken = copy.deepcopy(GOOD)
    broken["systemActions"] = []
    assert conformance_problems(broken) == []  # without draft orders nothing says which orders were evaluated
    assert conformance_problems(broken, ORDERS)


def test_no_policy_needs_no_coverage_information() -> None:
    response = build_response(
        [fx.no_policy()], ORDERS, hook_instance=fx.HOOK, patient_id=fx.PATIENT, user_id=fx.USER, today=fx.TODAY
    )
    assert response["systemActions"] == []
    assert conformance_problems(response, ORDERS) == []
