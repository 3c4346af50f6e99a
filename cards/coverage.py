"""Da Vinci CRD 2.0.1 coverage-information, delivered as one `update` system action per evaluated draft order.

The draft order is echoed in its entirety and unchanged except for the extension (CRD 2.2 resp-37: no other
changes), so an EHR can apply the action as is. Only codes and sub-extensions that are valid in both CRD 2.0.1
(what Inferno tests) and 2.2 are used, and invariants crd-ci-q1..q5 hold for both versions: `pa-needed` is
always present for covered/conditional and never for not-covered; `info-needed` only when something is
conditional. no-policy decisions get no extension: there is no determination to assert.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from cards.text import clip, one_line, policy_short, stable_uuid
from fhir_mappings.model import CriterionKind, Decision, Outcome, Status

COVERAGE_INFORMATION_URL = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
REASON_MAX = 500  # reason text stays a sentence, not the card's detail


@dataclass(frozen=True)
class Assertion:
    """The coverage-information values for one outcome (the mapping table in the cards README/report)."""

    covered: str
    pa_needed: str | None = None
    doc_needed: str | None = None
    doc_purpose: str | None = None
    info_needed: str | None = None


ASSERTIONS: dict[Outcome, Assertion] = {
    Outcome.LIKELY_AUTHORIZED: Assertion("covered", "auth-needed"),
    Outcome.DOCUMENTATION_NEEDED: Assertion("covered", "auth-needed", doc_needed="clinical", doc_purpose="withpa"),
    Outcome.CRITERIA_NOT_MET: Assertion("conditional", "auth-needed", info_needed="OTH"),
    Outcome.BLOCKED: Assertion("not-covered"),
    Outcome.NOT_COVERED: Assertion("not-covered"),
    Outcome.PLAN_VARIATION: Assertion("conditional", "conditional", info_needed="OTH"),
    Outcome.NOT_APPLICABLE: Assertion("conditional", "conditional", info_needed="OTH"),
}


# When the policy does not say whether prior authorization is required (MP-054), a covered service's
# pa-needed is "conditional" (with info-needed OTH and the reason saying so) and missing documentation goes
# with the claim rather than with a prior-authorization request.
PA_NOT_STATED: dict[Outcome, Assertion] = {
    Outcome.LIKELY_AUTHORIZED: Assertion("covered", "conditional", info_needed="OTH"),
    Outcome.DOCUMENTATION_NEEDED: Assertion(
        "covered", "conditional", doc_needed="clinical", doc_purpose="withclaim", info_needed="OTH"
    ),
    Outcome.CRITERIA_NOT_MET: Assertion("conditional", "conditional", info_needed="OTH"),
}


def assertion_for(decision: Decision) -> Assertion | None:
    """The coverage-information values for a decision (None: no coverage-information, e.g. no policy)."""
    if decision.policy is not None and decision.policy.prior_authorization == "not-stated":
        stated = PA_NOT_STATED.get(decision.outcome)
        if stated is not None:
            return stated
    return ASSERTIONS.get(decision.outcome)


def assertion_id(hook_instance: str, coverage_ref: str) -> str:
    """Same coverage in one response -> same id; different coverage -> different id (CRD 2.0.1 SHALL)."""
    return stable_uuid("coverage-assertion", hook_instance, coverage_ref)


def _titles(decision: Decision, kind: CriterionKind, status: Status) -> list[str]:
    return [one_line(c.title) for c in decision.by_status(kind, status)]


def reason_text(decision: Decision) -> str:
    """One sentence naming why: what is missing, the failing requirement, the exclusion, the program."""
    name = policy_short(decision.policy) if decision.policy else None
    under = f" under {name}" if name else ""
    headline = one_line(decision.headline)
    outcome = decision.outcome
    text = headline
    pa_stated = decision.policy is None or decision.policy.prior_authorization == "required"
    if outcome is Outcome.LIKELY_AUTHORIZED:
        text = (
            f"Prior authorization criteria{under} appear met; submit the prior authorization request."
            if pa_stated
            else f"Coverage criteria{under} appear met; the policy does not say whether prior authorization is needed."
        )
    elif outcome is Outcome.DOCUMENTATION_NEEDED:
        unknown = [c for c in decision.criteria if c.status is Status.UNKNOWN]
        items = [one_line(c.missing or c.title).rstrip(".") for c in unknown]
        purpose = "prior authorization" if pa_stated else "coverage"
        text = f"Documentation needed for {purpose}{under}: " + "; ".join(items) if items else headline
    elif outcome is Outcome.CRITERIA_NOT_MET:
        failing = _titles(decision, CriterionKind.REQUIREMENT, Status.NOT_MET)
        text = f"Requirement not met{under}: " + "; ".join(failing) if failing else headline
    elif outcome is Outcome.BLOCKED:
        excluded = _titles(decision, CriterionKind.EXCLUSION, Status.MET)
        text = f"Exclusion applies{under}: " + "; ".join(excluded) if excluded else headline
    elif outcome is Outcome.PLAN_VARIATION and decision.program:
        text = f"Coverage is decided under {one_line(decision.program)}" + (f", not {name}" if name else "") + "."
        text += f" {headline}" if headline else ""
    elif outcome is Outcome.NOT_APPLICABLE and decision.program:
        text = headline or f"Governed by {one_line(decision.program)}."
    return clip(text or f"Outcome: {outcome.value}", REASON_MAX)


def coverage_information(decision: Decision, *, hook_instance: str, today: date) -> dict[str, Any] | None:
    """The ext-coverage-information extension for a decision, or None (no-policy / no Coverage identified)."""
    assertion = assertion_for(decision)
    if assertion is None or not decision.coverage_ref:
        return None
    parts: list[dict[str, Any]] = [
        {"url": "coverage", "valueReference": {"reference": decision.coverage_ref}},
        {"url": "covered", "valueCode": assertion.covered},
    ]
    if assertion.pa_needed:
        parts.append({"url": "pa-needed", "valueCode": assertion.pa_needed})
    if assertion.doc_needed:
        parts.append({"url": "doc-needed", "valueCode": assertion.doc_needed})
    if assertion.doc_purpose:
        parts.append({"url": "doc-purpose", "valueCode": assertion.doc_purpose})
    if assertion.info_needed:
        parts.append({"url": "info-needed", "valueCode": assertion.info_needed})
    parts += [
        {"url": "reason", "valueCodeableConcept": {"text": reason_text(decision)}},
        {"url": "date", "valueDate": today.isoformat()},
        {"url": "coverage-assertion-id", "valueString": assertion_id(hook_instance, decision.coverage_ref)},
    ]
    return {"url": COVERAGE_INFORMATION_URL, "extension": parts}


def order_index(draft_orders: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """ "Type/id" -> draft order resource; Bundle entries ({"resource": …}) are accepted too."""
    index: dict[str, Mapping[str, Any]] = {}
    for item in draft_orders or ():
        resource = item.get("resource") if isinstance(item, Mapping) and "resourceType" not in item else item
        if isinstance(resource, Mapping) and resource.get("resourceType") and resource.get("id"):
            index.setdefault(f"{resource['resourceType']}/{resource['id']}", resource)
    return index


def with_extension(order: Mapping[str, Any], extension: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of the order whose only change is the coverage-information extension (an old one replaced)."""
    resource = copy.deepcopy(dict(order))
    kept = [e for e in resource.get("extension") or [] if not (isinstance(e, Mapping) and _is_ci(e))]
    resource["extension"] = [*kept, copy.deepcopy(dict(extension))]
    return resource


def _is_ci(extension: Mapping[str, Any]) -> bool:
    return extension.get("url") == COVERAGE_INFORMATION_URL


def _description(ref: str, decision: Decision, assertion: Assertion) -> str:
    words = {
        "covered": "covered",
        "not-covered": "not covered",
        "conditional": "coverage conditional",
    }[assertion.covered]
    pa = {
        "auth-needed": "prior authorization needed",
        "conditional": "prior authorization conditional",
    }.get(assertion.pa_needed or "")
    doc = ", clinical documentation needed" if assertion.doc_needed else ""
    name = f" ({policy_short(decision.policy)})" if decision.policy else ""
    return f"Record coverage information on {ref}{name}: {words}" + (f", {pa}" if pa else "") + doc


def system_actions(
    decisions: Sequence[Decision], draft_orders: Sequence[Mapping[str, Any]], *, hook_instance: str, today: date
) -> list[dict[str, Any]]:
    """One `update` per draft order in a decision with a Coverage; the first decision naming an order wins.

    Orders a decision names but the request does not carry cannot be echoed and are skipped.
    """
    index = order_index(draft_orders)
    actions: list[dict[str, Any]] = []
    done: set[str] = set()
    for decision in decisions:
        extension = coverage_information(decision, hook_instance=hook_instance, today=today)
        if extension is None:
            continue
        assertion = assertion_for(decision)
        assert assertion is not None  # coverage_information() returned an extension
        for ref in decision.order_refs:
            order = index.get(ref)
            if order is None or ref in done:
                continue
            done.add(ref)
            actions.append(
                {
                    "type": "update",
                    "description": _description(ref, decision, assertion),
                    "resource": with_extension(order, extension),
                }
            )
    return actions
