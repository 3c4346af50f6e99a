"""The orjson answer provider writes the same JSON document as Flask's stdlib provider did."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from flask import Flask
from hypothesis import given, settings
from hypothesis import strategies as st

from cds_service.json_answer import OrjsonProvider

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)  # fmt: skip


def _answers(value: Any) -> tuple[bytes, bytes]:
    stdlib, fast = Flask("stdlib"), Flask("fast")
    stdlib.json.sort_keys = False  # type: ignore[attr-defined]
    fast.json = OrjsonProvider(fast)
    with stdlib.app_context():
        before = stdlib.json.response(value).get_data()
    with fast.app_context():
        after = fast.json.response(value).get_data()
    return before, after


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_same_document_as_the_stdlib_provider(value: Any) -> None:
    before, after = _answers(value)
    assert json.loads(after) == json.loads(before)
    assert after.endswith(b"\n")
    if isinstance(value, dict):  # insertion order kept (CDS Hooks documents are built in field order)
        assert list(json.loads(after)) == list(value)


@dataclass
class _Point:
    x: int


def test_values_orjson_would_write_differently_take_flasks_conversion() -> None:
    value = {
        "when": datetime(2026, 12, 4, 12, 30, tzinfo=UTC),
        "day": date(2026, 12, 4),
        "id": uuid.UUID(int=7),
        "point": _Point(3),
    }
    before, after = _answers(value)
    assert json.loads(after) == json.loads(before)
    assert json.loads(after)["when"] == "Fri, 04 Dec 2026 12:30:00 GMT"  # Flask's http_date, not ISO 8601


def test_what_orjson_cannot_write_falls_back_to_the_stdlib() -> None:
    value = {"big": 2**80, 3: "int key"}
    before, after = _answers(value)
    assert after == before
    assert json.loads(after) == {"big": 2**80, "3": "int key"}
