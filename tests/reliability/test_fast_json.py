"""The orjson fast path of `load_json` decides exactly what the reference parse (stdlib json with hooks) decides:
the same value, or the same refusal (status and reason), on generated documents and on the boundary's own cases."""

from __future__ import annotations

import json
from typing import Any

import fastjsonschema
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.hook_request import (
    _SLOW_PATH,
    JsonInputError,
    JsonLimits,
    _exact_load,
    _fast_load,
    _fast_validator,
    _validator,
    load_json,
)
from tests.reliability.fuzz import base

LIMITS = JsonLimits(max_bytes=1 << 20, max_depth=8, max_string_length=40, max_number_length=40, max_values=200)


def _outcome(parse: Any, raw: bytes) -> Any:
    try:
        value = parse(raw, LIMITS)
    except JsonInputError as exc:
        return ("refused", exc.status, exc.reason)
    return ("value", json.dumps(value, sort_keys=False), repr(value))


def _fast_or_exact(raw: bytes, limits: JsonLimits) -> Any:
    value = _fast_load(raw, limits)
    return _exact_load(raw, limits) if value is _SLOW_PATH else value


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**25), max_value=10**25)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
)
documents = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=30,
)
# Text that is JSON-ish but breaks one rule: duplicates, constants, long numbers, surrogates, deep nesting, BOM.
fragments = st.sampled_from(
    [
        b'{"a":1,"a":2}',
        b'{"a":{"b":1,"b":1}}',
        b"NaN",
        b"[Infinity]",
        b"1e400",
        b"[-1e-400]",
        b"123456789012345678901234567890",
        b"1." + b"1" * 45,
        b'"\\ud800"',
        b'"\\udc00x"',
        b'"\\ud83d\\ude00"',
        b"[" * 9 + b"]" * 9,
        b"\xef\xbb\xbf{}",
        b'"\xff"',
        b'{"a":"' + b"x" * 41 + b'"}',
        b'{"a":"\\"' + b"x" * 45 + b'"}',
        b'{"a":"\\"' + b"x" * 20 + b'","b":"' + b"y" * 30 + b'"}',
        b'{"a":"' + b"x" * 39 + b'","b":"' + b"\\u00e9" * 10 + b'"}',
        b'{"k\\u003a":1,"k:":2}',
        b'{"a:b":1,"c":2}',
        b"[1,2,3" + b",0" * 250 + b"]",
        b"9223372036854775808",
        b"-9223372036854775809",
        b"12345678901234567890.5",
        b"-0.015076960406503262",
        b"1" * 19,
        b"1" * 18,
        b"1e-99",
        b"1.7976931348623159e308",
        b"2.4703282292062327e-324",
        b"2.4703282292062328e-324",
        b"[1e-10000,-0.0,0e999]",
        b'{"id":"a4e482ee-fcc9-4a","n":1e-5}',
        b"0." + b"0" * 37 + b"1",
        b"0." + b"0" * 38 + b"1",
        b"-0",
        b'{"":0,"":0}',
        b"[" + b",".join([b"0"] * 198) + b"]",
        b"[" + b",".join([b"0"] * 199) + b"]",
        b"[" + b",".join([b"0"] * 200) + b"]",
        b"[" * 8 + b"]" * 8,
        b'{"system":"urn:oid:2.16.840.1.113883.6.1","code":"2.16.840.1.113883.6.1"}',
        b'{"a\\":":1,"a\\":":2}',
        b'{"a\\" :":"\\":","b":1}',
        b'{"\\u003a":1,":":2}',
        b'{"\\u2014":1,"\\u2014":2}',
        b'{"k":"\\u2014:"}',
        b'[[{"a":[{}]}],[]]',
    ]
)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(document=documents)
def test_generated_documents_are_decided_alike(document: Any) -> None:
    raw = json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")
    assert _outcome(_fast_or_exact, raw) == _outcome(_exact_load, raw)
    assert _outcome(load_json, raw) == _outcome(_exact_load, raw)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(document=documents, fragment=fragments, key=st.text(max_size=3))
def test_rule_breaking_documents_are_decided_alike(document: Any, fragment: bytes, key: str) -> None:
    for raw in (
        fragment,
        b'{"x":' + fragment + b',"y":' + json.dumps(document).encode() + b"}",
        b"[" + json.dumps(document).encode() + b"," + fragment + b"]",
        json.dumps({key: document, key + "": 1}).encode()[:-1] + b',"' + key.encode() + b'":0}',
    ):
        assert _outcome(_fast_or_exact, raw) == _outcome(_exact_load, raw), raw[:200]


def test_fast_path_is_taken_for_an_ordinary_document_and_not_for_a_duplicate() -> None:
    assert _fast_load(b'{"a":[1,2.5,"x",null,true]}', LIMITS) == {"a": [1, 2.5, "x", None, True]}
    assert _fast_load(b'{"a":1,"a":2}', LIMITS) is _SLOW_PATH
    assert _fast_load(b"123456789012345678901234567890", LIMITS) is _SLOW_PATH  # orjson would make it a float
    assert _fast_load(b"[-0.015076960406503262,123456789012345678.5]", LIMITS) == [
        -0.015076960406503262,
        123456789012345678.5,
    ]


# -- the compiled request schema ------------------------------------------------------------------------------


def _fast_says_valid(body: Any, lenient: bool) -> bool:
    try:
        _fast_validator(lenient)(body)
    except fastjsonschema.JsonSchemaException:
        return False
    return True


envelope_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=5),
    st.sampled_from(["order-sign", "Bearer", "Practitioner/p1", "urn:uuid:" + "0" * 8 + "-0000-0000-0000-" + "0" * 12]),
    st.lists(st.none(), max_size=1),
    st.just({}),
)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(
    path=st.lists(
        st.sampled_from(
            [
                "hook",
                "hookInstance",
                "fhirServer",
                "fhirAuthorization",
                "context",
                "userId",
                "patientId",
                "encounterId",
                "draftOrders",
                "entry",
                0,
                "resource",
                "resourceType",
                "id",
                "status",
                "intent",
                "type",
                "access_token",
                "token_type",
                "expires_in",
                "scope",
                "subject",
                "prefetch",
                "extension",
            ]
        ),
        min_size=1,
        max_size=5,
    ),
    value=envelope_values,
    delete=st.booleans(),
    lenient=st.booleans(),
)
def test_the_compiled_schema_is_never_more_lenient_than_jsonschema(
    path: list[Any], value: Any, delete: bool, lenient: bool
) -> None:
    body: Any = base("ketamine-no-data")
    body["fhirServer"] = "http://ehr.example.org/fhir"
    body["fhirAuthorization"] = {
        "access_token": "t",
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "s",
        "subject": "c",
    }
    node = body
    for step in path[:-1]:
        child = node.get(step) if isinstance(node, dict) else (node[step] if isinstance(node, list) and node else None)
        if not isinstance(child, dict | list):
            break
        node = child
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        if delete:
            node.pop(last, None)
        else:
            node[last] = value
    reference = not any(True for _ in _validator(lenient).iter_errors(body))
    assert _fast_says_valid(body, lenient) == reference
