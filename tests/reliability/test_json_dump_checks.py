"""The dump checks of `load_json`'s fast path (`_checked_by_dump`) decide exactly as the reference parse does, and
the facts about orjson's output their proof rests on hold.

Bodies are written as bytes by a generator that does what `json.dumps` never does: a key written twice, escapes of
every kind (`\\"` next to `:`, `\\u` forms of ordinary and of structural characters, surrogate pairs), whitespace
between any two tokens, strings around the length bound, nesting one level either side of the depth bound, long and
big numbers, OIDs. Limits are drawn too, so every bound is met from both sides.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service import hook_request
from cds_service.hook_request import (
    _ESCAPE_THE_DUMP_HIDES,
    _NOT_COUNTED,
    _SLOW_PATH,
    JsonInputError,
    JsonLimits,
    _checked_by_dump,
    _checked_by_walk,
    _exact_load,
    _fast_load,
    _may_hold_long_line,
    _unusual_numbers,
    _values_within,
    _walk_figures,
    load_json,
)
from tests.reliability.fuzz import base

# -- a generator of JSON text ------------------------------------------------------------------------------------

# Characters whose writing matters to the checks; each is written in one of its valid forms (`_forms`).
CHARACTERS = ["a", ":", " ", '"', "\\", "/", "\n", "\t", "\x00", "\x7f", "é", "—", "\U0001f600", "{", "}", "[", "]"]
CHARACTERS += [",", "7", ".", "e", "-", "\u2028"]
KEYS = ["a", "b", "a:", ":", '":', '"', " :", "é", "", "2.16.840.1.113883.6.1"]  # few: keys written twice are common
NUMBERS = [
    b"0",
    b"-0",
    b"7",
    b"-1.5",
    b"1e5",
    b"1E-5",
    b"-0.015076960406503262",
    b"0.03793396818722147",
    b"123456789012345678",
    b"-123456789012345678",
    b"1234567890123456789",
    b"9223372036854775808",
    b"18446744073709551616",
    b"1" * 25,
    b"1." + b"1" * 45,
    b"-123456789012345678.123456789012345678e+1",
    b"12345678901234567.1234567890123456e-12",
    b"1e400",
    b"2.4703282292062328e-324",
]
LITERALS = [b"true", b"false", b"null"]
STRINGS = ["2.16.840.1.113883.6.1", "urn:oid:2.16.840.1.113883.6.1", "http://loinc.org", "a4e482ee-fcc9-4a"]
WHITESPACE = [b"", b"", b" ", b"\n", b"\t", b"\r\n  "]
SHORT_ESCAPES = {'"': b'\\"', "\\": b"\\\\", "/": b"\\/", "\b": b"\\b", "\f": b"\\f", "\n": b"\\n", "\r": b"\\r"}
SHORT_ESCAPES["\t"] = b"\\t"


def _forms(char: str) -> list[bytes]:
    """Every way JSON lets `char` be written inside a string."""
    forms = []
    if char not in '"\\' and ord(char) >= 0x20:
        forms.append(char.encode())
    if char in SHORT_ESCAPES:
        forms.append(SHORT_ESCAPES[char])
    if ord(char) < 0x10000:
        forms += [b"\\u%04x" % ord(char), b"\\u%04X" % ord(char)]
    else:
        high, low = divmod(ord(char) - 0x10000, 0x400)
        forms.append(b"\\u%04x\\u%04x" % (0xD800 + high, 0xDC00 + low))
    return forms


@st.composite
def string_tokens(draw: st.DrawFn, texts: list[str] | None = None) -> bytes:
    if texts is not None:
        chars = list(draw(st.sampled_from(texts)))
    elif draw(st.integers(0, 5)) == 0:  # around the string bound (the limits below draw it between 1 and 60)
        chars = ["x"] * draw(st.integers(0, 70))
    else:
        chars = draw(st.lists(st.sampled_from(CHARACTERS), max_size=10))
    return b'"' + b"".join(draw(st.sampled_from(_forms(c))) for c in chars) + b'"'


@st.composite
def json_texts(draw: st.DrawFn, depth: int = 3) -> bytes:
    def ws() -> bytes:
        return draw(st.sampled_from(WHITESPACE))

    kind = draw(st.sampled_from(["number", "literal", "string", "oid"] + (["array", "object"] * 2 if depth else [])))
    if kind == "number":
        return draw(st.sampled_from(NUMBERS))
    if kind == "literal":
        return draw(st.sampled_from(LITERALS))
    if kind in ("string", "oid"):
        return draw(string_tokens(STRINGS if kind == "oid" else None))
    items = draw(st.lists(json_texts(depth - 1), max_size=4))
    if kind == "object":
        items = [draw(string_tokens(KEYS)) + ws() + b":" + ws() + item for item in items]
    opening, closing = (b"[", b"]") if kind == "array" else (b"{", b"}")
    return opening + ws() + (ws() + b"," + ws()).join(items) + ws() + closing


@st.composite
def nested_texts(draw: st.DrawFn) -> bytes:
    """A text wrapped in up to 11 more levels (in arrays, in objects, or beside other members)."""
    text = draw(json_texts())
    for _ in range(draw(st.integers(0, 11))):
        text = draw(st.sampled_from([b"[%s]", b'{"k": %s}', b'[1, %s, {"b": []}]', b'{"a": {}, "b": %s}'])) % text
    return text


limit_sets = st.builds(
    JsonLimits,
    max_bytes=st.just(1 << 20),
    max_depth=st.integers(0, 10),
    max_string_length=st.integers(1, 60),
    max_number_length=st.integers(17, 45),
    max_values=st.integers(1, 300),
)


# -- the decisions -----------------------------------------------------------------------------------------------


def _outcome(parse: Any, raw: bytes, limits: JsonLimits) -> Any:
    try:
        value = parse(raw, limits)
    except JsonInputError as exc:
        return ("refused", exc.status, exc.reason)
    return ("value", json.dumps(value), repr(value))


def _parsed(raw: bytes, limits: JsonLimits) -> Any:
    """orjson's parse of `raw` when the fast path would check it, else _SLOW_PATH."""
    if _unusual_numbers(raw, limits.max_number_length):
        return _SLOW_PATH
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _SLOW_PATH


def _by_dump(raw: bytes, limits: JsonLimits) -> Any:
    """The dump checks alone (the exact path where they do not apply or cannot tell)."""
    document = _parsed(raw, limits)
    if document is _SLOW_PATH or _ESCAPE_THE_DUMP_HIDES.search(raw):
        return _exact_load(raw, limits)
    try:
        dump = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    except orjson.JSONEncodeError:
        return _exact_load(raw, limits)
    value = _checked_by_dump(raw, document, dump, limits)
    return _exact_load(raw, limits) if value is _SLOW_PATH else value


def _by_walk(raw: bytes, limits: JsonLimits) -> Any:
    """The walk checks alone, on every body orjson parses (also those the dump checks take)."""
    document = _parsed(raw, limits)
    value = _SLOW_PATH if document is _SLOW_PATH else _checked_by_walk(raw, document, limits)
    return _exact_load(raw, limits) if value is _SLOW_PATH else value


@settings(max_examples=1500, derandomize=True, deadline=None)
@given(raw=nested_texts(), limits=limit_sets)
def test_written_texts_are_decided_alike_by_the_dump_the_walk_and_the_reference(raw: bytes, limits: JsonLimits) -> None:
    reference = _outcome(_exact_load, raw, limits)
    assert _outcome(_by_dump, raw, limits) == reference, raw[:300]
    assert _outcome(_by_walk, raw, limits) == reference, raw[:300]
    assert _outcome(load_json, raw, limits) == reference, raw[:300]


scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False, allow_infinity=False)
documents = st.recursive(
    scalars | st.text(max_size=70) | st.sampled_from(STRINGS),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=40,
)


@settings(max_examples=500, derandomize=True, deadline=None)
@given(document=documents, limits=limit_sets, ascii_only=st.booleans())
def test_serialised_documents_are_decided_alike(document: Any, limits: JsonLimits, ascii_only: bool) -> None:
    """Documents as a client's serialiser writes them (`ensure_ascii` writes `\\u` escapes; orjson writes none)."""
    texts = [json.dumps(document, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")]
    with contextlib.suppress(TypeError):  # not for an integer beyond 64 bits or a lone surrogate
        texts.append(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    for raw in texts:
        reference = _outcome(_exact_load, raw, limits)
        assert _outcome(_by_dump, raw, limits) == reference, raw[:300]
        assert _outcome(load_json, raw, limits) == reference, raw[:300]


def _nest(levels: int, inner: bytes = b"1") -> bytes:
    text = inner
    for level in range(levels):
        text = b'{"k": %s}' % text if level % 2 else b"[%s]" % text
    return text


@pytest.mark.parametrize("max_depth", [1, 2, 8, 64])
@pytest.mark.parametrize("offset", [-1, 0, 1])
@pytest.mark.parametrize("inner", [b"1", b"[]", b"{}", b'"x"'])
def test_nesting_at_the_depth_bound_and_either_side(max_depth: int, offset: int, inner: bytes) -> None:
    limits = JsonLimits(max_depth=max_depth)
    levels = max(max_depth + offset - (inner in (b"[]", b"{}")), 0)
    for raw in (_nest(levels, inner), _nest(levels, inner).replace(b" ", b"")):
        assert _outcome(_by_dump, raw, limits) == _outcome(_exact_load, raw, limits)
        assert _outcome(load_json, raw, limits) == _outcome(_exact_load, raw, limits)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a\\":": 1, "a\\":": 2}',  # an escaped quote then a colon, in a key written twice
        b'{"a\\":": 1, "b": "\\":\\":"}',
        b'{"x": "a\\" : b", "x": 1}',
        b'{"oid": "2.16.840.1.113883.6.1", "oid": "urn:oid:2.16.840.1.113883.6.1"}',
        b'{"a": {"b": 1, "b": {"c": ":::"}}}',
        b'{"a": 1, "a": ""}',
        b'{"\\u2014": 1, "\\u2014": 2}',  # a \\u escape the dump checks see through
        b'{"\\u003a": 1, ":": 2}',  # an escaped colon: the walk decides
        b'{"\\u003A": 1, "b": ":"}',
        b'{"\\u0022": 1, "\\"": 2}',
    ],
)
def test_duplicates_next_to_escapes_and_colons(raw: bytes) -> None:
    limits = JsonLimits()
    assert _outcome(_by_dump, raw, limits) == _outcome(_exact_load, raw, limits)
    assert _outcome(load_json, raw, limits) == _outcome(_exact_load, raw, limits)


def test_the_sandbox_body_is_checked_from_the_dump_not_by_the_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = json.dumps(base("ketamine-no-data")).encode()  # ensure_ascii: its `\u` escapes stay on the dump path

    def refuse(*_: Any) -> Any:
        raise AssertionError("walked")

    monkeypatch.setattr(hook_request, "_checked_by_walk", refuse)
    assert _fast_load(raw, JsonLimits()) == json.loads(raw)


# -- the facts about orjson's output -----------------------------------------------------------------------------


def test_orjson_writes_each_character_as_the_proof_says() -> None:
    """`"`, `\\` and control characters escaped, without a colon or a newline; every other character as itself."""
    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        written = orjson.dumps(char)[1:-1]
        if char in '"\\' or code < 0x20:
            assert written.startswith(b"\\") and b":" not in written and b"\n" not in written, code
        else:
            assert written == char.encode(), code


def _reference_shape(document: Any, level: int = 1) -> dict[str, int]:
    """Values, empty and non-empty containers, depth and the exact path's value bound, by recursion."""
    if not isinstance(document, dict | list):
        return {"values": 1, "empty": 0, "non_empty": 0, "depth": 0, "commas": 0}
    members = list(document.values()) if isinstance(document, dict) else document
    shape = {"values": 1, "empty": 0 if members else 1, "non_empty": 1 if members else 0, "depth": level}
    shape["commas"] = max(len(members) - 1, 0)
    for member in members:
        inner = _reference_shape(member, level + 1)
        for key in ("values", "empty", "non_empty", "commas"):
            shape[key] += inner[key]
        shape["depth"] = max(shape["depth"], inner["depth"])
    return shape


# What orjson.loads can return: integers within 64 bits, strings without a lone surrogate.
parsed_documents = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=70)
    | st.sampled_from([*STRINGS, "{}", "[]", "{", "[]\n"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=["Cs"]), max_size=4), children, max_size=4)
    ),
    max_leaves=40,
)


@settings(max_examples=500, derandomize=True, deadline=None)
@given(document=parsed_documents | st.builds(lambda d: [[[[[[[[[d]]]]]]]]], parsed_documents))
def test_the_indented_dump_has_the_shape_the_proof_uses(document: Any) -> None:
    dump = orjson.dumps(document, option=orjson.OPT_INDENT_2)
    counted = dump.translate(None, _NOT_COUNTED)
    shape = _reference_shape(document)
    containers = shape["empty"] + shape["non_empty"]
    value_bound = shape["commas"] + containers + 1
    assert value_bound == shape["values"] + shape["empty"]
    assert _walk_figures(document).value_bound == value_bound and _walk_figures(document).deepest == shape["depth"]
    for text in (dump, counted):
        assert text.count(b"\n") == shape["values"] - 1 + shape["non_empty"]
        assert text.count(b"{\n") + text.count(b"[\n") == shape["non_empty"]
        assert text.count(b"{}") + text.count(b"[]") >= shape["empty"]
        assert text.count(b":") == dump.count(b":")
    for max_depth in range(1, shape["depth"]):  # deeper than max_depth: a line indented 2 * max_depth spaces
        assert dump.find(b"\n" + b"  " * max_depth) != -1
    assert not dump.endswith(b"\n")
    for max_values in range(max(value_bound - 3, 1), value_bound + 4):
        within = _values_within(counted, max_values)
        assert within is None or within == (value_bound <= max_values)
    longest_line = max(len(line) for line in dump.split(b"\n"))
    for max_length in (1, 2, 3, 5, 8, 13, 40, 70):
        if longest_line > max_length:
            assert _may_hold_long_line(dump, max_length) is not False


@settings(max_examples=500, derandomize=True, deadline=None)
@given(raw=nested_texts())
def test_colon_counts_differ_exactly_when_a_key_is_written_twice(raw: bytes) -> None:
    try:
        document = orjson.loads(raw)
        written_twice = []
        json.loads(raw, object_pairs_hook=lambda pairs: written_twice.append(len({k for k, _ in pairs}) < len(pairs)))
    except (orjson.JSONDecodeError, ValueError, RecursionError):
        return
    if _ESCAPE_THE_DUMP_HIDES.search(raw) is None:
        assert (raw.count(b":") != orjson.dumps(document).count(b":")) == any(written_twice), raw[:300]
