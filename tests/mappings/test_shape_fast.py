"""The yes/no shape walk (`_object_ok`) agrees with the detailed one on every shipped resource and on mutations."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_mappings.resource_shapes import _check_object, _object_ok, _resource_model

ROOT = Path(__file__).resolve().parents[2]


def _resources() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in sorted(ROOT.glob("sandbox/patients/*.json")):
        data = json.loads(path.read_text())
        for entry in (data.get("bundle") or {}).get("entry", []):
            if isinstance(entry.get("resource"), dict):
                found.append(entry["resource"])
    return found


RESOURCES = _resources()


def _detailed_ok(resource: dict[str, Any]) -> bool:
    problems: list[str] = []
    _check_object(resource, _resource_model(resource["resourceType"]), resource["resourceType"], problems, 20)
    return not problems


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.extend(_paths(value, (*prefix, index)))
    return out


def test_shipped_resources_are_readable_both_ways() -> None:
    assert len(RESOURCES) > 500
    for resource in RESOURCES:
        model = _resource_model(resource["resourceType"])
        assert _object_ok(resource, model) == _detailed_ok(resource), resource.get("id")


@settings(max_examples=500, derandomize=True, deadline=None)
@given(
    index=st.integers(min_value=0, max_value=len(RESOURCES) - 1),
    pick=st.integers(min_value=0),
    value=st.sampled_from([None, "x", 1, 1.5, True, [], [None], ["x"], [{}], {}, {"coding": "x"}, {"reference": 1}]),
)
def test_mutated_resources_are_judged_alike(index: int, pick: int, value: Any) -> None:
    resource = copy.deepcopy(RESOURCES[index])
    paths = [p for p in _paths(resource) if p[0] not in ("resourceType", "id")]  # checked before either walk
    path = paths[pick % len(paths)]
    node = resource
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    model = _resource_model(resource["resourceType"])
    assert _object_ok(resource, model) == _detailed_ok(resource)


def test_booleans_are_not_numbers_and_nulls_only_fill_primitive_arrays() -> None:
    model = _resource_model("Observation")
    base = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    cases = [
        {**base, "valueInteger": True},
        {**base, "valueQuantity": {"value": False}},
        {**base, "valueBoolean": 1},
        {**base, "valueQuantity": {"value": 1.5}},
        {**base, "category": [None]},
        {**base, "code": {"coding": [None]}},
        {**base, "code": {"text": None}},
        {**base, "note": [{"text": "n"}], "interpretation": [{"text": None}]},
    ]
    verdicts = [_object_ok(case, model) for case in cases]
    assert verdicts == [_detailed_ok(case) for case in cases]
    assert verdicts[:3] == [False, False, False] and verdicts[3] is True
