"""Observation reading fast paths: each pinned against what the reference reading gives."""

from __future__ import annotations

from typing import Any

from fhir_mappings.reading.values import own_value, readings


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
