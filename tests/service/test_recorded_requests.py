"""Replays of what the CDS Hooks sandbox web app really sent (tests/fixtures/recorded/, captured in Chrome DevTools
while it ran against this project's sandbox patients on 2026-12-04), plus orders shaped like its Rx Sign order for
every scenario patient.

The app's Rx Sign order has a single-object `category`, no `requester`, no route, no performer, and a draftOrders
Bundle without `type`. Strict mode must refuse it and say why (in the answer and in the log); `--lenient` must
evaluate it, echo only valid R4 in the coverage-information system action, never call it likely-authorized, and
ask for exactly what the order lacks.

The EHR's FHIR server is a `responses` mock holding every scenario record as of the recording day (the recorded
prefetch is as of that day too); the recorded `fhirServer` is rewritten to it.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest

from cards import conformance_problems
from sandbox.scenarios import load_all
from sandbox.web_app import KETAMINE_MEDICATIONS, rx_sign_draft_orders
from tests.harness import FHIR_BASE, FhirMock, ServiceUnderTest, mocked_fhir, start_service

RECORDED = Path(__file__).parents[1] / "fixtures" / "recorded"
SITE_CONFIG = Path(__file__).parents[2] / "sandbox" / "site-config.yaml"
RECORDED_ON = date(2026, 12, 4)
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
KETAMINE = KETAMINE_MEDICATIONS[0]  # ketamine 10 MG/ML Injectable Solution, RxNorm 238082
KETAMINE_RECORDINGS = (
    "sandbox-app-ketamine-sc-mla",
    "sandbox-app-ketamine-sc-mpg",
    "sandbox-app-ketamine-sc-nocov",
    "sandbox-app-ketamine-sc-ukk",
)


def recorded(name: str) -> dict[str, Any]:
    """A recorded request whose FHIR server (`fhirServer`, and the fullUrls and paging links of its prefetch) is
    the test's mock instead of the loopback server it was recorded against."""
    text = (RECORDED / f"{name}.json").read_text(encoding="utf-8")
    body = json.loads(re.sub(r"http://127\.0\.0\.1:\d+/fhir", FHIR_BASE, text))
    assert body["fhirServer"] == FHIR_BASE
    return body


@pytest.fixture(scope="module")
def scenario_resources() -> list[dict[str, Any]]:
    """Every resource of every scenario record, dates as of the recording day, one per Type/id."""
    resources: dict[str, dict[str, Any]] = {}
    for scenario in load_all():
        for entry in scenario.shifted(RECORDED_ON).bundle["entry"]:
            resource = entry["resource"]
            resources.setdefault(f"{resource['resourceType']}/{resource['id']}", resource)
    return list(resources.values())


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory) -> ServiceUnderTest:
    service = start_service(tmp_path_factory.mktemp("lenient"), lenient=True, now=NOW, site_config=str(SITE_CONFIG))
    yield service
    service.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> ServiceUnderTest:
    service = start_service(tmp_path_factory.mktemp("strict"), now=NOW, site_config=str(SITE_CONFIG))
    yield service
    service.stop()


def post(service: ServiceUnderTest, resources: list[dict[str, Any]], body: dict[str, Any]) -> tuple[Any, FhirMock]:
    rsps, fhir = mocked_fhir(service, resources, token=None)  # the app sends no fhirAuthorization: an open server
    with rsps:
        response = service.post_hook(body)
    return response, fhir


def decision(card: dict[str, Any]) -> dict[str, Any]:
    return card["extension"]["ketamine-cds.decision"]


def statuses(card: dict[str, Any]) -> dict[str, str]:
    return {c["id"]: c["status"] for c in decision(card)["criteria"]}


def needed_column(card: dict[str, Any]) -> dict[str, str]:
    """Criterion title -> the card's "What is needed" cell, for the rows of the criteria table that ask something."""
    rows: dict[str, str] = {}
    for line in card["detail"].splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[4] and cells[0] in ("?", "✗", "!"):
            rows[cells[1]] = cells[4]
    return rows


# ------------------------------------------------------------------ the recording is what our model of the app sends


@pytest.mark.parametrize("name", KETAMINE_RECORDINGS)
def test_rx_sign_model_is_exactly_what_the_app_sent(name: str) -> None:
    """`rx_sign_draft_orders` (used below for every scenario patient) reproduces the recorded draft orders."""
    body = recorded(name)
    assert body["context"]["draftOrders"] == rx_sign_draft_orders(body["context"]["patientId"], KETAMINE, RECORDED_ON)


# ------------------------------------------------------------------ strict mode refuses, and says why


@pytest.mark.parametrize("name", KETAMINE_RECORDINGS)
def test_strict_mode_refuses_the_app_and_logs_which_field(
    name: str, strict: ServiceUnderTest, scenario_resources: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    body = recorded(name)
    with caplog.at_level(logging.WARNING, logger="ketamine_cds"):
        response, _ = post(strict, scenario_resources, body)
    assert response.status_code == 422
    diagnostics = " ".join(issue["diagnostics"] for issue in response.json()["issue"])
    assert "draftOrders" in diagnostics and "type" in diagnostics  # the Bundle without type
    refusals = [r.getMessage() for r in caplog.records if "refused with HTTP 422" in r.getMessage()]
    assert len(refusals) == 1 and "context.draftOrders" in refusals[0]
    logged = caplog.text
    patient_id = body["context"]["patientId"]
    assert patient_id not in logged and "ketamine 10 MG/ML" not in logged  # which field, never which patient


def test_strict_mode_names_the_single_object_category(
    strict: ServiceUnderTest, scenario_resources: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """With the Bundle type fixed, the next quirk the R4 check meets is `category`, and log and answer name it."""
    body = recorded("sandbox-app-ketamine-sc-mla")
    body["context"]["draftOrders"]["type"] = "collection"
    body["context"]["draftOrders"]["entry"][0]["resource"]["requester"] = {
        "reference": "Practitioner/COREPRACTITIONER1"
    }
    with caplog.at_level(logging.WARNING, logger="ketamine_cds"):
        response, _ = post(strict, scenario_resources, body)
    assert response.status_code == 422
    (issue,) = response.json()["issue"]
    # named by the input boundary's shape check ("…resource: MedicationRequest.category: expected an array")
    assert issue["diagnostics"].startswith("context.draftOrders.entry[0].resource")
    assert "category" in issue["diagnostics"]
    assert any("category" in r.getMessage() and "422" in r.getMessage() for r in caplog.records)
    assert "sc-mla" not in caplog.text


# ------------------------------------------------------------------ lenient mode: cards, valid R4, the right asks


def test_non_ketamine_recording_gets_no_cards_and_no_fhir_access(
    lenient: ServiceUnderTest, scenario_resources: list[dict[str, Any]]
) -> None:
    response, fhir = post(lenient, scenario_resources, recorded("sandbox-app-non-ketamine-sc-mdn"))
    assert response.status_code == 200, response.text
    assert response.json() == {"cards": [], "systemActions": []}
    assert fhir.calls == []


EXPECTED = {
    "sandbox-app-ketamine-sc-mla": ("mgbhp-031", "documentation-needed", "info"),
    "sandbox-app-ketamine-sc-mpg": ("mgbhp-031", "blocked", "warning"),
    "sandbox-app-ketamine-sc-ukk": ("uuhp-mp-054", "not-covered", "warning"),
    "sandbox-app-ketamine-sc-nocov": (None, "no-policy", "info"),
}


@pytest.mark.parametrize("name", KETAMINE_RECORDINGS)
def test_lenient_mode_answers_every_recording_with_cards_and_valid_r4(
    name: str, lenient: ServiceUnderTest, scenario_resources: list[dict[str, Any]]
) -> None:
    body = recorded(name)
    response, _ = post(lenient, scenario_resources, body)
    assert response.status_code == 200, response.text
    answer = response.json()
    (card,) = answer["cards"]
    policy, outcome, indicator = EXPECTED[name]
    assert (decision(card).get("policy"), decision(card)["outcome"], card["indicator"]) == (policy, outcome, indicator)
    normalised = copy.deepcopy(body["context"]["draftOrders"]["entry"][0]["resource"])
    normalised["category"] = [normalised["category"]]
    # requester-missing is accepted, not invented: the echoed order cannot meet the CRD profile's requester rule
    problems = conformance_problems(answer, [normalised])
    assert [p for p in problems if "requester: required by the CRD" not in p] == []
    for action in answer["systemActions"]:
        echoed = action["resource"]
        MedicationRequest.model_validate(echoed)  # valid R4 (R4B = R4 for MedicationRequest), or this raises
        assert isinstance(echoed["category"], list)
        assert {k: v for k, v in echoed.items() if k != "extension"} == normalised  # the order, normalised, only
    assert len(answer["systemActions"]) == (0 if outcome == "no-policy" else 1)


def test_all_documented_patient_gets_asked_for_route_location_and_performer(
    lenient: ServiceUnderTest, scenario_resources: list[dict[str, Any]]
) -> None:
    """sc-mla's record documents every clinical criterion (its scenario, with a complete order, is likely-authorized);
    the app's order lacks the route, a location and a performer, so exactly those two criteria stay unknown."""
    response, _ = post(lenient, scenario_resources, recorded("sandbox-app-ketamine-sc-mla"))
    (card,) = response.json()["cards"]
    unknown = {cid for cid, status in statuses(card).items() if status == "unknown"}
    assert unknown == {"iv-route", "initial-6-setting-monitoring"}
    assert all(
        status == "met" for cid, status in statuses(card).items() if cid.startswith("initial-") and cid not in unknown
    )
    asks = needed_column(card)
    assert set(asks) == {
        "Intravenous administration",
        "Hospital or office setting, specialist monitoring, specialist prescriber",
    }
    assert "route (intravenous)" in asks["Intravenous administration"]
    setting = asks["Hospital or office setting, specialist monitoring, specialist prescriber"]
    assert "location" in setting and "performer" in setting
    assert card["summary"].startswith("Ketamine: document 2 items")


def test_all_documented_patient_is_not_asked_for_what_is_on_record(
    lenient: ServiceUnderTest, scenario_resources: list[dict[str, Any]]
) -> None:
    response, _ = post(lenient, scenario_resources, recorded("sandbox-app-ketamine-sc-mla"))
    (card,) = response.json()["cards"]
    setting = needed_column(card)["Hospital or office setting, specialist monitoring, specialist prescriber"]
    assert not re.search(r"prescriber|consultation", setting), setting


def test_blocked_recording_names_the_exclusion_and_still_lists_the_missing_order_data(
    lenient: ServiceUnderTest, scenario_resources: list[dict[str, Any]]
) -> None:
    response, _ = post(lenient, scenario_resources, recorded("sandbox-app-ketamine-sc-mpg"))
    (card,) = response.json()["cards"]
    assert statuses(card)["exclusion-1-pregnancy"] == "met"
    assert "Pregnant" in card["summary"] and card["overrideReasons"]
    assert {cid for cid, s in statuses(card).items() if s == "unknown"} == {"iv-route", "initial-6-setting-monitoring"}


# ------------------------------------------------------------------ no order from the app is ever likely-authorized


def _app_request(scenario_patient: str, user_id: str = "Practitioner/COREPRACTITIONER1") -> dict[str, Any]:
    return {
        "hook": "order-sign",
        "hookInstance": "5b1b2f0e-8d5e-4c1e-9d59-0f6f3a7c2b10",
        "fhirServer": FHIR_BASE,
        "context": {
            "patientId": scenario_patient,
            "userId": user_id,
            "draftOrders": rx_sign_draft_orders(scenario_patient, KETAMINE, RECORDED_ON),
        },
    }


def test_no_ketamine_order_from_the_app_is_likely_authorized_and_every_card_asks_for_the_route(
    lenient: ServiceUnderTest, scenario_resources: list[dict[str, Any]]
) -> None:
    """Every scenario patient, the app's Rx Sign ketamine order, the service fetching the record itself."""
    outcomes: dict[str, str] = {}
    for scenario in load_all():
        response, _ = post(lenient, scenario_resources, _app_request(scenario.patient_id))
        assert response.status_code == 200, (scenario.id, response.text)
        for card in response.json()["cards"]:
            outcome = decision(card)["outcome"]
            outcomes[scenario.id] = outcome
            assert outcome != "likely-authorized", scenario.id
            if outcome == "documentation-needed" and decision(card).get("policy") == "mgbhp-031":
                assert statuses(card)["iv-route"] == "unknown", scenario.id
                assert "Intravenous administration" in needed_column(card), scenario.id
    # the stories that are likely-authorized with their own, complete orders: with the app's order, MGB 031 asks
    # for the missing order data and U of U MP-054 never covers ketamine for KAP
    likely_with_own_order = {s.id: e.policy for s in load_all() for e in s.expected if e.outcome == "likely-authorized"}
    assert set(likely_with_own_order.values()) == {"mgbhp-031", "uuhp-mp-054"}
    for scenario_id, policy in likely_with_own_order.items():
        expected = "documentation-needed" if policy == "mgbhp-031" else "not-covered"
        assert outcomes[scenario_id] == expected, scenario_id
