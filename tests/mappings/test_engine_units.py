"""The rule language's three-valued semantics, and the loaders' start-up errors (file, item, reason)."""

from __future__ import annotations

import textwrap
from datetime import date
from pathlib import Path

import pytest

from fhir_mappings.facts import FactError, FactLibrary
from fhir_mappings.mappings import load_engine
from fhir_mappings.model import Evidence, Fact, FactState
from fhir_mappings.policy import PolicyError, load_policy
from fhir_mappings.rules import CompileContext, Item, RuleError, compile_rule

TODAY = date(2026, 1, 15)


class Facts:
    """A FactSource over hand-made facts."""

    today = TODAY

    def __init__(self, **facts: Fact) -> None:
        self.facts = facts

    def fact(self, name: str) -> Fact:
        return self.facts[name]


def items(*fields: dict, days_ago: int = 1) -> tuple[Item, ...]:
    return tuple(
        Item(Evidence(f"Observation/{n}"), date=date.fromordinal(TODAY.toordinal() - days_ago), fields=f)
        for n, f in enumerate(fields)
    )


def present(*fields: dict, complete: bool = True, days_ago: int = 1) -> Fact:
    its = items(*fields, days_ago=days_ago)
    return Fact("f", FactState.PRESENT, its, tuple(i.evidence for i in its), "", complete)


ABSENT = Fact("f", FactState.ABSENT, ())
UNAVAILABLE = Fact("f", FactState.UNAVAILABLE, (), (), "", False)
CTX = CompileContext(frozenset({"f", "g"}), {"four": 4, "window": 30}, frozenset({"vs"}), "test")


def truth(rule: dict, **facts: Fact) -> bool | None:
    return compile_rule(rule, CTX).evaluate(Facts(**facts)).value


# --- three-valued logic --------------------------------------------------------------------------------
def test_exists_is_false_only_over_completely_read_data() -> None:
    rule = {"exists": "f"}
    assert truth(rule, f=present({})) is True
    assert truth(rule, f=ABSENT) is False
    assert truth(rule, f=UNAVAILABLE) is None
    assert truth({"exists": "f", "absent": "unknown"}, f=ABSENT) is None  # the policy asks for positive documentation


def test_item_conditions_with_missing_fields_are_unknown_not_false() -> None:
    rule = {"exists": "f", "where": {"field": "adherence", ">=": 0.8}}
    assert truth(rule, f=present({"adherence": 0.9})) is True
    assert truth(rule, f=present({"adherence": 0.5})) is False
    assert truth(rule, f=present({"adherence": None})) is None
    assert (
        truth({"exists": "f", "where": {"field": "adherence", "present": False}}, f=present({"adherence": None}))
        is True
    )


def test_count_decides_only_when_every_completion_of_the_unknowns_agrees() -> None:
    at_least_four = {"count": "f", "where": {"field": "ok", "is": True}, ">=": "@four"}
    assert truth(at_least_four, f=present(*[{"ok": True}] * 4)) is True
    assert truth(at_least_four, f=present(*[{"ok": True}] * 3, {"ok": False})) is False
    assert truth(at_least_four, f=present(*[{"ok": True}] * 3, {"ok": None})) is None  # the 4th may qualify
    assert truth(at_least_four, f=present(*[{"ok": True}] * 3, complete=False)) is None  # more may exist
    fewer = {"count": "f", "where": {"field": "ok", "is": True}, "<": 4}
    assert truth(fewer, f=present(*[{"ok": True}] * 3, {"ok": False})) is True
    assert truth(fewer, f=present(*[{"ok": True}] * 3, complete=False)) is None


def test_distinct_counts_values_of_a_field() -> None:
    two_classes = {"distinct": "f", "field": "class", ">=": 2}
    assert truth(two_classes, f=present({"class": "SSRI"}, {"class": "SSRI"}, {"class": "SNRI"})) is True
    assert truth(two_classes, f=present({"class": "SSRI"}, {"class": "SSRI"})) is False
    unknown_class = present({"class": "SSRI"}, {"class": None})
    assert truth(two_classes, f=unknown_class) is None


def test_windows_latest_and_kleene_combinators() -> None:
    recent = {"exists": "f", "where": {"within_days": "@window"}}
    assert truth(recent, f=present({}, days_ago=29)) is True
    assert truth(recent, f=present({}, days_ago=31)) is False
    latest_high = {"latest": "f", "then": {"field": "value", ">": 160}}
    assert truth(latest_high, f=present({"value": 170})) is True
    assert truth({"all": [{"exists": "f"}, {"exists": "g"}]}, f=present({}), g=UNAVAILABLE) is None
    assert truth({"all": [{"exists": "f"}, {"exists": "g"}]}, f=ABSENT, g=UNAVAILABLE) is False
    assert truth({"any": [{"exists": "f"}, {"exists": "g"}]}, f=present({}), g=UNAVAILABLE) is True
    assert truth({"not": {"exists": "g"}}, g=UNAVAILABLE) is None


def test_after_requires_items_dated_after_another_facts_latest_item() -> None:
    condition = Fact("g", FactState.PRESENT, items({}, days_ago=10))
    early = present({}, days_ago=20)
    late = present({}, days_ago=5)
    rule = {"exists": "f", "after": {"fact": "g"}}
    assert truth(rule, f=early, g=condition) is False
    assert truth(rule, f=late, g=condition) is True


# --- compile errors name the location -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"exists": "nope"}, "unknown fact 'nope'"),
        ({"count": "f", ">=": "@missing"}, "unknown threshold '@missing'"),
        ({"exists": "f", "where": {"code_in": "zz"}}, "unknown value set 'zz'"),
        ({"exists": "f", "wehre": {}}, "unexpected key(s) wehre"),
        ({"distinct": "f", ">=": 2}, "'distinct' needs 'field'"),
        ({"latest": "f"}, "'latest' needs 'then'"),
        ({"count": "f", ">=": 1, "<": 3}, "exactly one comparison"),
    ],
)
def test_rule_errors_name_the_place(rule: dict, message: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_rule(rule, CTX, "policy.yaml criterion x.met_when")
    assert message in str(info.value) and "criterion x.met_when" in str(info.value)


# --- the policy loader -------------------------------------------------------------------------------------
POLICY = """\
policy: {id: test-policy, payer: Test Payer, number: Policy 1, title: Test, url: "https://example.org/p",
         applies_to: [ketamine-administration]}
criteria:
  - id: r1
    kind: requirement
    title: Age
    quote: "Members 18 years of age or older."
    how: Patient.birthDate.
    met_when: {value: age_years, ">=": 18}
    ask: Record the date of birth.
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "test-policy.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def shared() -> FactLibrary:
    return load_engine().facts


def test_a_valid_policy_loads(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, POLICY), shared())
    assert policy.id == "test-policy" and [c.id for c in policy.criteria] == ["r1"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("value: age_years", "value: age_in_years"), "unknown fact 'age_in_years'"),
        (('    quote: "Members 18 years of age or older."\n', ""), "missing key(s) quote"),
        (("    ask: Record the date of birth.\n", ""), "must say what to document"),
        (("kind: requirement", "kind: exclusion"), "an exclusion needs holds_when"),
        (('url: "https://example.org/p"', 'url: "http://example.org/p"'), "absolute https URL"),
        (("    how: Patient.birthDate.\n", "    how: Patient.birthDate.\n    hwo: typo\n"), "unexpected key(s) hwo"),
    ],
)
def test_policy_errors_name_file_item_and_reason(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    text = POLICY.replace(*change)
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, text), shared())
    assert message in str(info.value) and "test-policy.yaml" in str(info.value)


def test_policy_local_facts_are_checked_too(tmp_path: Path) -> None:
    bad_path = (
        POLICY
        + 'facts:\n  weight:\n    resource: Observation\n    valueset: obs_body_weight\n    value: "$.valueQuantity["\n'
    )
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, bad_path), shared())
    assert "invalid jsonpath" in str(info.value) and "weight" in str(info.value)
    bad_valueset = POLICY + "facts:\n  weight:\n    resource: Observation\n    valueset: obs_weigth\n"
    with pytest.raises(PolicyError) as info:
        load_policy(write(tmp_path, bad_valueset), shared())
    assert "unknown value set 'obs_weigth'" in str(info.value)


def test_fact_library_refuses_unknown_derivations_and_parameters(tmp_path: Path) -> None:
    library = shared()
    with pytest.raises(FactError, match="unknown derivation 'age_in_days'"):
        library.extended({"x": {"derive": "age_in_days"}}, "local.yaml")
    with pytest.raises(FactError, match="missing parameter"):
        library.extended({"x": {"derive": "blood_pressures", "params": {"panel": "obs_bp_panel"}}}, "local.yaml")
