"""build_response: one Inferno-clean card per decision, configured as the client asks."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import pytest

from cards import CONFIGURATION_OPTIONS, build_response, conformance_problems
from cards.card import DETAIL_MAX_BYTES, INDICATOR, OVERRIDE_SYSTEM
from cards.config import CARD_TYPE_SYSTEM, TOPIC_BY_OUTCOME
from fhir_mappings.model import CriterionResult, Decision, PolicyRef, Status
from tests.cards import fixtures as fx


def respond(decisions: list[Decision], orders: list[dict[str, Any]] | None = None, **kw: Any) -> dict[str, Any]:
    if orders is None:
        orders = [o for d in decisions for o in fx.orders_for(d)]
    args: dict[str, Any] = dict(hook_instance=fx.HOOK, patient_id=fx.PATIENT, user_id=fx.USER, today=fx.TODAY)
    args.update(kw)
    return build_response(decisions, orders, **args)


def only_card(decision: Decision) -> dict[str, Any]:
    response = respond([decision])
    assert len(response["cards"]) == 1
    return response["cards"][0]


ALL = fx.all_decisions()


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_outcome_is_conformant(name: str) -> None:
    decision = ALL[name]
    orders = fx.orders_for(decision)
    response = respond([decision], orders)
    assert set(response) == {"cards", "systemActions"}
    assert conformance_problems(response, orders) == []
    card = response["cards"][0]
    assert card["indicator"] == INDICATOR[decision.outcome]
    assert card["source"]["topic"]["system"] == CARD_TYPE_SYSTEM
    assert card["source"]["topic"]["code"] == TOPIC_BY_OUTCOME[decision.outcome]
    assert card["extension"]["ketamine-cds.decision"]["outcome"] == name
    assert card["extension"]["davinci-crd.associated-resource"] == list(decision.order_refs)
    assert len(card["summary"]) <= 139
    assert len(card["detail"].encode()) <= DETAIL_MAX_BYTES


def test_all_outcomes_together_are_conformant_and_uuids_unique() -> None:
    decisions = list(ALL.values())
    orders = {f"{o['resourceType']}/{o['id']}": o for d in decisions for o in fx.orders_for(d)}
    response = respond(decisions, list(orders.values()))
    assert conformance_problems(response, list(orders.values())) == []
    assert len(response["cards"]) == 8
    uuids = [c["uuid"] for c in response["cards"]]
    assert len(set(uuids)) == 8


def test_empty_decisions_give_both_keys_empty() -> None:
    response = respond([], [])
    assert response == {"cards": [], "systemActions": []}
    assert conformance_problems(response, []) == []


def test_indicator_mapping_never_critical() -> None:
    expected = {
        "likely-authorized": "info",
        "documentation-needed": "info",
        "plan-variation": "info",
        "not-applicable": "info",
        "no-policy": "info",
        "blocked": "warning",
        "criteria-not-met": "warning",
        "not-covered": "warning",
    }
    for name, decision in ALL.items():
        assert only_card(decision)["indicator"] == expected[name], name


def test_summaries_name_outcome_and_policy() -> None:
    assert only_card(fx.likely_authorized())["summary"] == (
        "Ketamine: MGB Policy 031 criteria appear met; prior authorization required"
    )
    assert only_card(fx.documentation_needed())["summary"] == (
        "Ketamine: document 5 items for MGB Policy 031 prior authorization"
    )
    assert only_card(fx.blocked())["summary"].startswith("Ketamine: MGB Policy 031 exclusion applies (Uncontrolled")
    assert only_card(fx.not_covered())["summary"] == (
        "Ketamine is not covered by University of Utah Health Plans (MP-054)"
    )
    iv = fx.likely_authorized(order_label="IV ketamine administration (MedicationRequest/mr-ketamine, RxNorm 6130)")
    assert only_card(iv)["summary"].startswith("IV ketamine: MGB Policy 031")
    assert only_card(fx.not_applicable())["summary"] == (
        "Intranasal esketamine (Spravato): see Mass General Brigham Health Plan Spravato pharmacy policy"
    )
    assert only_card(fx.no_policy())["summary"] == "IV ketamine: no ketamine policy is configured for this payer"
    one = replace(fx.documentation_needed(), criteria=(fx.AGE_MET, fx.RELEASE_UNKNOWN))
    assert "document 1 item for" in only_card(one)["summary"]


LONG = "Extraordinarily long criterion title " * 8


@pytest.mark.parametrize("name", sorted(ALL))
def test_summaries_stay_under_140_with_very_long_names(name: str) -> None:
    long_policy = PolicyRef(
        "p-long", LONG, "Medical Policy " + "9" * 60, "Very Long Regional " * 6 + "Health Plan", fx.MGB.url
    )
    long_crit = (
        CriterionResult("r", fx.REQ, LONG, "q", Status.NOT_MET, missing="x"),
        CriterionResult("e", fx.EXC, LONG, "q", Status.MET),
        CriterionResult("u", fx.REQ, LONG, "q", Status.UNKNOWN, missing="y"),
    )
    decision = replace(
        ALL[name],
        policy=long_policy if ALL[name].policy else None,
        criteria=long_crit,
        program=(ALL[name].program or "") + " " + LONG,
        order_label="very long ordered service name " * 6 + "(MedicationRequest/mr-ketamine)",
    )
    card = only_card(decision)
    assert len(card["summary"]) <= 139
    assert "  " not in card["summary"]
    assert conformance_problems(respond([decision])) == []


def test_long_titles_are_truncated_with_ellipsis() -> None:
    decision = replace(fx.blocked(), criteria=(CriterionResult("e", fx.EXC, LONG, "q", Status.MET),))
    summary = only_card(decision)["summary"]
    assert summary.endswith("…)")
    assert summary.startswith("Ketamine: MGB Policy 031 exclusion applies (Extraordinarily long")


def test_detail_table_lists_criteria_with_status_words_and_evidence() -> None:
    detail = only_card(fx.documentation_needed())["detail"]
    assert detail.splitlines()[0] == "Not documented: severity; trials; evaluation; psychosis; release"
    assert "**Orders:** ketamine administration: MedicationRequest/mr-ketamine, ServiceRequest/sr-infusion" in detail
    assert "| | Criterion | Status | Evidence | What is needed |" in detail
    assert "| ✓ | Age 18 or older | Met | Patient/pat-1 (42, age on the order date) |  |" in detail
    assert "Condition/c1 (ICD-10-CM F33.2, 2025-01-10); Condition/c2 (ICD-10-CM F32.2, 2024-11-02)" in detail
    assert "+2 more" in detail  # five diagnoses, three shown
    assert "| Case review |" in detail
    assert "| Unknown |" in detail
    assert "**Initial authorization:** 28 days" in detail
    assert "**After the service, document:**" in detail
    # requirements come before exclusions; absent exclusions collapse to one line
    assert detail.index("Age 18 or older") < detail.index("Exclusion: Primary psychotic disorder")
    assert (
        "**Exclusions not present** (none of): Pregnant, breastfeeding or at risk of becoming pregnant; Dementia."
        in detail
    )


def test_detail_lists_every_unknown_criterions_missing_text() -> None:
    decision = fx.documentation_needed()
    detail = only_card(decision)["detail"]
    unknown = [c for c in decision.criteria if c.status is Status.UNKNOWN]
    assert len(unknown) == 5
    for criterion in unknown:
        assert criterion.missing.replace("|", "\\|") in detail


def test_detail_escapes_pipes_newlines_and_html_in_cells() -> None:
    nasty = CriterionResult(
        "n",
        fx.REQ,
        "Title with | pipe\nand newline <b>bold</b>",
        "q",
        Status.UNKNOWN,
        evidence=(fx.ev("Observation/o|1", value="a|b"),),
        missing="Need x | y\nz",
    )
    decision = replace(fx.documentation_needed(), criteria=(nasty,), headline="Headline <script>x</script>")
    detail = only_card(decision)["detail"]
    row = next(line for line in detail.splitlines() if "Title with" in line)
    assert "Title with \\| pipe and newline \\<b>bold\\</b>" in row
    assert "Need x \\| y z" in row
    assert "Observation/o\\|1 (a\\|b)" in row
    assert len(re.findall(r"(?<!\\)\|", row)) == 6  # 5 columns -> 6 unescaped separators
    assert "\\<script>" in detail
    assert conformance_problems(respond([decision])) == []


def test_detail_shows_exclusion_evidence_cleared_and_holding() -> None:
    detail = only_card(fx.likely_authorized())["detail"]
    assert "| Cleared | Condition/avm1 (ICD-10-CM Q28.2, 2020-02-02); cleared by DocumentReference/clear1" in detail
    blocked = only_card(fx.blocked())["detail"]
    assert "| ✗ | Exclusion: Uncontrolled hypertension" in blocked
    assert "| Exclusion applies | Observation/bp1 (LOINC 85354-9, 2026-01-10, 172/95 mm[Hg]);" in blocked
    assert "172/95 mm[Hg]); present, no cardiology clearance on record | Document cardiology clearance" in blocked
    not_met = only_card(fx.criteria_not_met())["detail"]
    assert "| Not met |" in not_met
    assert "84 % of days covered); Only 3 trials in the current episode | A fourth adequate trial would meet it. |" in (
        not_met
    )


@pytest.mark.parametrize(
    ("phase", "days", "line"),
    [
        ("initial", 28, "**Initial authorization:** 28 days"),
        ("reauthorization", 365, "**Reauthorization:** 365 days"),
        ("integration-therapy", None, "**Evaluated as:** Integration therapy"),
        (None, 90, "**Authorization:** 90 days"),
    ],
)
def test_phase_and_authorization_length(phase: str | None, days: int | None, line: str) -> None:
    detail = only_card(fx.likely_authorized(phase=phase, authorization_days=days))["detail"]
    assert line in detail.splitlines()


def test_covered_service_is_named() -> None:
    decision = fx.likely_authorized(policy=fx.UUHP, phase=None, service="integration-therapy", authorization_days=None)
    lines = only_card(decision)["detail"].splitlines()
    assert "**Covered service:** Integration therapy" in lines
    assert not any(line.startswith("**Evaluated as") for line in lines)


def test_scope_rule_row_reads_applies() -> None:
    scope = CriterionResult(
        "ketamine-for-kap-not-covered",
        fx.REQ,
        "Ketamine administration for KAP",
        "q",
        Status.NOT_MET,
        evidence=(fx.ev("MedicationRequest/mr-kap", code="RxNorm 6130"),),
        explanation="Ketamine administration for KAP is investigational and not covered under MP-054.",
    )
    detail = only_card(fx.not_covered(criteria=(scope,)))["detail"]
    assert (
        "| ! | Scope: Ketamine administration for KAP | Applies | MedicationRequest/mr-kap (RxNorm 6130) |  |" in detail
    )
    assert "Not met" not in detail


def test_no_phase_line_without_phase_or_length() -> None:
    detail = only_card(fx.likely_authorized(phase=None, authorization_days=None))["detail"]
    assert "authorization:**" not in detail.lower() and "Evaluated as" not in detail


def test_plan_variation_detail_names_program_and_reference_criteria() -> None:
    card = only_card(fx.plan_variation())
    detail = card["detail"]
    assert "**Governing program:** CMS: Medicare Benefit Policy Manual, Chapter 15" in detail
    assert "criteria below are shown for reference only" in detail
    assert "| Severe current episode on a rating scale within 30 days |" in detail
    assert card["summary"].startswith("Ketamine: plan variation, decided under CMS: Medicare Benefit Policy Manual")
    assert card["links"][0]["label"] == "Medicare Benefit Policy Manual, Chapter 15"


def test_no_policy_card_has_no_table_and_says_no_determination() -> None:
    card = only_card(fx.no_policy())
    assert "| Criterion |" not in card["detail"]
    assert "No prior-authorization determination was made" in card["detail"]
    assert card["source"]["label"] == "ketamine-cds prior-authorization advisor"
    assert "url" not in card["source"]
    for reason in ("no-active-coverage", "coverage-ambiguous", "plan-not-recognised", "something-new"):
        card = only_card(fx.no_policy(program=reason, coverage_ref=None))
        assert len(card["summary"]) <= 139
        assert card["summary"].startswith("IV ketamine: ")


def test_source_label_is_payer_with_policy_number_and_url() -> None:
    source = only_card(fx.blocked())["source"]
    assert source["label"] == "Mass General Brigham Health Plan — Medical Policy 031"
    assert source["url"] == fx.MGB.url
    assert source["topic"] == {"system": CARD_TYPE_SYSTEM, "code": "off-guideline", "display": "Off Guideline"}


def test_links_are_absolute_and_deduplicated() -> None:
    card = only_card(fx.likely_authorized())
    assert card["links"] == [
        {"label": "MGB Health Plan medical policies (Policy 031)", "url": fx.MGB.url, "type": "absolute"}
    ]
    bad = fx.likely_authorized(links=(("relative", "/policies"), ("ok", "https://example.org/a")))
    assert [link["url"] for link in only_card(bad)["links"]] == ["https://example.org/a", fx.MGB.url]


def test_override_reasons_only_on_blocked_and_criteria_not_met() -> None:
    for name, decision in ALL.items():
        card = only_card(decision)
        if name in ("blocked", "criteria-not-met"):
            codes = [r["code"] for r in card["overrideReasons"]]
            assert all(r["system"] == OVERRIDE_SYSTEM and r["display"] for r in card["overrideReasons"])
            assert "record-incorrect" in codes and "clinical-exception" in codes
            assert ("clearance-obtained" in codes) == (name == "blocked")  # the BP exclusion is clearable
        else:
            assert "overrideReasons" not in card, name
    pregnancy = CriterionResult("x", fx.EXC, "Pregnant", "q", Status.MET)
    codes = [r["code"] for r in only_card(replace(fx.blocked(), criteria=(pregnancy,)))["overrideReasons"]]
    assert "clearance-obtained" not in codes


def test_suggestion_creates_crd_shaped_service_request() -> None:
    card = only_card(fx.documentation_needed())
    assert card["selectionBehavior"] == "any"
    [suggestion] = card["suggestions"]
    assert suggestion["label"] == "Order a PHQ-9 depression assessment"
    assert suggestion["isRecommended"] is False
    [action] = suggestion["actions"]
    assert action["type"] == "create" and action["description"]
    resource = action["resource"]
    assert resource == {
        "resourceType": "ServiceRequest",
        "id": suggestion["uuid"],
        "status": "draft",
        "intent": "order",
        "code": {
            "coding": [
                {"system": "http://loinc.org", "code": "44249-1", "display": "PHQ-9 quick depression assessment panel"}
            ],
            "text": "PHQ-9 quick depression assessment panel",
        },
        "subject": {"reference": "Patient/pat-1"},
        "authoredOn": "2026-01-15",
        "requester": {"reference": fx.USER},
    }
    from fhir.resources.R4B.servicerequest import ServiceRequest

    ServiceRequest.model_validate(resource)


def test_suggestions_only_for_unknown_criteria_and_not_repeated() -> None:
    met_with_suggestion = fx.ResultWithSuggestion(
        "m", fx.REQ, "Met one", "q", Status.MET, suggestion=fx.PHQ9_SUGGESTION
    )
    twice = replace(fx.SEVERITY_UNKNOWN, id="again")
    mapping_style = fx.ResultWithSuggestion(
        "map",
        fx.REQ,
        "Mapping",
        "q",
        Status.UNKNOWN,
        missing="m",
        suggestion={
            "label": "Order HAM-D",
            "resource": "ServiceRequest",
            "code": {"system": "http://loinc.org", "code": "48542-5"},
        },
    )
    wrong_type = fx.ResultWithSuggestion(
        "w",
        fx.REQ,
        "Wrong",
        "q",
        Status.UNKNOWN,
        missing="m",
        suggestion=fx.FakeSuggestion("Med", "MedicationRequest", {"system": "s", "code": "c"}),
    )
    decision = replace(
        fx.documentation_needed(), criteria=(met_with_suggestion, fx.SEVERITY_UNKNOWN, twice, mapping_style, wrong_type)
    )
    card = only_card(decision)
    assert [s["label"] for s in card["suggestions"]] == ["Order a PHQ-9 depression assessment", "Order HAM-D"]
    assert conformance_problems(respond([decision])) == []
    no_suggestions = only_card(fx.blocked())
    assert "suggestions" not in no_suggestions and "selectionBehavior" not in no_suggestions


def test_uuids_are_deterministic_and_depend_on_hook_instance() -> None:
    first = respond(list(ALL.values()))
    again = respond(list(ALL.values()))
    other = respond(list(ALL.values()), hook_instance=fx.OTHER_HOOK)
    assert first == again
    ids = [c["uuid"] for c in first["cards"]]
    assert ids == [c["uuid"] for c in again["cards"]]
    assert not set(ids) & {c["uuid"] for c in other["cards"]}
    assert first["cards"][1]["suggestions"][0]["uuid"] != other["cards"][1]["suggestions"][0]["uuid"]


def test_same_policy_and_orders_twice_still_unique_uuids() -> None:
    response = respond([fx.likely_authorized(), fx.documentation_needed()])
    assert len({c["uuid"] for c in response["cards"]}) == 2
    assert conformance_problems(response) == []


def test_card_extension_carries_decision_without_empty_values() -> None:
    ext = only_card(fx.no_policy())["extension"]["ketamine-cds.decision"]
    assert ext == {
        "outcome": "no-policy",
        "orders": ["MedicationRequest/mr-ketamine"],
        "program": "payer-not-handled",
        "mappingVersion": "ms-0123456789ab",
        "coverage": "Coverage/cov-other",
    }
    crit = only_card(fx.likely_authorized())["extension"]["ketamine-cds.decision"]["criteria"]
    assert {
        "id": "exclusion-8-aneurysm-avm",
        "kind": "exclusion",
        "status": "not-met",
        "evidence": ["Condition/avm1", "DocumentReference/clear1"],
        "cleared": True,
    } in crit


def test_detail_stays_under_6kb_for_huge_decisions() -> None:
    many = tuple(
        CriterionResult(
            f"c{i}",
            fx.REQ if i % 2 else fx.EXC,
            f"Criterion number {i} " + "words " * 12,
            "q",
            Status.UNKNOWN if i % 3 == 0 else Status.MET,
            evidence=tuple(
                fx.ev(f"Observation/o{i}-{j}", date="2025-01-01", code="LOINC 1-1", value="7") for j in range(6)
            ),
            missing=f"Document item {i} " + "in detail " * 6,
        )
        for i in range(60)
    )
    decision = replace(fx.documentation_needed(), criteria=many)
    detail = only_card(decision)["detail"]
    assert len(detail.encode()) <= DETAIL_MAX_BYTES
    assert conformance_problems(respond([decision])) == []


def test_medium_decision_keeps_every_missing_text_when_shortened() -> None:
    many = tuple(
        CriterionResult(
            f"c{i}",
            fx.REQ,
            f"Criterion {i} " + "words " * 10,
            "q",
            Status.UNKNOWN if i < 8 else Status.MET,
            evidence=tuple(fx.ev(f"Observation/o{i}-{j}", date="2025-01-01", code="LOINC 1-1") for j in range(5)),
            missing=f"Document item {i}.",
        )
        for i in range(30)
    )
    detail = only_card(replace(fx.documentation_needed(), criteria=many))["detail"]
    assert len(detail.encode()) <= DETAIL_MAX_BYTES
    for i in range(8):
        assert f"Document item {i}." in detail


# --------------------------------------------------------------------------------------------- configuration


def test_configuration_options_are_crd_shaped() -> None:
    codes = [o["code"] for o in CONFIGURATION_OPTIONS]
    assert codes == ["coverage-info", "guideline", "off-guideline", "max-cards"]
    assert len({o["name"] for o in CONFIGURATION_OPTIONS}) == 4
    assert len({o["description"] for o in CONFIGURATION_OPTIONS}) == 4
    for option in CONFIGURATION_OPTIONS:
        assert set(option) == {"code", "type", "name", "description", "default"}
        assert option["type"] in ("boolean", "integer")
        expected = bool if option["type"] == "boolean" else int
        assert type(option["default"]) is expected
    assert set(TOPIC_BY_OUTCOME.values()) <= set(codes)  # an option for every card type used


def test_coverage_info_false_drops_system_actions_and_no_policy_cards() -> None:
    response = respond(list(ALL.values()), configuration={"coverage-info": False})
    assert response["systemActions"] == []
    assert len(response["cards"]) == 7
    assert all(c["extension"]["ketamine-cds.decision"]["outcome"] != "no-policy" for c in response["cards"])


def test_topic_false_suppresses_those_cards_only() -> None:
    response = respond(list(ALL.values()), configuration={"guideline": False})
    outcomes = {c["extension"]["ketamine-cds.decision"]["outcome"] for c in response["cards"]}
    assert outcomes == {"criteria-not-met", "blocked", "not-covered", "no-policy"}
    assert response["systemActions"]  # cards off does not switch coverage information off
    response = respond(list(ALL.values()), configuration={"guideline": False, "off-guideline": False})
    assert [c["extension"]["ketamine-cds.decision"]["outcome"] for c in response["cards"]] == ["no-policy"]
    response = respond([fx.blocked()], configuration={"off-guideline": False})
    assert response["cards"] == [] and len(response["systemActions"]) == 2


def test_max_cards_keeps_warnings_first_in_original_order() -> None:
    decisions = list(ALL.values())
    one = respond(decisions, configuration={"max-cards": 1})
    assert len(one["cards"]) == 1
    assert one["cards"][0]["indicator"] == "warning"
    assert one["cards"][0]["extension"]["ketamine-cds.decision"]["outcome"] == "criteria-not-met"
    four = respond(decisions, configuration={"max-cards": 4})
    assert [c["extension"]["ketamine-cds.decision"]["outcome"] for c in four["cards"]] == [
        "likely-authorized",
        "criteria-not-met",
        "blocked",
        "not-covered",
    ]
    assert respond(decisions, configuration={"max-cards": 0})["cards"] == []
    assert len(one["systemActions"]) == len(respond(decisions)["systemActions"])
    full = respond(decisions)
    assert [c["uuid"] for c in four["cards"]] == [full["cards"][i]["uuid"] for i in (0, 2, 3, 4)]


@pytest.mark.parametrize(
    "configuration",
    [
        None,
        {},
        "not a mapping",
        {"coverage-info": "false", "guideline": 0, "off-guideline": None, "max-cards": "1"},
        {"max-cards": True},
        {"max-cards": -3},
        {"max-cards": 2.5},
        {"unknown-option": False, "alt-drug": True},
    ],
)
def test_unsupported_configuration_is_ignored(configuration: Any) -> None:
    decisions = list(ALL.values())
    assert respond(decisions, configuration=configuration) == respond(decisions)
