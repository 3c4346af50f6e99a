"""Scenario format: date shifting rules and validation errors."""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from sandbox.scenarios import (
    PATIENTS_DIR,
    ScenarioError,
    find_scenario,
    lint,
    load_all,
    load_scenario,
    shift_date_string,
    shift_dates,
)
from tests.sandbox.helpers import EXAMPLE_IDS, example_data

# ---------------------------------------------------------------------- date shifting


@pytest.mark.parametrize(
    ("value", "days", "expected"),
    [
        ("2026-01-15", 10, "2026-01-25"),
        ("2026-01-15", -15, "2025-12-31"),
        ("2024-02-28", 1, "2024-02-29"),  # leap day exists in 2024
        ("2026-01-15T09:30:00-05:00", 3, "2026-01-18T09:30:00-05:00"),  # dateTime: time and zone kept
        ("2026-01-15T23:59:59.123Z", 1, "2026-01-16T23:59:59.123Z"),  # instant: fraction kept
        ("2026-01-15T09:30+01:00", 1, "2026-01-16T09:30+01:00"),  # minutes precision kept
        ("2026", 400, "2026"),  # partial dates are left alone
        ("2026-01", 400, "2026-01"),
        ("not a date", 5, "not a date"),
        ("2026-02-30", 1, "2026-02-30"),  # invalid calendar date: untouched
        ("12:30:00", 1, "12:30:00"),  # FHIR time
    ],
)
def test_shift_date_string(value: str, days: int, expected: str) -> None:
    assert shift_date_string(value, days) == expected


def test_shift_dates_moves_dates_everywhere_except_identifying_fields() -> None:
    resource: dict[str, Any] = {
        "resourceType": "Encounter",
        "id": "2026-01-15",
        "meta": {"lastUpdated": "2026-01-15T10:00:00Z", "versionId": "2026-01-15"},
        "text": {"status": "generated", "div": "2026-01-15"},
        "identifier": [{"system": "2026-01-15", "value": "2026-01-15", "period": {"start": "2026-01-01"}}],
        "status": "finished",
        "class": {"system": "http://x", "code": "2026-01-15", "display": "2026-01-15", "version": "2026-01-15"},
        "subject": {"reference": "Patient/p", "identifier": {"value": "2026-01-15"}, "display": "2026-01-15"},
        "period": {"start": "2026-01-15T09:00:00-05:00", "end": "2026-01-15T10:00:00-05:00"},
        "extension": [
            {"url": "2026-01-15", "valueDate": "2026-01-15"},
            {"url": "http://x/label", "valueString": "2026-01-15"},
        ],
        "reasonCode": [{"text": "2026-01-15"}],
        "partOf": {"reference": "Encounter/2026-01-15"},
        "fullUrl": "2026-01-15",
        "birthDate": "1980-01-15",
        "valueInteger": 2026,
    }
    shifted = shift_dates(resource, 5)

    assert shifted["period"] == {"start": "2026-01-20T09:00:00-05:00", "end": "2026-01-20T10:00:00-05:00"}
    assert shifted["meta"]["lastUpdated"] == "2026-01-20T10:00:00Z"
    assert shifted["birthDate"] == "1980-01-20"
    assert shifted["extension"][0] == {"url": "2026-01-15", "valueDate": "2026-01-20"}
    assert shifted["identifier"][0]["period"]["start"] == "2026-01-06"  # a Period inside identifier still moves
    untouched = {
        "id": shifted["id"],
        "versionId": shifted["meta"]["versionId"],
        "div": shifted["text"]["div"],
        "identifier.system": shifted["identifier"][0]["system"],
        "identifier.value": shifted["identifier"][0]["value"],
        "Reference.identifier.value": shifted["subject"]["identifier"]["value"],
        "code": shifted["class"]["code"],
        "display": shifted["class"]["display"],
        "version": shifted["class"]["version"],
        "subject.display": shifted["subject"]["display"],
        "url": shifted["extension"][0]["url"],
        "valueString": shifted["extension"][1]["valueString"],
        "CodeableConcept.text": shifted["reasonCode"][0]["text"],
        "fullUrl": shifted["fullUrl"],
    }
    assert untouched == dict.fromkeys(untouched, "2026-01-15")
    assert shifted["partOf"]["reference"] == "Encounter/2026-01-15"
    assert shifted["valueInteger"] == 2026
    assert resource["period"]["start"] == "2026-01-15T09:00:00-05:00", "shift_dates must not mutate its input"


def test_scenario_shifted_is_pure_and_keeps_windows(write_scenario: Callable[..., Path]) -> None:
    scenario = load_scenario(PATIENTS_DIR / "example-ketamine-minimal.json")
    today = date(2026, 11, 23)
    days = (today - scenario.anchor_date).days

    shifted = scenario.shifted(today)

    assert shifted.anchor_date == today
    assert shifted.draft_orders[0]["authoredOn"] == today.isoformat()
    bounds = shifted.draft_orders[0]["dosageInstruction"][0]["timing"]["repeat"]["boundsPeriod"]
    assert bounds == {"start": "2026-11-27", "end": "2026-12-22"}  # still 4 and 29 days after the anchor
    patient = shifted.bundle["entry"][0]["resource"]
    assert patient["birthDate"] == shift_date_string("1985-09-02", days)
    assert scenario.draft_orders[0]["authoredOn"] == "2026-01-15", "the original must be unchanged"
    assert shifted.shifted(today).bundle == shifted.bundle, "shifting to the same day again is a no-op"


# ---------------------------------------------------------------------- loading


def test_examples_load_sorted_and_valid() -> None:
    scenarios = load_all()
    assert set(EXAMPLE_IDS) <= {scenario.id for scenario in scenarios}
    example = find_scenario("example-ketamine-minimal", scenarios)
    assert example.order_refs == ["MedicationRequest/ex-km-ketamine"]
    assert example.expected[0].policy == "mgbhp-031"
    assert example.encounter_id == "ex-km-visit"
    assert not example.background
    non_ketamine = find_scenario("example-non-ketamine", scenarios)
    assert non_ketamine.expect_no_cards and non_ketamine.expected == ()
    assert [scenario.id for scenario in scenarios] == sorted(scenario.id for scenario in scenarios)


def test_examples_pass_lint() -> None:
    examples = [load_scenario(PATIENTS_DIR / f"{scenario_id}.json") for scenario_id in EXAMPLE_IDS]
    assert lint(examples) == []


def _problems(path: Path) -> str:
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    return str(error.value)


def test_missing_and_unknown_keys(write_scenario: Callable[..., Path]) -> None:
    data = example_data()
    del data["bundle"], data["user_id"]
    data["expect_no_card"] = True  # a typo must not pass silently
    data["_comment"] = "allowed"
    message = _problems(write_scenario(data))
    assert "missing required key(s): user_id, bundle" in message
    assert "unknown key(s): expect_no_card" in message
    assert "_comment" not in message


def test_draft_order_must_be_a_request_resource(write_scenario: Callable[..., Path]) -> None:
    data = example_data()
    data["draft_orders"].append({"resourceType": "Observation", "id": "obs-1", "status": "final"})
    data["draft_orders"].append({"resourceType": "MedicationRequest", "status": "draft"})
    message = _problems(write_scenario(data))
    assert "draft_orders[1] is a 'Observation', not a request resource" in message
    assert "draft_orders[2] needs an id" in message


def test_expected_order_must_be_a_draft_order(write_scenario: Callable[..., Path]) -> None:
    data = example_data()
    data["expected"].append({"order": "MedicationRequest/other", "policy": "mgbhp-031", "outcome": "blocked"})
    data["expected"].append({"order": "MedicationRequest/ex-km-ketamine", "policy": "uuhp-mp-054", "outcome": "ok"})
    data["expected"].append(
        {"order": "MedicationRequest/ex-km-ketamine", "policy": "x-1", "outcome": "blocked", "phase": "maintenance"}
    )
    message = _problems(write_scenario(data))
    assert "expected[1]: order 'MedicationRequest/other' is not among the draft orders" in message
    assert "expected[2]: outcome 'ok' must be one of" in message
    assert "expected[3]: phase 'maintenance' must be one of initial, reauthorization" in message


def test_story_needs_an_expectation_but_not_both(write_scenario: Callable[..., Path]) -> None:
    data = example_data()
    data["expected"] = []
    assert "must list `expected` decisions or set expect_no_cards" in _problems(write_scenario(data))
    data = example_data()
    data["expect_no_cards"] = True
    assert "expect_no_cards is true but expected lists decisions" in _problems(write_scenario(data))


def test_bundle_entries_need_put_urls_and_resolvable_uuids(write_scenario: Callable[..., Path]) -> None:
    data = example_data()
    entries = data["bundle"]["entry"]
    entries[1]["request"] = {"method": "POST", "url": "Organization"}
    entries[2]["request"]["url"] = "Coverage/some-other-id"
    del entries[3]["request"]
    entries[4]["resource"]["id"] = "12345"
    entries[4]["request"]["url"] = "PractitionerRole/12345"
    entries[6]["resource"]["subject"]["reference"] = "urn:uuid:00000000-0000-4000-8000-00000000dead"
    message = _problems(write_scenario(data))
    assert "bundle.entry[1] needs request {'method': 'PUT', 'url': 'Organization/ex-mgbhp'}" in message
    assert "bundle.entry[2] needs request {'method': 'PUT', 'url': 'Coverage/ex-km-coverage'}" in message
    assert "bundle.entry[3] needs request {'method': 'PUT', 'url': 'Practitioner/ex-psychiatrist'}" in message
    assert "bundle.entry[4]: id '12345' is all digits" in message
    assert "reference urn:uuid:00000000-0000-4000-8000-00000000dead matches no entry fullUrl" in message


def test_bundle_must_hold_patient_and_encounter_and_not_the_draft_order(write_scenario: Callable[..., Path]) -> None:
    data = example_data()
    data["patient_id"] = "someone-else"
    data["encounter_id"] = "no-such-visit"
    data["bundle"]["entry"].append(
        {
            "resource": {"resourceType": "MedicationRequest", "id": "ex-km-ketamine", "status": "active"},
            "request": {"method": "PUT", "url": "MedicationRequest/ex-km-ketamine"},
        }
    )
    message = _problems(write_scenario(data))
    assert "bundle does not write the scenario patient Patient/someone-else" in message
    assert "bundle does not write the context encounter Encounter/no-such-visit" in message
    assert "MedicationRequest/ex-km-ketamine is also a draft order" in message
    assert "subject 'Patient/ex-km-patient' is not the scenario patient Patient/someone-else" in message


def test_ids_dates_and_user_are_checked(write_scenario: Callable[..., Path]) -> None:
    data = example_data()
    data["anchor_date"] = "2026-01"
    data["user_id"] = "Organization/x"
    data["patient_id"] = "Patient/ex-km-patient"
    message = _problems(write_scenario(data))
    assert "anchor_date '2026-01' must be a full date YYYY-MM-DD" in message
    assert "user_id 'Organization/x' must be 'Practitioner/<id>' or 'PractitionerRole/<id>'" in message
    assert "patient_id 'Patient/ex-km-patient' must be a plain FHIR id" in message
    assert "file name must be the id" in _problems(write_scenario(example_data(), name="renamed"))


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", encoding="utf-8")
    assert str(path) in _problems(path)


def test_load_all_reports_duplicates_and_every_broken_file(tmp_path: Path, write_scenario: Callable[..., Path]) -> None:
    write_scenario(example_data())
    duplicate = example_data()
    del duplicate["background"]
    write_scenario(duplicate, background=True)  # same id under background/
    broken = example_data("example-non-ketamine")
    broken["draft_orders"] = []
    write_scenario(broken)
    with pytest.raises(ScenarioError) as error:
        load_all(tmp_path)
    message = str(error.value)
    assert "duplicate scenario id 'example-ketamine-minimal'" in message
    assert "draft_orders must be a non-empty list" in message


def test_background_folder_sets_the_flag_and_can_be_excluded(
    tmp_path: Path, write_scenario: Callable[..., Path]
) -> None:
    write_scenario(example_data("example-non-ketamine"))
    background = example_data()
    background["id"] = "bg-patient"
    background["expected"] = []  # background patients need no expectation
    del background["background"]
    write_scenario(background, background=True)

    everything = load_all(tmp_path)
    assert [(scenario.id, scenario.background) for scenario in everything] == [
        ("bg-patient", True),
        ("example-non-ketamine", False),
    ]
    assert [scenario.id for scenario in load_all(tmp_path, include_background=False)] == ["example-non-ketamine"]


def test_lint_warns_about_unknown_references_and_conflicting_copies(
    tmp_path: Path, write_scenario: Callable[..., Path]
) -> None:
    first = example_data()
    first["bundle"]["entry"][6]["resource"]["recorder"] = {"reference": "Practitioner/nobody"}
    second = example_data("example-non-ketamine")
    second["bundle"]["entry"].append(
        {
            "resource": {"resourceType": "Organization", "id": "ex-mgbhp", "name": "Another name"},
            "request": {"method": "PUT", "url": "Organization/ex-mgbhp"},
        }
    )
    write_scenario(first)
    write_scenario(second)
    warnings = lint(load_all(tmp_path))
    assert "example-ketamine-minimal: reference Practitioner/nobody is not written by any scenario" in warnings
    assert "example-non-ketamine: Organization/ex-mgbhp is also written, differently, by example-ketamine-minimal" in (
        warnings
    )


def test_find_scenario_lists_known_ids() -> None:
    with pytest.raises(ScenarioError, match=r"known ids: .*example-ketamine-minimal"):
        find_scenario("nope", load_all())
