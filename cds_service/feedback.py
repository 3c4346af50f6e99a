"""Validation of CDS Hooks 2.0 feedback bodies (`POST /cds-services/{id}/feedback`).

Strict where storage depends on it (card uuid, outcome, timestamp: the idempotency key), lenient where
clients are known to differ: the CDS Hooks sandbox sends `overrideReason.reason` as `{code, system?}`
without `display`, and older sandbox builds sent `overrideReason` itself as `{code, system}`. Unknown keys
are ignored. Every problem is reported at once, each as an Issue with its location, so a client developer
can fix them in one round. Messages name fields and rules only, never the values sent (user comments and
identifiers may carry PHI).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from cds_service.audit import FeedbackItem
from cds_service.errors import Issue, ServiceError

OUTCOMES = ("accepted", "overridden")
MAX_FEEDBACK_ITEMS = 500  # one card list's worth is a handful; more is a broken or hostile client
MAX_ID_LENGTH = 256  # card and suggestion uuids are 36 characters; bound what we index and store

# RFC 3339 §5.6 date-time. Offsets other than Z are accepted and converted to UTC (lenient); a missing
# offset is not, because the instant would be ambiguous and it is part of the idempotency key.
_RFC3339 = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})[Tt ]"
    r"(?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2})(?:\.(?P<fraction>\d+))?"
    r"(?P<offset>[Zz]|[+-]\d{2}:\d{2})"
)


def parse_feedback(body: Any) -> list[FeedbackItem]:
    """Validate a feedback request body and return its items.

    Raises ServiceError(400) when the body is not a JSON object, ServiceError(422) listing every problem
    when it is an object that does not conform (CRD: 400 for unparsable, 422 for non-conformant).
    An empty `feedback` array is accepted and yields no items.
    """
    if not isinstance(body, dict):
        raise ServiceError(400, [Issue("the request body must be a JSON object", code="structure")])
    entries = body.get("feedback")
    if entries is None:
        raise ServiceError(422, [Issue("feedback is required", code="required", expression="feedback")])
    if not isinstance(entries, list):
        raise ServiceError(422, [Issue("feedback must be an array", code="structure", expression="feedback")])
    if len(entries) > MAX_FEEDBACK_ITEMS:
        raise ServiceError(
            422,
            [
                Issue(
                    f"at most {MAX_FEEDBACK_ITEMS} feedback items per request", code="too-costly", expression="feedback"
                )
            ],
        )

    issues: list[Issue] = []
    items: list[FeedbackItem] = []
    for index, entry in enumerate(entries):
        item = _parse_item(entry, f"feedback[{index}]", issues)
        if item is not None:
            items.append(item)
    if issues:
        raise ServiceError(422, issues)
    return items


def parse_rfc3339(value: str) -> datetime | None:
    """Parse an RFC 3339 date-time into an aware UTC datetime; None if it is not one.

    Fractions beyond microseconds are truncated (Python's resolution), so "…50.52Z" and "…50.520Z" are the
    same instant and therefore the same feedback.
    """
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    parts = match.groupdict()
    offset = parts["offset"]
    if offset in {"Z", "z"}:
        zone = UTC
    else:
        sign = 1 if offset[0] == "+" else -1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            return None
        zone = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        moment = datetime(
            int(parts["year"]),
            int(parts["month"]),
            int(parts["day"]),
            int(parts["hour"]),
            int(parts["minute"]),
            int(parts["second"]),
            int((parts["fraction"] or "0")[:6].ljust(6, "0")),
            tzinfo=zone,
        )
    except ValueError:  # month 13, second 60 (leap seconds are not representable), …
        return None
    return moment.astimezone(UTC)


def _parse_item(entry: Any, where: str, issues: list[Issue]) -> FeedbackItem | None:
    """One feedback entry; appends its problems to `issues` and returns None if there are any."""
    if not isinstance(entry, dict):
        issues.append(Issue("each feedback item must be an object", code="structure", expression=where))
        return None
    found_before = len(issues)

    card_uuid = _required_id(entry.get("card"), f"{where}.card", "card (the card's uuid)", issues)

    outcome = entry.get("outcome")
    if outcome is None:
        issues.append(Issue("outcome is required", code="required", expression=f"{where}.outcome"))
    elif outcome not in OUTCOMES:
        issues.append(Issue("outcome must be 'accepted' or 'overridden'", code="value", expression=f"{where}.outcome"))

    # acceptedSuggestions are only meaningful (and only required) when the card was accepted.
    accepted_suggestions: tuple[str, ...] = ()
    if outcome == "accepted":
        accepted_suggestions = _accepted_suggestions(entry.get("acceptedSuggestions"), where, issues)

    override_reason, user_comment = _override_reason(entry.get("overrideReason"), f"{where}.overrideReason", issues)

    outcome_timestamp: datetime | None = None
    raw_timestamp = entry.get("outcomeTimestamp")
    if raw_timestamp is None:
        issues.append(Issue("outcomeTimestamp is required", code="required", expression=f"{where}.outcomeTimestamp"))
    elif not isinstance(raw_timestamp, str) or (outcome_timestamp := parse_rfc3339(raw_timestamp)) is None:
        issues.append(
            Issue(
                "outcomeTimestamp must be an RFC 3339 date-time with a time zone, e.g. 1985-04-12T23:20:50.52Z",
                code="value",
                expression=f"{where}.outcomeTimestamp",
            )
        )

    if len(issues) > found_before:
        return None
    assert card_uuid is not None and outcome_timestamp is not None
    return FeedbackItem(
        card_uuid=card_uuid,
        outcome=outcome,
        outcome_timestamp=outcome_timestamp,
        accepted_suggestions=accepted_suggestions,
        override_reason=override_reason,
        user_comment=user_comment,
    )


def _required_id(value: Any, where: str, name: str, issues: list[Issue]) -> str | None:
    """A non-empty identifier string of bounded length (a card or suggestion uuid)."""
    if value is None:
        issues.append(Issue(f"{name} is required", code="required", expression=where))
        return None
    if not isinstance(value, str) or not value.strip():
        issues.append(Issue(f"{name} must be a non-empty string", code="value", expression=where))
        return None
    if len(value) > MAX_ID_LENGTH:
        issues.append(Issue(f"{name} is longer than {MAX_ID_LENGTH} characters", code="value", expression=where))
        return None
    return value.strip()


def _accepted_suggestions(value: Any, where: str, issues: list[Issue]) -> tuple[str, ...]:
    """`acceptedSuggestions`: required for accepted cards, a non-empty array of `{"id": suggestion uuid}`."""
    location = f"{where}.acceptedSuggestions"
    if value is None:
        issues.append(
            Issue("acceptedSuggestions is required when outcome is 'accepted'", code="required", expression=location)
        )
        return ()
    if not isinstance(value, list) or not value:
        issues.append(Issue("acceptedSuggestions must be a non-empty array", code="structure", expression=location))
        return ()
    ids: list[str] = []
    for index, suggestion in enumerate(value):
        if not isinstance(suggestion, dict):
            issues.append(
                Issue(
                    "each accepted suggestion must be an object with an id",
                    code="structure",
                    expression=f"{location}[{index}]",
                )
            )
            continue
        suggestion_id = _required_id(
            suggestion.get("id"), f"{location}[{index}].id", "id (the suggestion's uuid)", issues
        )
        if suggestion_id is not None:
            ids.append(suggestion_id)
    return tuple(ids)


def _override_reason(value: Any, where: str, issues: list[Issue]) -> tuple[dict | None, str | None]:
    """`overrideReason` in the 2.0 form `{reason: Coding, userComment}` or the old sandbox form `{code, system}`.

    Returns the normalised Coding `{"code", "system", "display"?}` (or None) and the user comment (or None).
    """
    if value is None:
        return None, None
    if not isinstance(value, dict):
        issues.append(Issue("overrideReason must be an object", code="structure", expression=where))
        return None, None

    user_comment = value.get("userComment")
    if user_comment is not None and not isinstance(user_comment, str):
        issues.append(Issue("userComment must be a string", code="structure", expression=f"{where}.userComment"))
        user_comment = None
    if isinstance(user_comment, str) and not user_comment.strip():
        user_comment = None

    if "reason" in value:
        coding, coding_where = value["reason"], f"{where}.reason"
    elif "code" in value or "system" in value:  # older sandbox builds: the Coding itself
        coding, coding_where = {key: value[key] for key in ("code", "system", "display") if key in value}, where
    else:
        return None, user_comment

    if coding is None:
        return None, user_comment
    if not isinstance(coding, dict):
        issues.append(Issue("reason must be a Coding object", code="structure", expression=coding_where))
        return None, user_comment

    code = coding.get("code")
    if not isinstance(code, str) or not code.strip():
        issues.append(
            Issue("reason.code must be a non-empty string", code="required", expression=f"{coding_where}.code")
        )
        return None, user_comment
    reason: dict[str, Any] = {"code": code.strip(), "system": None}
    for key in ("system", "display"):
        if coding.get(key) is None:
            continue
        if not isinstance(coding[key], str):
            issues.append(Issue(f"reason.{key} must be a string", code="structure", expression=f"{coding_where}.{key}"))
            continue
        reason[key] = coding[key]
    return reason, user_comment
