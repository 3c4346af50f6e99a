"""Hypothesis strategies for hostile hook bodies, and the invariants every answer must keep.

Bodies are built as bytes, because much of what is tried is not something `json.dumps` would produce:
duplicate keys, 5,000-digit numbers, NaN, deep nesting, invalid UTF-8. Each strategy starts either from
nothing (random JSON, raw bytes) or from a valid request (`corpus`) and breaks one thing in it.
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from hypothesis import strategies as st

from tests.reliability import corpus

SERVICE_PATH = "/cds-services/ketamine-prior-auth"
FEEDBACK_PATH = SERVICE_PATH + "/feedback"

Path = tuple[str | int, ...]

# -- answers -------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What a fuzz run tried and got back, for the assertions and the printed figures."""

    bodies: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)

    def line(self, name: str) -> str:
        statuses = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return f"{name}: {self.bodies} bodies -> {statuses}"


def check_answer(status: int, content_type: str | None, data: bytes) -> Any:
    """The invariants of every answer: never 5xx, always JSON, an OperationOutcome on every 4xx."""
    assert status < 500, f"HTTP {status}: {data[:500]!r}"
    assert content_type is not None and content_type.startswith("application/json"), content_type
    body = json.loads(data)  # strict: an answer that is not JSON fails here
    if status >= 400:
        assert body.get("resourceType") == "OperationOutcome", body
        issues = body.get("issue")
        assert isinstance(issues, list) and issues, body
        for issue in issues:
            assert isinstance(issue.get("diagnostics"), str) and issue["diagnostics"], issue
            assert isinstance(issue.get("code"), str) and isinstance(issue.get("severity"), str), issue
    else:
        assert isinstance(body.get("cards"), list) or isinstance(body.get("stored"), int), body
    return body


def decision_outcomes(body: Any) -> list[str]:
    return [
        card.get("extension", {}).get("ketamine-cds.decision", {}).get("outcome", "?")
        for card in body.get("cards", [])
        if isinstance(card, dict)
    ]


# -- JSON values ---------------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
# Values of the wrong JSON type for almost any FHIR element or envelope field.
WRONG_TYPES = st.sampled_from(
    [None, True, False, 0, -1, 2**31, 1.5, "", "x", "2024-13-45", "Patient/", [], [None], [1, "a"], {}, {"a": 1}, [{}]]
)


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=True, allow_nan=False).encode()


# -- valid starting points -------------------------------------------------------------------------------


@cache
def _bases_text() -> dict[str, str]:
    crd_22 = corpus.hook_request(prefetch=corpus.full_prefetch())
    crd_22["extension"] = {"davinci-crd.requestedVersion": "2.2"}  # answered under CRD 2.2's rules and cards
    return {
        "ketamine-prefetch": json.dumps(corpus.hook_request(prefetch=corpus.full_prefetch())),
        "ketamine-prefetch-crd-2.2": json.dumps(crd_22),
        "non-ketamine": json.dumps(corpus.hook_request(draft_orders=[corpus.non_ketamine_order()])),
        "ketamine-no-data": json.dumps(corpus.hook_request()),
    }


def base(name: str) -> Any:
    """A fresh copy of one valid request (json round trip: faster than deepcopy, and always plain JSON)."""
    return json.loads(_bases_text()[name])


@cache
def paths(name: str, under: tuple[str, ...] = ()) -> tuple[Path, ...]:
    """Every path to a value in a base request, optionally only below `under` (e.g. ("context",))."""
    found: list[Path] = []

    def walk(value: Any, path: Path) -> None:
        if path[: len(under)] == under and len(path) > len(under):
            found.append(path)
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*path, index))

    walk(base(name), ())
    return tuple(found)


def get_at(value: Any, path: Path) -> Any:
    for part in path:
        if not isinstance(value, dict | list):
            raise TypeError("not a container")  # an earlier mutation put a scalar (maybe a string) here
        value = value[part]
    return value


def set_at(value: Any, path: Path, new: Any) -> None:
    parent = get_at(value, path[:-1])
    parent[path[-1]] = new


def delete_at(value: Any, path: Path) -> None:
    parent = get_at(value, path[:-1])
    del parent[path[-1]]


BASE_NAMES = st.sampled_from(
    ["ketamine-prefetch", "ketamine-prefetch", "ketamine-prefetch-crd-2.2", "non-ketamine", "ketamine-no-data"]
)


@st.composite
def mutated_requests(
    draw: st.DrawFn, under: tuple[str, ...] = (), values: st.SearchStrategy[Any] = JSON_VALUES
) -> bytes:
    """A valid request with one to three of its values replaced, deleted, wrapped in or unwrapped from a list."""
    name = draw(BASE_NAMES)
    body = base(name)
    candidates = paths(name, under) or paths(name)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(candidates))
        try:
            current = get_at(body, path)
            get_at(body, path[:-1])  # the parent must still be a container
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced what this path led to
        op = draw(st.sampled_from(["replace", "replace", "delete", "wrap", "unwrap", "null"]))
        mutate(body, path, op, current, lambda: draw(values))
    return dumps(body)


def mutate(body: Any, path: Path, op: str, current: Any, replacement: Any) -> None:
    """Apply one mutation at `path`: replace (with `replacement()`), delete, wrap in / unwrap from a list, or
    null (also what an unwrap of anything but a non-empty list becomes)."""
    if op == "replace":
        # A copy: sampled values ([], {"a": 1}) are shared objects, and a later mutation may write into one —
        # which changed what later examples drew (hypothesis: FlakyStrategyDefinition).
        set_at(body, path, copy.deepcopy(replacement()))
    elif op == "delete":
        delete_at(body, path)
    elif op == "wrap":
        set_at(body, path, [current])
    elif op == "unwrap" and isinstance(current, list) and current:
        set_at(body, path, current[0])
    else:
        set_at(body, path, None)


# -- invalid FHIR in every resource type the service reads ------------------------------------------------


@cache
def resource_paths() -> dict[str, tuple[Path, ...]]:
    """Resource type -> paths (in the ketamine-prefetch base) of every element inside resources of that type."""
    by_type: dict[str, list[Path]] = {}
    body = base("ketamine-prefetch")

    def walk(value: Any, path: Path, rtype: str | None) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("resourceType"), str) and value["resourceType"] != "Bundle":
                rtype = value["resourceType"]
            for key, item in value.items():
                if rtype is not None and key != "resourceType":
                    by_type.setdefault(rtype, []).append((*path, key))
                walk(item, (*path, key), rtype)
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if rtype is not None:
                    by_type.setdefault(rtype, []).append((*path, index))
                walk(item, (*path, index), rtype)

    walk(body["prefetch"], ("prefetch",), None)
    walk(body["context"]["draftOrders"], ("context", "draftOrders"), None)
    return {rtype: tuple(found) for rtype, found in by_type.items()}


@st.composite
def invalid_fhir(draw: st.DrawFn) -> tuple[str, bytes]:
    """(resource type, body): the complete request with one element of one resource of that type broken."""
    types = sorted(resource_paths())
    rtype = draw(st.sampled_from(types))
    path = draw(st.sampled_from(resource_paths()[rtype]))
    body = base("ketamine-prefetch")
    op = draw(st.sampled_from(["wrong-type", "wrong-type", "delete", "wrap", "unwrap", "null", "bad-text"]))
    bad_text = st.sampled_from(["", " ", "2024-02-30", "9999", "T", "urn:uuid:", "#", "Patient/x/y"])
    replacement = {"wrong-type": WRONG_TYPES, "bad-text": bad_text}.get(op)
    mutate(body, path, "replace" if replacement is not None else op, get_at(body, path), lambda: draw(replacement))
    return rtype, dumps(body)


# -- bodies no serializer would write --------------------------------------------------------------------


@st.composite
def deep_nesting(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(20, 80) | st.integers(800, 1_200) | st.sampled_from([5_000, 50_000, 500_000]))
    kind = draw(st.sampled_from(["array", "object", "in-prefetch", "in-context", "unclosed"]))
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    if kind == "unclosed":
        return b"[" * depth
    body = base("ketamine-prefetch")
    marker = "__DEEP__"
    if kind == "in-prefetch":
        body["prefetch"]["conditions"]["entry"][0]["resource"]["extension"] = marker
    else:
        body["context"]["extra"] = marker
    text = dumps(body)
    return text.replace(f'"{marker}"'.encode(), b"[" * depth + b"]" * depth)


@st.composite
def huge_values(draw: st.DrawFn) -> bytes:
    """A huge number or string somewhere in a valid request, or a body over the size limit."""
    kind = draw(st.sampled_from(["int", "float", "exp", "string", "key", "body"]))
    if kind == "body":
        return b'{"hook": "order-sign", "pad": "' + b"x" * (8 * 1024 * 1024 + draw(st.integers(1, 1000))) + b'"}'
    name = draw(BASE_NAMES)
    body = base(name)
    path = draw(st.sampled_from(paths(name)))
    marker = "__HUGE__"
    if kind == "key":
        parent = get_at(body, path[:-1])
        if isinstance(parent, dict):
            parent["k" * draw(st.sampled_from([1_000, 1_000_001]))] = 1
    else:
        set_at(body, path, marker)
    text = dumps(body)
    digits = draw(st.sampled_from([20, 39, 41, 400, 4_300, 5_000, 20_000]))
    replacement = {
        "int": ("-" if draw(st.booleans()) else "") + "9" * digits,
        "float": "1" * digits + ".5",
        "exp": draw(st.sampled_from(["1e400", "-1e400", "1e-400", "1E308", "2e308", "0e999999999"])),
        "string": '"' + "y" * draw(st.sampled_from([1_000, 999_999, 1_000_001, 3_000_000])) + '"',
        "key": '"__HUGE__"',
    }[kind]
    return text.replace(f'"{marker}"'.encode(), replacement.encode())


def _escape(text: str) -> str:
    return json.dumps(text, ensure_ascii=True)[1:-1]


NASTY_STRINGS = st.sampled_from(
    ["\x00", "a\x00b", "\ud800", "x\udfff", "\udbff\udfff", "\ud83d", "\ufffe", "\u202e", "\x1b[31m", "\ufeff"]
)


@st.composite
def unicode_bodies(draw: st.DrawFn) -> bytes:
    """NUL, lone surrogates and control characters inside any string of a valid request; or bytes that are
    not UTF-8 at all."""
    kind = draw(st.sampled_from(["value", "value", "key", "raw"]))
    if kind == "raw":
        prefix = draw(st.sampled_from([b"\xff\xfe", b"\xef\xbb\xbf", b"\xc0\xaf", b"\xed\xa0\x80", b"\x00", b""]))
        return (
            prefix + _bases_text()["non-ketamine"].encode()[: draw(st.integers(0, 400))] + draw(st.binary(max_size=8))
        )
    name = draw(BASE_NAMES)
    body = base(name)
    string_paths = [p for p in paths(name) if isinstance(get_at(body, p), str)]
    path = draw(st.sampled_from(string_paths))
    nasty = draw(NASTY_STRINGS)
    if kind == "key":
        parent = get_at(body, path[:-1])
        if isinstance(parent, dict):
            parent[nasty] = get_at(body, path)
    else:
        current = get_at(body, path)
        where = draw(st.integers(0, len(current)))
        set_at(body, path, current[:where] + nasty + current[where:])
    return dumps(body)


def _dump_with_duplicate(value: Any, target: Path, key: str, extra: Any, here: Path = ()) -> str:
    """JSON text of `value` where the object at `target` carries `key` twice (the second time as `extra`)."""
    if isinstance(value, dict):
        parts = [f"{json.dumps(k)}:{_dump_with_duplicate(v, target, key, extra, (*here, k))}" for k, v in value.items()]
        if here == target:
            parts.append(f"{json.dumps(key)}:{json.dumps(extra)}")
        return "{" + ",".join(parts) + "}"
    if isinstance(value, list):
        return (
            "[" + ",".join(_dump_with_duplicate(v, target, key, extra, (*here, i)) for i, v in enumerate(value)) + "]"
        )
    return json.dumps(value)


@st.composite
def duplicate_keys(draw: st.DrawFn) -> bytes:
    name = draw(BASE_NAMES)
    body = base(name)
    objects = [()] + [p for p in paths(name) if isinstance(get_at(body, p), dict) and get_at(body, p)]
    target = draw(st.sampled_from(objects))
    key = draw(st.sampled_from(sorted(get_at(body, target))))
    extra = draw(JSON_VALUES)
    return _dump_with_duplicate(body, target, key, extra).encode()


RANDOM_BODIES: st.SearchStrategy[bytes] = st.one_of(
    JSON_VALUES.map(dumps),
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"NaN", b"Infinity", b"-Infinity", b'{"a": NaN}', b"[1,]", b"{'a': 1}", b"\x00"]),
    st.fixed_dictionaries(
        {
            "hook": st.sampled_from(["order-sign", "order-select", ""]) | JSON_VALUES,
            "hookInstance": st.uuids().map(str) | JSON_VALUES,
            "context": JSON_VALUES,
        },
        optional={"prefetch": JSON_VALUES, "fhirServer": JSON_VALUES, "fhirAuthorization": JSON_VALUES},
    ).map(dumps),
)


def is_finite_json(data: bytes) -> bool:
    """Whether `data` is JSON Python would parse to finite values (used to sanity-check a strategy)."""
    try:
        value = json.loads(data)
    except ValueError:
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


Poster = Callable[[bytes], tuple[int, Any]]
