"""The compiled yes/no shape walk (`is_readable`) agrees with the detailed one (`_problems`) everywhere.

The gatherer asks `is_readable` of every resource and builds the detailed problem list only for the ones it
refuses, so the two must never disagree: a lenient walk would let a malformed resource reach the facts, a strict
one would mark a readable resource unreadable. Pinned on every resource the project ships (sandbox patients,
fidelity corpus, policy fixture cases), on those resources mutated the way the reliability fuzzers break
requests, and on resources generated from the R4 element definitions of every type the service reads.
"""

from __future__ import annotations

import copy
import json
from collections import UserDict
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fhir_mappings.resource_shapes import (
    _BOOLEAN,
    _DECIMAL,
    _INTEGER,
    _RESOURCE,
    _STRING,
    _Element,
    _elements,
    _model_of_complex,
    _problems,
    _resource_model,
    is_readable,
    shape_problems,
    warm_up,
)
from tests.reliability.fuzz import JSON_VALUES, WRONG_TYPES, mutate

ROOT = Path(__file__).resolve().parents[2]
CORPUS_FILES = (
    "sandbox/patients/*.json",
    "tests/fidelity/records/*.json",
    "fhir_mappings/policies/*.cases/*.json",
)


def _collect(node: Any, found: dict[str, dict[str, Any]]) -> None:
    """Every object with a string resourceType, at any depth (bundles, their entries, contained, drafts)."""
    if isinstance(node, dict):
        if isinstance(node.get("resourceType"), str):
            found.setdefault(json.dumps(node, sort_keys=True), node)
        for value in node.values():
            _collect(value, found)
    elif isinstance(node, list):
        for value in node:
            _collect(value, found)


def _corpus() -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for pattern in CORPUS_FILES:
        for path in sorted(ROOT.glob(pattern)):
            _collect(json.loads(path.read_text()), found)
    return list(found.values())


RESOURCES = _corpus()
TYPES = sorted({r["resourceType"] for r in RESOURCES if _resource_model(r["resourceType"]) is not None})


def _reference_readable(resource: Any) -> bool:
    """The detailed walk's verdict, with a limit high enough that the yes/no walk cannot stop it early."""
    return not _problems(resource, 1_000)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            out.extend(_paths(value, (*prefix, index)))
    return out


def test_shipped_resources_are_judged_alike() -> None:
    assert len(RESOURCES) > 2_000 and len(TYPES) > 20
    verdicts = [is_readable(resource) for resource in RESOURCES]
    assert verdicts == [_reference_readable(resource) for resource in RESOURCES]
    assert sum(verdicts) > 0.9 * len(RESOURCES)  # the corpus is mostly well-formed: the yes path is exercised


@settings(max_examples=600, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=len(RESOURCES) - 1),
    mutations=st.lists(
        st.tuples(
            st.integers(min_value=0),
            st.sampled_from(["replace", "replace", "delete", "wrap", "unwrap", "null"]),
            WRONG_TYPES | JSON_VALUES,
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_mutated_resources_are_judged_alike(index: int, mutations: list[tuple[int, str, Any]]) -> None:
    resource = copy.deepcopy(RESOURCES[index])
    for pick, op, value in mutations:
        paths = _paths(resource)
        if not paths:
            break
        path = paths[pick % len(paths)]
        node: Any = resource
        for step in path[:-1]:
            node = node[step]
        mutate(resource, path, op, node[path[-1]], lambda value=value: value)
    verdict = is_readable(resource)
    event(f"readable: {verdict}")
    assert verdict == _reference_readable(resource)
    assert shape_problems(resource) == ([] if verdict else _problems(resource, 3))


# -- resources generated from the element definitions ---------------------------------------------------

_PRIMITIVES: dict[str, st.SearchStrategy[Any]] = {
    _STRING: st.text(max_size=4),
    _BOOLEAN: st.booleans(),
    _INTEGER: st.integers(min_value=-5, max_value=5),
    _DECIMAL: st.integers(min_value=-5, max_value=5) | st.floats(allow_nan=False, allow_infinity=False),
}


def _value(draw: st.DrawFn, element: _Element, depth: int) -> Any:
    """A value for one element: mostly of the R4 shape (arrays with nulls among primitives), sometimes not."""
    if draw(st.integers(0, 9)) == 0:
        return draw(WRONG_TYPES | JSON_VALUES)
    if element.is_list and draw(st.integers(0, 9)) > 0:
        items = []
        for _ in range(draw(st.integers(0, 3))):
            items.append(None if draw(st.integers(0, 9)) == 0 else _item(draw, element, depth))
        return items
    return _item(draw, element, depth)


def _item(draw: st.DrawFn, element: _Element, depth: int) -> Any:
    if element.kind == "complex":
        return _object(draw, _model_of_complex(element.model), depth - 1)
    if element.kind == _RESOURCE:
        return _resource(draw, depth - 1)
    return draw(_PRIMITIVES[element.kind])


def _object(draw: st.DrawFn, model: Any, depth: int) -> dict[str, Any]:
    elements = _elements(model)
    nested = ("complex", _RESOURCE)
    names = sorted(k for k, e in elements.items() if depth > 0 or e.kind not in nested)
    value: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)) if names else []:
        value[name] = _value(draw, elements[name], depth)
    if draw(st.integers(0, 4)) == 0:  # an element R4 does not define, or a primitive extension: never judged
        value[draw(st.sampled_from(["_status", "zzUnknown", "fhir_comments"]))] = draw(JSON_VALUES)
    return value


def _resource(draw: st.DrawFn, depth: int) -> dict[str, Any]:
    resource_type = draw(st.sampled_from(TYPES))
    resource = {"resourceType": resource_type, **_object(draw, _resource_model(resource_type), depth)}
    if draw(st.booleans()):
        resource["id"] = draw(st.sampled_from(["a-1", "x"]) | WRONG_TYPES)
    return resource


@st.composite
def generated_resources(draw: st.DrawFn) -> dict[str, Any]:
    return _resource(draw, draw(st.integers(1, 3)))


@settings(max_examples=600, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resource=generated_resources())
def test_generated_resources_are_judged_alike(resource: dict[str, Any]) -> None:
    verdict = is_readable(resource)
    event(f"readable: {verdict}")
    assert verdict == _reference_readable(resource)


# -- edges ----------------------------------------------------------------------------------------------


def test_booleans_are_not_numbers_and_nulls_only_fill_primitive_arrays() -> None:
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
        {**base, "valueInteger": 1.0},
        {**base, "valueQuantity": {"value": 2}},
        {**base, "contained": [{"resourceType": "Patient", "id": 3}]},
        {**base, "contained": [{"resourceType": "Nope"}]},
        {**base, "contained": [None]},
        {"resourceType": "Patient", "name": [{"given": ["A", None]}]},
        {"resourceType": "Patient", "name": [{"given": ["A", 1]}]},
        {"resourceType": "Patient", "name": {"given": ["A"]}},
        {"resourceType": "Patient", "_birthDate": {"extension": "not judged"}, "zz": [1]},
    ]
    verdicts = [is_readable(case) for case in cases]
    assert verdicts == [_reference_readable(case) for case in cases]
    assert verdicts[:4] == [False, False, False, True]
    assert verdicts[8:] == [False, True, False, False, False, True, False, False, True]


class _Text(str):
    pass


class _Object(UserDict):  # a mapping that is no dict: FHIR JSON never parses to one
    pass


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Patient", "gender": _Text("male")},
        {"resourceType": "Patient", "name": ({"family": "F"},)},
        {"resourceType": "Patient", "name": [_Object(family="F")]},
        {"resourceType": "Patient", "maritalStatus": _Object(text="x")},
        {"resourceType": _Text("Patient"), "id": _Text("p")},
        {"resourceType": "Patient", "zz": (1, 2)},
        _Object(resourceType="Patient"),
        ["Patient"],
        None,
    ],
)
def test_values_the_json_parser_never_makes_are_judged_alike(resource: Any) -> None:
    assert is_readable(resource) == _reference_readable(resource)


def test_warm_up_compiles_what_first_use_would() -> None:
    resource = {"resourceType": "CarePlan", "status": "active", "activity": [{"detail": {"code": "x"}}]}
    before = is_readable(resource)
    warm_up(["CarePlan", "NotAType"])
    assert is_readable(resource) is before is _reference_readable(resource) is False


def test_client_sent_resource_types_cannot_grow_the_model_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """A type name that is no R4B module is refused without an import attempt, and the cache stays bounded."""
    import importlib

    from fhir_mappings import resource_shapes

    imported: list[str] = []
    real_import = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real_import(name, *a))
    for n in range(3000):
        name = "Zq" + "".join(chr(97 + (n >> (4 * k)) % 26) for k in range(4))
        assert not resource_shapes.is_readable({"resourceType": name})
    assert imported == []
    assert resource_shapes._resource_model.cache_info().currsize <= 512
    assert resource_shapes.is_readable({"resourceType": "Observation", "status": "final", "code": {"text": "x"}})
