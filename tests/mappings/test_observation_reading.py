"""Observation reading fast paths: each pinned against what the reference reading gives."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_mappings.facts import FactContext, SelectFact
from fhir_mappings.mappings import Mappings, load_engine
from fhir_mappings.reading.values import own_value, readings
from fhir_mappings.record import Availability, PatientRecord, QueryOutcome


def _observation(**extra: Any) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": "o1", "code": {"coding": [{"code": "44261-6"}]}, **extra}


def test_own_value_holds_the_observation_itself_not_a_copy() -> None:
    # Facts memoise status verdicts by id(holder): a copy per reading would reuse ids of collected copies.
    observation = _observation(valueInteger=7)
    assert own_value(observation).holder is observation
    absent = _observation(dataAbsentReason={"text": "asked, declined"})
    assert own_value(absent).holder is absent
    assert own_value(_observation()).holder.get("id") == "o1"


def test_readings_of_a_plain_observation_hold_the_record_resource() -> None:
    observation = _observation(valueInteger=19)
    found = list(readings(observation, lambda concept: True))
    assert [(r.holder is observation, r.path, r.raw) for r in found] == [(True, "valueInteger", 19)]


# --- Observation facts: the per-code skip plan against reading every Observation -----------------------
LOINC = "http://loinc.org"
# Codes of shipped Observation value sets (PHQ-9 total and panel, pregnancy test, HAM-D, weight, BP parts),
# a code no fact selects, and text alone: the skip must decide exactly as `readings` would.
CODES = ["44261-6", "44249-1", "2106-3", "29463-7", "8480-6", "8462-4", "85354-9", "12345-0", "17-item HAM-D"]


def _concept(code: str) -> dict[str, Any]:
    return {"text": code} if " " in code else {"coding": [{"system": LOINC, "code": code}]}


observations_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "code": st.one_of(st.none(), st.sampled_from(CODES)),
            "value": st.one_of(st.none(), st.integers(0, 30)),
            "components": st.lists(
                st.tuples(st.sampled_from(CODES), st.one_of(st.none(), st.integers(0, 30))), max_size=3
            ),
            "status": st.sampled_from(["final", "preliminary", "entered-in-error"]),
        }
    ),
    max_size=8,
)


def _record(specs: list[dict[str, Any]], engine: Mappings) -> PatientRecord:
    resources: list[dict[str, Any]] = []
    for n, spec in enumerate(specs):
        observation: dict[str, Any] = {
            "resourceType": "Observation",
            "id": f"o{n}",
            "status": spec["status"],
            "effectiveDateTime": "2026-01-10",
        }
        if spec["code"] is not None:
            observation["code"] = _concept(spec["code"])
        if spec["value"] is not None:
            observation["valueInteger"] = spec["value"]
        components = [
            {"code": _concept(code), **({"valueInteger": value} if value is not None else {})}
            for code, value in spec["components"]
        ]
        if components:
            observation["component"] = components
        resources.append(observation)
    queries = {t: QueryOutcome(t, (t,), Availability.READ, "prefetch") for t in engine.queries.supplied_types()}
    return PatientRecord(
        patient_id="p", now=datetime(2026, 1, 15, 17, tzinfo=UTC), resources=resources, queries=queries
    )


@settings(max_examples=150, deadline=None)
@given(observations_strategy)
def test_observation_facts_skip_exactly_what_reading_every_observation_skips(specs: list[dict[str, Any]]) -> None:
    engine = load_engine()
    record = _record(specs, engine)
    for policy in engine.policies.values():
        names = [
            name
            for name, definition in policy.library.facts.items()
            if isinstance(definition, SelectFact) and definition.resource_type == "Observation"
        ]
        planned = FactContext(policy.library, record)
        reference = FactContext(policy.library, record)
        reference._plan = [(o, None) for o in record.of_type("Observation")]  # every Observation through readings
        for name in names:
            assert planned.fact(name) == reference.fact(name), name
