"""parse_feedback: CDS Hooks 2.0 feedback bodies, the sandbox's variants, and one Issue per problem."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cds_service.audit import AuditStore
from cds_service.errors import ServiceError
from cds_service.feedback import MAX_FEEDBACK_ITEMS, parse_feedback, parse_rfc3339

CARD = "8f1d6c2e-6f0a-4b6e-9d8e-0c5e3f1a2b3c"
SUGGESTION = "2e6b3a44-0d5c-4d3e-8a5f-7c1e9b0d4f21"
SPEC_TIMESTAMP = "1985-04-12T23:20:50.52Z"
SPEC_INSTANT = datetime(1985, 4, 12, 23, 20, 50, 520000, tzinfo=UTC)


def accepted(**changes: Any) -> dict[str, Any]:
    item = {
        "card": CARD,
        "outcome": "accepted",
        "acceptedSuggestions": [{"id": SUGGESTION}],
        "outcomeTimestamp": SPEC_TIMESTAMP,
    }
    item.update(changes)
    return item


def overridden(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"card": CARD, "outcome": "overridden", "outcomeTimestamp": SPEC_TIMESTAMP}
    item.update(changes)
    return item


def problems(body: Any) -> tuple[int, list[tuple[str | None, str]]]:
    """The status and (expression, issue code) of every issue parse_feedback reports."""
    with pytest.raises(ServiceError) as raised:
        parse_feedback(body)
    return raised.value.status, [(issue.expression, issue.code) for issue in raised.value.issues]


# --------------------------------------------------------------------------------------------------------------
# Valid bodies


def test_accepted_item() -> None:
    [item] = parse_feedback({"feedback": [accepted()]})
    assert item.card_uuid == CARD
    assert item.outcome == "accepted"
    assert item.outcome_timestamp == SPEC_INSTANT
    assert item.accepted_suggestions == (SUGGESTION,)
    assert item.override_reason is None
    assert item.user_comment is None


def test_overridden_item_with_full_reason_and_comment() -> None:
    reason = {
        "code": "reason-code-provided-by-service",
        "system": "http://example.org/cds-services/fhir/CodeSystem/override-reasons",
        "display": "Patient refused",
    }
    [item] = parse_feedback(
        {"feedback": [overridden(overrideReason={"reason": reason, "userComment": "discussed alternatives"})]}
    )
    assert item.outcome == "overridden"
    assert item.accepted_suggestions == ()
    assert item.override_reason == reason
    assert item.user_comment == "discussed alternatives"


def test_overridden_without_reason() -> None:
    [item] = parse_feedback({"feedback": [overridden()]})
    assert item.override_reason is None and item.user_comment is None


def test_sandbox_reason_without_display() -> None:
    body = {"feedback": [overridden(overrideReason={"reason": {"code": "dismiss", "system": "http://sandbox"}})]}
    [item] = parse_feedback(body)
    assert item.override_reason == {"code": "dismiss", "system": "http://sandbox"}


def test_sandbox_reason_with_code_only() -> None:
    [item] = parse_feedback({"feedback": [overridden(overrideReason={"reason": {"code": "dismiss"}})]})
    assert item.override_reason == {"code": "dismiss", "system": None}


def test_old_sandbox_override_reason_is_the_coding_itself() -> None:
    [item] = parse_feedback({"feedback": [overridden(overrideReason={"code": "dismiss", "system": "http://sandbox"})]})
    assert item.override_reason == {"code": "dismiss", "system": "http://sandbox"}


def test_comment_without_reason() -> None:
    [item] = parse_feedback({"feedback": [overridden(overrideReason={"userComment": "not now"})]})
    assert item.override_reason is None
    assert item.user_comment == "not now"


def test_several_items_keep_their_order_and_unknown_keys_are_ignored() -> None:
    body = {
        "feedback": [accepted(card="card-a", extension={"x": 1}), overridden(card="card-b")],
        "somethingNew": True,
    }
    assert [item.card_uuid for item in parse_feedback(body)] == ["card-a", "card-b"]


def test_empty_feedback_array_is_accepted() -> None:
    assert parse_feedback({"feedback": []}) == []


def test_acceptedsuggestions_on_an_overridden_card_are_ignored() -> None:
    [item] = parse_feedback({"feedback": [overridden(acceptedSuggestions=[{"id": SUGGESTION}])]})
    assert item.accepted_suggestions == ()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (SPEC_TIMESTAMP, SPEC_INSTANT),
        ("1985-04-12T23:20:50.520Z", SPEC_INSTANT),  # same instant, same idempotency key
        ("1985-04-12T23:20:50.5200009Z", SPEC_INSTANT),  # beyond microseconds: truncated
        ("1985-04-12T19:20:50.52-04:00", SPEC_INSTANT),
        ("1985-04-12t23:20:50.52z", SPEC_INSTANT),
        ("2025-01-31T08:00:00+00:00", datetime(2025, 1, 31, 8, tzinfo=UTC)),
    ],
)
def test_rfc3339_timestamps_are_normalised_to_utc(raw: str, expected: datetime) -> None:
    parsed = parse_rfc3339(raw)
    assert parsed == expected
    assert parsed is not None and parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "raw",
    ["1985-04-12T23:20:50", "1985-04-12", "1985-13-12T23:20:50Z", "1985-04-12T23:20:60Z", "yesterday", ""],
)
def test_not_rfc3339(raw: str) -> None:
    assert parse_rfc3339(raw) is None


# --------------------------------------------------------------------------------------------------------------
# Invalid bodies


@pytest.mark.parametrize("body", [None, [], ["feedback"], "feedback", 42])
def test_non_object_body_is_400(body: Any) -> None:
    status, issues = problems(body)
    assert status == 400
    assert len(issues) == 1


def test_missing_feedback_array() -> None:
    assert problems({"cards": []}) == (422, [("feedback", "required")])


def test_feedback_not_a_list() -> None:
    assert problems({"feedback": accepted()}) == (422, [("feedback", "structure")])


def test_item_not_an_object() -> None:
    assert problems({"feedback": [accepted(), "accepted"]}) == (422, [("feedback[1]", "structure")])


def test_missing_card() -> None:
    item = accepted()
    del item["card"]
    assert problems({"feedback": [item]}) == (422, [("feedback[0].card", "required")])


@pytest.mark.parametrize("card", ["", "   ", 17, {"uuid": CARD}, "x" * 257])
def test_bad_card(card: Any) -> None:
    assert problems({"feedback": [accepted(card=card)]}) == (422, [("feedback[0].card", "value")])


@pytest.mark.parametrize("outcome", ["ACCEPTED", "dismissed", "", 1])
def test_bad_outcome(outcome: Any) -> None:
    assert problems({"feedback": [overridden(outcome=outcome)]}) == (422, [("feedback[0].outcome", "value")])


def test_missing_outcome() -> None:
    item = overridden()
    del item["outcome"]
    assert problems({"feedback": [item]}) == (422, [("feedback[0].outcome", "required")])


def test_accepted_without_accepted_suggestions() -> None:
    item = accepted()
    del item["acceptedSuggestions"]
    assert problems({"feedback": [item]}) == (422, [("feedback[0].acceptedSuggestions", "required")])


@pytest.mark.parametrize("suggestions", [[], {"id": SUGGESTION}, SUGGESTION])
def test_accepted_suggestions_must_be_a_non_empty_array(suggestions: Any) -> None:
    assert problems({"feedback": [accepted(acceptedSuggestions=suggestions)]}) == (
        422,
        [("feedback[0].acceptedSuggestions", "structure")],
    )


def test_each_accepted_suggestion_needs_an_id() -> None:
    body = {"feedback": [accepted(acceptedSuggestions=[{"id": SUGGESTION}, {"uuid": SUGGESTION}, "s", {"id": ""}])]}
    assert problems(body) == (
        422,
        [
            ("feedback[0].acceptedSuggestions[1].id", "required"),
            ("feedback[0].acceptedSuggestions[2]", "structure"),
            ("feedback[0].acceptedSuggestions[3].id", "value"),
        ],
    )


@pytest.mark.parametrize("timestamp", ["1985-04-12T23:20:50", "12/04/1985", 482196050, ""])
def test_bad_outcome_timestamp(timestamp: Any) -> None:
    assert problems({"feedback": [accepted(outcomeTimestamp=timestamp)]}) == (
        422,
        [("feedback[0].outcomeTimestamp", "value")],
    )


def test_missing_outcome_timestamp() -> None:
    item = accepted()
    del item["outcomeTimestamp"]
    assert problems({"feedback": [item]}) == (422, [("feedback[0].outcomeTimestamp", "required")])


@pytest.mark.parametrize(
    ("override_reason", "expected"),
    [
        ("dismiss", [("feedback[0].overrideReason", "structure")]),
        ({"reason": "dismiss"}, [("feedback[0].overrideReason.reason", "structure")]),
        ({"reason": {"system": "http://sandbox"}}, [("feedback[0].overrideReason.reason.code", "required")]),
        ({"reason": {"code": "x", "display": 3}}, [("feedback[0].overrideReason.reason.display", "structure")]),
        ({"system": "http://sandbox"}, [("feedback[0].overrideReason.code", "required")]),
        ({"userComment": ["a"]}, [("feedback[0].overrideReason.userComment", "structure")]),
    ],
)
def test_bad_override_reason(override_reason: Any, expected: list[tuple[str, str]]) -> None:
    assert problems({"feedback": [overridden(overrideReason=override_reason)]}) == (422, expected)


def test_every_problem_is_reported_at_once() -> None:
    body = {
        "feedback": [
            accepted(),
            {"outcome": "accepted", "outcomeTimestamp": "soon"},
            overridden(card=""),
        ]
    }
    status, issues = problems(body)
    assert status == 422
    assert issues == [
        ("feedback[1].card", "required"),
        ("feedback[1].acceptedSuggestions", "required"),
        ("feedback[1].outcomeTimestamp", "value"),
        ("feedback[2].card", "value"),
    ]


def test_issue_messages_do_not_echo_what_was_sent() -> None:
    secretish = "Jane Doe MRN 123456"
    body = {"feedback": [overridden(card={"x": secretish}, outcome=secretish, outcomeTimestamp=secretish)]}
    with pytest.raises(ServiceError) as raised:
        parse_feedback(body)
    assert secretish not in str(raised.value.body())


def test_too_many_items() -> None:
    body = {"feedback": [overridden(card=f"card-{number}") for number in range(MAX_FEEDBACK_ITEMS + 1)]}
    assert problems(body) == (422, [("feedback", "too-costly")])


def test_service_error_body_is_an_operation_outcome() -> None:
    with pytest.raises(ServiceError) as raised:
        parse_feedback({"feedback": [overridden(outcome="nope")]})
    body = raised.value.body()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["expression"] == ["feedback[0].outcome"]
    assert body["issue"][0]["severity"] == "error"


# --------------------------------------------------------------------------------------------------------------
# Parsed feedback, stored


def test_repeated_sandbox_feedback_is_stored_once(tmp_path: Path) -> None:
    body = {
        "feedback": [
            overridden(overrideReason={"reason": {"code": "dismiss"}}),
            accepted(outcomeTimestamp="1985-04-12T23:20:50.520Z"),
        ]
    }
    resent = {
        "feedback": [
            overridden(overrideReason={"reason": {"code": "dismiss"}}, outcomeTimestamp="1985-04-12T19:20:50.52-04:00")
        ]
    }
    with AuditStore(f"sqlite:///{tmp_path}/audit.db") as store:
        assert store.record_feedback("ketamine-prior-auth", parse_feedback(body), issuer="https://sandbox") == 2
        assert store.record_feedback("ketamine-prior-auth", parse_feedback(resent), issuer="https://sandbox") == 0
        rows = store.feedback_for(CARD)
    assert sorted(row["outcome"] for row in rows) == ["accepted", "overridden"]
    stored_override = next(row for row in rows if row["outcome"] == "overridden")
    assert stored_override["override_reason"] == {"code": "dismiss", "system": None}
