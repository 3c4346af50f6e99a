"""The gatherer's fast paths find exactly what jsonpath-ng and the plain code they replace find.

Reference resolution walks the resolve rules' paths directly over the JSON (`_walk_references`) instead of
through jsonpath-ng, from a per-type plan compiled once; the other-patient filter and the window dates have
fast paths. Which references are followed, in which order, decides which queries are made and in what batches,
so each fast path is compared with the reference it replaces: jsonpath-ng itself, and verbatim copies of the
replaced functions below, on every resource the project ships and on generated JSON.
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonpath_ng.ext import parse as parse_jsonpath

from cds_service import prefetch
from fhir_mappings.queries import DEFAULT_PATH, QuerySet, ResolveRule, load_queries
from tests.reliability.fuzz import JSON_VALUES

ROOT = Path(__file__).resolve().parents[2]


class _AnyCodes:
    def search_codes(self, vs_ids: Iterable[str]) -> list[tuple[str, str]]:
        return [("http://loinc.org", f"code-{vs_id}") for vs_id in vs_ids]


QUERIES: QuerySet = load_queries(_AnyCodes(), DEFAULT_PATH)
SHIPPED_PATHS = sorted({text for rule in QUERIES.resolve_rules for text in rule.path_texts})
# `$.a-b`: one field, `a-b`, that the old top-element skip read as `a` (kept: a resource without `a` is skipped)
DIRECT_PATHS = [*SHIPPED_PATHS, "$", "$[*]", "$.*", "$.a.reference", "$.performer[*][*]", "$.performer.actor", "$.a-b"]
OTHER_PATHS = ["$..reference", "$.performer[0]", "$.location[?(@.reference)]", "$['performer','location'][*]"]


# -- the replaced code, verbatim: the references the fast paths must equal ---------------------------------

_TOP_FIELD = re.compile(r"^\$\.([A-Za-z_][A-Za-z0-9_]*)")
_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")


def reference_references(
    sources: Iterable[tuple[dict, bool]], rules_by_type: Mapping[str, list[ResolveRule]], now: datetime
) -> Iterator[str]:
    today = now.date()
    for resource, is_draft in sources:
        resource_type = resource.get("resourceType")
        rules = rules_by_type.get(resource_type) if isinstance(resource_type, str) else None
        if not rules:
            continue
        dated = False
        resource_date: date | None = None
        for rule in rules:
            if rule.draft_orders_only and not is_draft:
                continue
            if rule.within_days is not None:
                if not dated:
                    resource_date, dated = prefetch._resource_date(resource), True
                if resource_date is not None and resource_date < today - timedelta(days=rule.within_days):
                    continue
            for path, text in zip(rule.paths, rule.path_texts, strict=True):
                top = _TOP_FIELD.match(text)
                if top and top.group(1) not in resource:
                    continue
                for match in path.find(resource):
                    reference = prefetch._reference_of(match)
                    if reference:
                        yield reference


def reference_rules_by_type(queries: QuerySet) -> dict[str, list[ResolveRule]]:
    rules_by_type: dict[str, list[ResolveRule]] = {}
    for rule in queries.resolve_rules:
        for rtype in rule.from_types:
            rules_by_type.setdefault(rtype, []).append(rule)
    return rules_by_type


def reference_other_patient(resource: Mapping[str, Any], patient_id: str) -> bool:
    if resource.get("resourceType") == "Patient":
        return resource.get("id") != patient_id
    for element in ("subject", "patient", "beneficiary", "for"):
        ref = resource.get(element)
        target = ref.get("reference") if isinstance(ref, Mapping) else None
        if isinstance(target, str) and "Patient/" in target:
            return target.rstrip("/").split("/")[-1] != patient_id
    return False


def reference_parse_date(text: str) -> date | None:
    match = _PARTIAL_DATE.match(text)
    if not match:
        return None
    year, month, day = match.groups()
    try:
        if month is None:
            return date(int(year), 12, 31)
        if day is None:
            return date(int(year), int(month), calendar.monthrange(int(year), int(month))[1])
        return date(int(year), int(month), int(day))
    except ValueError:
        return None


# -- what the project ships -------------------------------------------------------------------------------


def _records() -> list[tuple[str, list[dict[str, Any]], list[dict[str, Any]], datetime]]:
    """(name, resources, draft orders, now) of every sandbox patient, fidelity record and policy fixture case."""
    records = []
    files = [
        *sorted(ROOT.glob("sandbox/patients/*.json")),
        *sorted(ROOT.glob("tests/fidelity/records/*.json")),
        *sorted(ROOT.glob("fhir_mappings/policies/*.cases/*.json")),
    ]
    for path in files:
        data = json.loads(path.read_text())
        bundle = data.get("bundle") if isinstance(data.get("bundle"), dict) else {}
        resources = [e["resource"] for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)]
        drafts = [d for d in data.get("draft_orders", []) if isinstance(d, dict)]
        when = data.get("now") or data.get("anchor_date") or "2026-11-01"
        now = datetime.fromisoformat(when[:10]).replace(hour=12, tzinfo=UTC)
        if resources or drafts:
            records.append((path.name, resources, drafts, now))
    return records


RECORDS = _records()


def test_every_shipped_path_is_walked_directly() -> None:
    for text in DIRECT_PATHS:
        assert prefetch._direct_steps(parse_jsonpath(text)) is not None, text
    for text in OTHER_PATHS:
        assert prefetch._direct_steps(parse_jsonpath(text)) is None, text


def test_shipped_records_give_the_same_references_in_the_same_order() -> None:
    assert len(RECORDS) > 100
    plan = prefetch._reference_plan(QUERIES.resolve_rules)
    old_rules = reference_rules_by_type(QUERIES)
    total = 0
    for name, resources, drafts, now in RECORDS:
        for when in (now, now + timedelta(days=500), now + timedelta(days=3_000)):  # inside and outside windows
            sources = [*((r, False) for r in resources), *((d, True) for d in drafts)]
            expected = list(reference_references(sources, old_rules, when))
            found = prefetch._references(resources, plan, when) + prefetch._references(drafts, plan, when, drafts=True)
            assert found == expected, name
            total += len(found)
    assert total > 1_000  # the corpus does exercise the rules


def test_shipped_resources_are_walked_as_jsonpath_finds() -> None:
    resources = [r for _, rs, ds, _ in RECORDS for r in (*rs, *ds)]
    for text in DIRECT_PATHS:
        path = parse_jsonpath(text)
        finder = prefetch._reference_finder(path)
        for resource in resources:
            assert finder(resource) == prefetch._jsonpath_references(path, resource), (text, resource.get("id"))


# -- generated JSON ---------------------------------------------------------------------------------------

NAMES = st.sampled_from(["reference", "display", "actor", "individual", "location", "member", "performer", "x"])
REFERENCE_TEXT = st.sampled_from(["Practitioner/a", "Organization/o-1", "", "#c", "urn:uuid:1", "x"]) | st.text()
LEAVES = JSON_VALUES | REFERENCE_TEXT | st.fixed_dictionaries({"reference": REFERENCE_TEXT | JSON_VALUES})
NODES = st.recursive(
    LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(NAMES, children, max_size=3),
    max_leaves=12,
)
TOP_FIELDS = sorted({m.group(1) for m in map(_TOP_FIELD.match, DIRECT_PATHS) if m} | {"a", "a-b"})
RESOURCES = st.dictionaries(st.sampled_from(TOP_FIELDS) | NAMES, NODES, max_size=4)


@settings(max_examples=800, derandomize=True, deadline=None)
@given(resource=RESOURCES, text=st.sampled_from(DIRECT_PATHS + OTHER_PATHS))
def test_generated_json_is_walked_as_jsonpath_finds(resource: dict[str, Any], text: str) -> None:
    path = parse_jsonpath(text)
    assert prefetch._reference_finder(path)(resource) == prefetch._jsonpath_references(path, resource)


RESOURCE_TYPES = st.sampled_from(sorted({t for rule in QUERIES.resolve_rules for t in rule.from_types}))
NOW = datetime(2026, 11, 1, 12, tzinfo=UTC)
WINDOWS = sorted({rule.within_days for rule in QUERIES.resolve_rules if rule.within_days is not None})
DATES = (
    st.sampled_from(["2026-10-30", "2025-01-01", "2019-06", "2024", "2026-11-01T08:00:00Z"])
    | st.text(max_size=12)
    | st.builds(  # on either side of each window's first day
        lambda days, late: (NOW - timedelta(days=days + late)).date().isoformat() + "T23:59:59Z",
        st.sampled_from(WINDOWS),
        st.integers(-1, 1),
    )
)


def _shaped(steps: tuple[str | None, ...], reference: Any) -> Any:
    """A value a direct path selects `reference` in: `("a", None, "b")` -> {"a": [{"b": {"reference": ...}}]}."""
    value: Any = {"reference": reference}
    for step in reversed(steps):
        value = [value] if step is None else {step: value}
    return value


RULE_PATHS: dict[str, list[tuple[str | None, ...]]] = {}
for _rule in QUERIES.resolve_rules:
    for _type in _rule.from_types:
        RULE_PATHS.setdefault(_type, []).extend(prefetch._direct_steps(p) or () for p in _rule.paths)


@st.composite
def rule_resources(draw: st.DrawFn) -> dict[str, Any]:
    """A resource of a type the rules read, holding references where some of their paths look, and dated near
    the windows' edges."""
    resource_type = draw(RESOURCE_TYPES)
    resource: dict[str, Any] = draw(RESOURCES)
    for steps in draw(st.lists(st.sampled_from(RULE_PATHS[resource_type]), max_size=3)):
        if steps:
            resource.update(_shaped(steps, draw(REFERENCE_TEXT)))
    date_field = draw(st.sampled_from(["period", "performedDateTime", "effectiveDateTime", "issued"]))
    when = draw(DATES)
    resource[date_field] = {"start": when} if date_field == "period" else when
    return {**resource, "resourceType": resource_type}


@settings(max_examples=500, derandomize=True, deadline=None)
@given(resources=st.lists(rule_resources(), max_size=6), drafts=st.booleans())
def test_generated_resources_give_the_same_references(resources: list[dict[str, Any]], drafts: bool) -> None:
    plan = prefetch._reference_plan(QUERIES.resolve_rules)
    expected = list(reference_references([(r, drafts) for r in resources], reference_rules_by_type(QUERIES), NOW))
    assert prefetch._references(resources, plan, NOW, drafts=drafts) == expected


def _rule(*texts: str, within_days: int | None = None) -> ResolveRule:
    paths = tuple(parse_jsonpath(text) for text in texts)
    return ResolveRule(("X",), paths, texts, draft_orders_only=False, within_days=within_days)


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "X", "a-b": {"reference": "Y/1"}},  # the old skip looked for `a`: still skipped
        {"resourceType": "X", "a": 1, "a-b": {"reference": "Y/1"}, "c": [{"reference": "Y/2"}]},
        {"resourceType": "X", "c": [{"d": [{"reference": "Y/3"}]}, {"reference": "Y/4"}], "date": "2026-10-31"},
        {"resourceType": "X", "c": {"reference": "Y/5"}, "date": "2020-01-01"},  # outside the window
    ],
)
def test_rules_outside_the_shipped_file_give_the_same_references(resource: dict[str, Any]) -> None:
    rules = (_rule("$.a-b", "$..reference"), _rule("$.c[*]", "$.c[0].d[*]", within_days=30))
    expected = list(reference_references([(resource, False)], {"X": list(rules)}, NOW))
    assert prefetch._references([resource], prefetch._reference_plan(rules), NOW) == expected
    assert expected  # each case finds something (the first through `$..reference` despite the skip)


PATIENT_REFERENCES = st.sampled_from(["Patient/p1", "Patient/p1/", "Patient/p2", "https://x/fhir/Patient/p1", "p1"])


@settings(max_examples=400, derandomize=True, deadline=None)
@given(
    resource=st.dictionaries(
        st.sampled_from(["resourceType", "id", "subject", "patient", "beneficiary", "for", "x"]),
        st.sampled_from(["Patient", "CareTeam", "p1", "p2"])
        | JSON_VALUES
        | st.fixed_dictionaries({"reference": PATIENT_REFERENCES | JSON_VALUES}),
        max_size=4,
    ),
    patient_id=st.sampled_from(["p1", "p1/", "p2"]),
)
def test_other_patients_are_told_apart_as_before(resource: dict[str, Any], patient_id: str) -> None:
    assert prefetch._other_patient(resource, patient_id) == reference_other_patient(resource, patient_id)


@settings(max_examples=600, derandomize=True, deadline=None)
@given(
    text=st.text(alphabet="0123456789-T:Z+\u0663 ", max_size=14)
    | st.dates().map(str)
    | st.datetimes().map(lambda d: d.isoformat())
    | st.sampled_from(
        ["2024-02-30", "2024-13-01", "0000-01-01", "2024-02", "2024", "2024-05-0", "\u0662\u0660\u0662\u0664-01-01"]
    )
)
def test_window_dates_are_read_as_before(text: str) -> None:
    assert prefetch._parse_date(text) == reference_parse_date(text)


@pytest.mark.parametrize("text", ["$.performer[*]", "$.requester", "$.participant[*].member"])
def test_a_single_reference_where_an_array_is_written_still_counts(text: str) -> None:
    """`[*]` over a single Reference selects its members; only the one named `reference` is a reference."""
    resource = {"performer": {"reference": "Practitioner/p", "display": "Dr P"}, "requester": {"reference": "X/1"},
                "participant": {"member": {"reference": "Practitioner/m"}}}  # fmt: skip
    path = parse_jsonpath(text)
    assert prefetch._reference_finder(path)(resource) == prefetch._jsonpath_references(path, resource)
