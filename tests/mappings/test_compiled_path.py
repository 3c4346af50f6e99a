"""The direct walk of plain paths gives exactly what jsonpath-ng gives, on every resource the project ships."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_mappings.facts import CompiledPath, FactLibrary
from fhir_mappings.mappings import load_engine

ROOT = Path(__file__).resolve().parents[2]


def _shipped_paths() -> list[CompiledPath]:
    engine = load_engine()
    library: FactLibrary = engine.facts
    found: dict[str, CompiledPath] = {}

    def collect(node: Any, depth: int = 0) -> None:
        if depth > 6:
            return
        if isinstance(node, CompiledPath):
            found.setdefault(node.text, node)
        elif isinstance(node, dict):
            for value in node.values():
                collect(value, depth + 1)
        elif isinstance(node, list | tuple | set | frozenset):
            for value in node:
                collect(value, depth + 1)
        elif hasattr(node, "__dataclass_fields__"):
            for name in node.__dataclass_fields__:
                collect(getattr(node, name), depth + 1)

    collect(library.facts)
    return list(found.values())


def _resources() -> Iterator[dict[str, Any]]:
    for path in sorted([*ROOT.glob("sandbox/patients/**/*.json"), *ROOT.glob("fhir_mappings/policies/*.cases/*")]):
        try:
            data = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        stack = [data]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("resourceType"), str):
                    yield node
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)


def _by_jsonpath(path: CompiledPath, resource: Any) -> list[Any]:
    return [m.value for m in path.expr.find(resource)]


def test_the_mappings_use_plain_paths_and_the_walk_agrees_on_every_shipped_resource() -> None:
    paths = _shipped_paths()
    assert len(paths) > 20 and sum(p.steps is not None for p in paths) > 20
    resources = list(_resources())
    assert len(resources) > 1000
    for path in paths:
        for resource in resources:
            assert path.values(resource) == _by_jsonpath(path, resource), (path.text, resource.get("id"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from("abc"), children, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(document=json_values, steps=st.lists(st.sampled_from([".a", ".b", "[*]", ".c"]), max_size=4))
def test_the_walk_agrees_with_jsonpath_on_any_json(document: Any, steps: list[str]) -> None:
    path = CompiledPath("$" + "".join(steps), "test")
    assert path.steps is not None
    assert path.values(document) == _by_jsonpath(path, document)


@pytest.mark.parametrize("text", ["$.a[0]", "$..code", "$.a[?(@.b == 1)]", "$.coding[*].`this`"])
def test_other_paths_still_go_through_jsonpath(text: str) -> None:
    path = CompiledPath(text, "test")
    assert path.steps is None
    assert path.values({"a": [{"b": 1}], "code": 2}) == _by_jsonpath(path, {"a": [{"b": 1}], "code": 2})
