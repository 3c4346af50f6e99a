"""The validation layer's parts: positions, code checks, card-text numbers, threshold placeholders, loader errors."""

from __future__ import annotations

import pytest

from fhir_mappings.policy import PolicyError, expand_thresholds
from fhir_mappings.validation.codes import code_problem, luhn_ok, prefix_problem, verhoeff_ok
from fhir_mappings.validation.locate import locate
from fhir_mappings.validation.textcheck import check_texts, numbers_in
from fhir_mappings.validation.yamlpos import LocatedYAMLError, Position, load_located
from fhir_mappings.valuesets import CPT, HCPCS, ICD10CM, LOINC, NUCC, RXNORM, SNOMED


def test_positions_of_keys_values_and_missing_children() -> None:
    doc = load_located("a:\n  b: [1, {c: x}]\n  d: >-\n    folded\n    text 15 here\n", "f.yaml")
    assert doc.data == {"a": {"b": [1, {"c": "x"}], "d": "folded text 15 here"}}
    assert doc.position(("a", "b", 1, "c")) == Position(2, 14)
    assert doc.position(("a", "b"), key=True) == Position(2, 3)
    assert doc.position(("a", "missing", 3)) == Position(1, 1)  # nearest existing: the key 'a'
    assert doc.find(("a", "d"), "text 15") == Position(5, 5)


def test_duplicate_keys_and_syntax_errors_are_located() -> None:
    doc = load_located("x: 1\ny:\n  z: 2\n  z: 3\n", "f.yaml")
    assert doc.duplicates == [(("y", "z"), Position(4, 3), Position(3, 3))]
    with pytest.raises(LocatedYAMLError) as err:
        load_located("a: [1,\nb: 2\n", "f.yaml")
    assert err.value.position.line >= 2


def test_merge_keys_and_aliases() -> None:
    doc = load_located("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n", "f.yaml")
    assert doc.data["use"] == {"x": 1, "y": 3}


@pytest.mark.parametrize(
    ("system", "code", "problem"),
    [
        (ICD10CM, "F33.2", None),
        (ICD10CM, "f332", None),
        (ICD10CM, "F32.A", None),
        (ICD10CM, "F33.99", "not an ICD-10-CM code"),
        (ICD10CM, "33.2", "not a well-formed"),
        (LOINC, "44261-6", None),
        (LOINC, "44261-5", "check digit should be 6"),
        (LOINC, "LA6568-5", None),
        (LOINC, "44261", "not a well-formed LOINC"),
        (SNOMED, "47625008", None),
        (SNOMED, "47625009", "Verhoeff"),
        (SNOMED, "281000119103", None),  # an extension concept (partition 10)
        (SNOMED, "1234567013", "partition identifier"),  # check digit right, but a description id (01)
        (RXNORM, "238082", None),
        (RXNORM, "23808a", "RxNorm"),
        (CPT, "90791", None),
        (CPT, "0001F", None),
        (CPT, "9079", "CPT"),
        (HCPCS, "J3490", None),
        (HCPCS, "J349", "HCPCS"),
        (NUCC, "2084P0800X", None),
        (NUCC, "2084P0800", "NUCC"),
        ("urn:oid:1.2.3", "anything at all", None),
    ],
)
def test_code_checks(system: str, code: str, problem: str | None) -> None:
    found = code_problem(system, code)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_check_digit_algorithms_and_prefixes() -> None:
    assert luhn_ok("442616") and not luhn_ok("442615")
    assert verhoeff_ok("236") and not verhoeff_ok("237")  # the textbook Verhoeff example
    assert prefix_problem(ICD10CM, "F33") is None and prefix_problem(ICD10CM, "F") is None
    assert "starts no ICD-10-CM code" in (prefix_problem(ICD10CM, "U99") or "")


def test_numbers_said_in_card_texts() -> None:
    said = [(n.value, n.unit) for n in numbers_in("PHQ-9 ≥ 15 within the last 30 days, at least four trials, 1–3 days")]
    assert said == [(15.0, ""), (30.0, "days"), (4.0, ""), (1.0, "days"), (3.0, "days")]
    assert list(numbers_in("LOINC 44261-6, CPT 90791/90792, ICD-10-CM F33.2, ≥ {phq9_severe}, {=6} weeks")) == []


def test_texts_that_restate_or_contradict_a_threshold() -> None:
    thresholds = {"phq9_severe": 15, "window_days": 30, "min_adherence": 0.8, "min_trial_days": 42}
    rule = {
        "met_when": {
            "exists": "x",
            "where": {"all": [{"within_days": "@window_days"}, {"field": "v", ">=": "@phq9_severe"}]},
        }
    }
    item = {**rule, "ask": "A score ≥ 15 in the last 30 days."}
    reasons = [r for _, _, r in check_texts(item, thresholds)]
    assert len(reasons) == 2 and all("restates threshold" in r for r in reasons)
    item = {**rule, "ask": "A score ≥ 20 in the last {window_days} days."}
    (reason,) = [r for _, _, r in check_texts(item, thresholds)]
    assert "'≥ 20' disagrees" in reason and "phq9_severe = 15" in reason
    adherence = {"met_when": {"count": "t", "where": {"field": "a", ">=": "@min_adherence"}, ">=": 1}}
    (reason,) = [r for _, _, r in check_texts({**adherence, "how": "at least 80 % adherent"}, thresholds)]
    assert "{min_adherence:percent}" in reason
    weeks = {"met_when": {"count": "t", "where": {"field": "d", ">=": "@min_trial_days"}, ">=": 1}}
    (reason,) = [r for _, _, r in check_texts({**weeks, "ask": "trials of ≥ 6 weeks"}, thresholds)]
    assert "{min_trial_days:weeks}" in reason
    assert (
        list(check_texts({**rule, "ask": "≥ {phq9_severe} within {window_days} days; {=25} % better"}, thresholds))
        == []
    )
    assert list(check_texts({"ask": "≥ 15"}, thresholds)) == []  # no rule uses a threshold: nothing to compare


def test_placeholders_expand_and_unknown_ones_are_refused() -> None:
    thresholds = {"phq9_severe": 15, "min_adherence": 0.8, "min_trial_days": 42, "ich_recent_days": 182}
    text = "≥ {phq9_severe}; {min_adherence:percent} %; {min_trial_days:weeks} weeks; "
    text += "{ich_recent_days:months} months; {=6}"
    assert expand_thresholds(text, thresholds, "x") == "≥ 15; 80 %; 6 weeks; 6 months; 6"
    with pytest.raises(PolicyError, match="unknown threshold"):
        expand_thresholds("{phq9}", thresholds, "x")
    with pytest.raises(PolicyError, match="unknown unit"):
        expand_thresholds("{phq9_severe:days}", thresholds, "x")


def test_loader_messages_are_located() -> None:
    policy = load_located(
        "criteria:\n  - id: a\n    met_when: {exists: f}\n"
        "  - id: b\n    met_when:\n      all:\n        - {exists: g}\n",
        "p.yaml",
    )
    doc, path, reason = locate("p.yaml criterion b.met_when.all[0]: unknown fact 'g'", {"p.yaml": policy})
    assert doc is policy and path == ("criteria", 1, "met_when", "all", 0) and reason == "unknown fact 'g'"
    assert policy.position(path).line == 7
    queries = load_located("queries:\n  obs:\n    template: x\n", "queries.yaml")
    doc, path, _ = locate("query 'obs': template must be a relative FHIR URL", {"queries.yaml": queries})
    assert doc is queries and path == ("queries", "obs")
    vs = load_located("valuesets:\n  dx:\n    include:\n      - concepts:\n          - {code: X}\n", "d.yaml")
    doc, path, reason = locate("/x/d.yaml: value set 'dx': include[0].concepts[0]: bad code", {"d.yaml": vs})
    assert path == ("valuesets", "dx", "include", 0, "concepts", 0) and reason == "bad code"
