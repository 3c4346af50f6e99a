"""The input boundary and the audit trail, one rule at a time: JSON limits, what is refused and why, one audit
row per answered call whatever its status, unauthenticated calls never parsed, failures that must not
become a 500 (an audit store that refuses a row, feedback the database cannot take, a policy that raises)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cds_service import hook as hook_module
from cds_service.app import create_app
from cds_service.audit import AuditStore, AuditStoreError
from cds_service.config import ServiceConfig
from cds_service.hook_request import JsonInputError, JsonLimits, load_json
from fhir_mappings import mappings as mappings_module
from sandbox.signing import generate_key, sign_cds_jwt, trusted_issuers_document, write_trusted_issuers
from tests.reliability import corpus
from tests.reliability.fuzz import FEEDBACK_PATH, SERVICE_PATH, check_answer, decision_outcomes

ISSUER = "https://ehr.test/cds-client"
LIMITS = JsonLimits(max_bytes=10_000, max_depth=8, max_string_length=100, max_number_length=20, max_values=500)


# -- load_json -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"x" * 10_001, 413, "larger than"),
        (b"[" * 9 + b"]" * 9, 413, "nested deeper than 8"),
        (b"[" * 9_000, 413, "nested deeper"),  # beyond the C decoder's recursion limit: caught
        (b'{"a": "' + b"y" * 101 + b'"}', 413, "string longer"),
        (b'{"' + b"k" * 101 + b'": 1}', 413, "string longer"),
        (b"1" * 21, 413, "number longer"),
        (b"[" + b"1," * 600 + b"1]", 413, "more than 500 values"),
        (b'{"a": 1, "a": 2}', 400, "duplicate key"),
        (b"NaN", 400, "not a JSON number"),
        (b"[-Infinity]", 400, "not a JSON number"),
        (b"1e400", 400, "out of range"),
        (b'"\\ud800"', 400, "lone surrogate"),
        (b'["a\\udfffb"]', 400, "lone surrogate"),
        (b"\xff\xfe{", 400, "not UTF-8"),
        ("[1]".encode("utf-16"), 400, "not UTF-8"),
        (b"\xc3\x28", 400, "not valid JSON"),
        (b"{'a': 1}", 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
    ],
)
def test_load_json_refuses_with_a_status_and_a_reason(raw: bytes, status: int, reason: str) -> None:
    with pytest.raises(JsonInputError) as caught:
        load_json(raw, LIMITS)
    assert caught.value.status == status and reason in caught.value.reason


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'{"a": "x\\u0000y"}', {"a": "x\x00y"}),  # NUL is valid JSON: kept (the store sanitises it)
        (b'"\\ud83d\\ude00"', "\U0001f600"),  # a surrogate *pair* is one character
        (b"[" * 8 + b"]" * 8, [[[[[[[[]]]]]]]]),
        (b"12345678901234567890", 12345678901234567890),
        (b"\xef\xbb\xbf[1]", [1]),  # a UTF-8 BOM
    ],
)
def test_load_json_accepts_what_is_within_the_limits(raw: bytes, value: Any) -> None:
    assert load_json(raw, LIMITS) == value


# -- the app ---------------------------------------------------------------------------------------------


class Client:
    def __init__(self, tmp: Path, **config: Any) -> None:
        self.key = generate_key("ES384")
        issuers = tmp / "issuers.json"
        write_trusted_issuers(issuers, trusted_issuers_document(ISSUER, [self.key], ["https://ehr.test/fhir"]))
        self.config = ServiceConfig(trusted_issuers=str(issuers), database=f"sqlite:///{tmp / 'a.db'}", **config)
        self.audit = AuditStore(self.config.database, asynchronous=False)
        self.app = create_app(self.config, audit=self.audit, clock=corpus.anchor_now)
        self.state = self.app.extensions["ketamine_cds"]
        self.http = self.app.test_client()

    def post(self, body: Any, *, path: str = SERVICE_PATH, token: str | bool | None = True) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if token is True:
            token = sign_cds_jwt(self.key, iss=ISSUER, aud=self.config.base_url + path)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.post(path, data=data, headers=headers)

    def rows(self) -> list[dict[str, Any]]:
        return list(reversed(self.audit.recent_calls(limit=1000)))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    harness = Client(tmp_path, max_body_bytes=200_000)
    yield harness
    harness.audit.close()


def test_every_answered_call_has_exactly_one_audit_row_with_its_status(client: Client) -> None:
    alg_list = "eyJhbGciOlsiRVMzODQiXSwia2lkIjoiayIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJ4In0.c2ln"  # {"alg": ["ES384"], ...}
    calls = [
        (corpus.hook_request(draft_orders=[corpus.non_ketamine_order()]), True, 200),
        (corpus.hook_request(prefetch=corpus.full_prefetch()), True, 200),
        (b"{not json", True, 400),
        (b'{"hook": "order-sign", "hook": "order-select"}', True, 400),
        ({"hook": "order-sign"}, True, 422),
        (corpus.hook_request(), True, 412),  # nothing prefetched, no FHIR server: required data unavailable
        (b'{"pad": "' + b"x" * 300_000 + b'"}', True, 413),
        (corpus.hook_request(), None, 401),
        (corpus.hook_request(), alg_list, 401),
    ]
    for body, token, status in calls:
        response = client.post(body, token=token)
        check_answer(response.status_code, response.content_type, response.data)
        assert response.status_code == status, (status, response.data[:300])

    rows = client.rows()
    assert [r["status_code"] for r in rows] == [status for _, _, status in calls]
    assert [r["outcome"] for r in rows] == [
        "triaged-out",
        "evaluated",
        "refused",
        "refused",
        "refused",
        "refused",
        "refused",
        "refused",
        "refused",
    ]
    assert rows[5]["patient_id"] == corpus.base_case()["patient_id"]  # what was learnt before the refusal
    assert rows[6]["error"] == "request body too large"
    assert all(r["error"] for r in rows[2:])


def test_a_413_carries_an_operation_outcome(client: Client) -> None:
    response = client.post(b"[" + b"1," * 150_000 + b"1]")
    assert response.status_code == 413
    assert response.json["issue"][0]["code"] == "too-costly"


def test_unauthenticated_calls_never_parse_the_body(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[int] = []
    real = hook_module.parse_json
    monkeypatch.setattr(hook_module, "parse_json", lambda raw, limits=None: parsed.append(1) or real(raw, limits))

    assert client.post(corpus.hook_request(), token=None).status_code == 401
    assert client.post(corpus.hook_request(), token="a.b.c").status_code == 401
    assert parsed == []
    assert client.post(corpus.hook_request(draft_orders=[corpus.non_ketamine_order()])).status_code == 200
    assert parsed == [1]  # parsed exactly once, also for the audit row


def test_an_audit_store_that_refuses_the_row_does_not_turn_the_answer_into_a_500(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(record: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(client.audit, "record_call", refuse)
    response = client.post(corpus.hook_request(draft_orders=[corpus.non_ketamine_order()]))

    assert response.status_code == 200
    assert any(r.levelno == logging.ERROR and "audit: could not record" in r.getMessage() for r in caplog.records)
    assert client.http.get("/healthz").json["audit"]["failed"] == 1


def test_a_row_the_database_refuses_is_logged_as_an_error_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = AuditStore(f"sqlite:///{tmp_path / 'x.db'}", asynchronous=False)
    try:
        from tests.service.test_audit import make_record

        store.record_call(make_record(decisions=[{"not": object()}]))  # not JSON-serialisable
        assert store.failed_count == 1
        assert any(r.levelno == logging.ERROR and "could not be written" in r.getMessage() for r in caplog.records)
    finally:
        store.close()


def test_feedback_the_database_cannot_store_is_a_503_and_audited(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any) -> int:
        raise AuditStoreError("could not store feedback: OperationalError")

    monkeypatch.setattr(client.audit, "record_feedback", refuse)
    body = {
        "feedback": [
            {
                "card": "9368d37b-283f-44a0-93ea-547cebab93ed",
                "outcome": "overridden",
                "outcomeTimestamp": "2026-01-15T17:00:00Z",
            }
        ]
    }
    response = client.post(body, path=FEEDBACK_PATH)

    assert response.status_code == 503 and response.json["resourceType"] == "OperationOutcome"
    assert [(r["endpoint"], r["status_code"], r["outcome"]) for r in client.rows()] == [("feedback", 503, "error")]


def test_a_policy_that_raises_becomes_a_could_not_evaluate_decision(
    client: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    quoted = "Patient/mgb-base " + "secret"  # an exception message that quotes data: must not be logged

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError(quoted)

    monkeypatch.setattr(mappings_module, "evaluate_policy", broken)
    response = client.post(corpus.hook_request(prefetch=corpus.full_prefetch()))

    assert response.status_code == 200
    assert decision_outcomes(response.json) == ["documentation-needed"]
    assert "could not be evaluated" in response.json["cards"][0]["detail"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "could not be evaluated: KeyError" in logged and quoted not in logged


def test_routing_that_raises_becomes_a_could_not_evaluate_decision(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(record: Any) -> Any:
        raise ValueError("boom")

    monkeypatch.setattr(client.state.mappings.router, "resolve", broken)
    response = client.post(corpus.hook_request(prefetch=corpus.full_prefetch()))

    assert response.status_code == 200
    assert decision_outcomes(response.json) == ["documentation-needed"]


def test_a_draft_order_of_the_wrong_shape_is_a_422_naming_the_element(client: Client) -> None:
    order = corpus.non_ketamine_order()
    order["medicationCodeableConcept"]["coding"] = {"system": "x", "code": "y"}
    response = client.post(corpus.hook_request(draft_orders=[order]))

    assert response.status_code == 422
    assert "MedicationRequest.medicationCodeableConcept.coding: expected an array" in json.dumps(response.json)


def test_an_unreadable_prefetched_resource_is_left_out_and_cited(client: Client) -> None:
    prefetch = corpus.full_prefetch()
    blood_pressure = next(
        e["resource"] for e in prefetch["observations"]["entry"] if e["resource"]["id"] == "mgb-base-obs-bp"
    )
    blood_pressure["component"][0]["valueQuantity"]["value"] = "128"  # a string where R4 has a decimal
    response = client.post(corpus.hook_request(prefetch=prefetch))

    assert response.status_code == 200
    card = response.json["cards"][0]
    assert decision_outcomes(response.json) == ["documentation-needed"]  # the BP exclusion is now unknown
    statuses = {c["id"]: c["status"] for c in card["extension"]["ketamine-cds.decision"]["criteria"]}
    assert statuses["exclusion-10-cardiovascular"] == "unknown"
    assert "observations partial (1 unreadable resource)" in card["detail"]
    assert (
        "Unreadable (not R4 JSON): Observation/mgb-base-obs-bp "
        "(Observation.component[0].valueQuantity.value: expected a number)" in card["detail"]
    )


def test_an_unreadable_coverage_is_required_data_unavailable_not_no_coverage(client: Client) -> None:
    prefetch = corpus.full_prefetch()
    coverage = next(e["resource"] for e in prefetch["coverage"]["entry"] if e["resource"]["resourceType"] == "Coverage")
    coverage["payor"] = {"reference": "Organization/payer-mgbhp"}  # R4: an array
    response = client.post(corpus.hook_request(prefetch=prefetch))

    assert response.status_code == 412
    assert "coverage" in response.json["issue"][0]["diagnostics"]
