"""Da Vinci CRD coverage-information, delivered as one `update` system action per evaluated draft order.

The draft order is echoed in its entirety and unchanged except for the extension (CRD 2.2 resp-37: no other
changes), so an EHR can apply the action as is.

CRD 2.0 (2.0.1, what Inferno tests): only codes and sub-extensions that are valid in both 2.0.1 and 2.2 are
used, and invariants crd-ci-q1..q5 hold for both versions: `pa-needed` is always present for
covered/conditional and never for not-covered; `info-needed` only when something is conditional. no-policy
decisions get no extension: there is no determination to assert.

CRD 2.2 adds, on top of the same outcome mapping (CoverageInformation.fsh at 2.2.1):
- `indeterminate` (resp-43) where the decision is undetermined because data could not be read — a criterion
  unknown because its data was unavailable, not because the record lacks it — with a `reason` coded
  `technical` that says what could not be read (crd-ci-q9);
- `expiry-date`: the last day of the authorization period the policy's phase asks for;
- `detail` policy links (`policy-link`, category `cat-other`) for the policy and the decision's references;
- a conditional assertion for a no-policy decision whose payer is handled but whose plan is not recognised
  (hook-16: primary hooks always carry coverage information; the other no-policy reasons are HTTP 400 in
  2.2, hook-13, decided by the service, not here).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, timedelta
from typing import Any

import orjson

from cards.config import CRD_2_2, DEFAULT_CRD_VERSION
from cards.text import clip, one_line, policy_short, reference_links, stable_uuid
from fhir_mappings.model import CriterionKind, CriterionResult, Decision, Outcome, Status

COVERAGE_INFORMATION_URL = "http://hl7.org/fhir/us/davinci-crd/StructureDefinition/ext-coverage-information"
REASON_MAX = 500  # reason text stays a sentence, not the card's detail

# CRD 2.2 terminology, exactly as CoverageInformation*.fsh and CRDTempCodes.fsh (2.2.1) define it.
CRD_TEMP_SYSTEM = "http://hl7.org/fhir/us/davinci-crd/CodeSystem/temp"  # ValueSet coverageAssertionReasons
TECHNICAL_REASON = {"system": CRD_TEMP_SYSTEM, "code": "technical", "display": "Technical issues"}
# ValueSet coverageDetailNew (extensible) = all of THO crd-coverage-detail; the old CRD temp code is an additional
# (extensible) binding "retained for backward compatibility": both codings are sent.
COVERAGE_DETAIL_SYSTEM = "http://terminology.hl7.org/CodeSystem/crd-coverage-detail"
POLICY_LINK = {
    "coding": [
        {"system": COVERAGE_DETAIL_SYSTEM, "code": "policy-link", "display": "Policy Link"},
        {"system": CRD_TEMP_SYSTEM, "code": "policy-link", "display": "Policy Link"},
    ]
}
INDETERMINATE = "indeterminate"
PLAN_NOT_RECOGNISED = "plan-not-recognised"  # Decision.program of a no-policy decision for a handled payer
# Outcomes whose assertion is about an authorization for the policy phase's period (-> expiry-date in 2.2).
AUTHORIZATION_OUTCOMES = (Outcome.LIKELY_AUTHORIZED, Outcome.DOCUMENTATION_NEEDED)


@dataclass(frozen=True)
class Assertion:
    """The coverage-information values for one outcome (the mapping table in the cards README/report)."""

    covered: str
    pa_needed: str | None = None
    doc_needed: tuple[str, ...] = ()
    doc_purpose: str | None = None
    info_needed: str | None = None


ASSERTIONS: dict[Outcome, Assertion] = {
    Outcome.LIKELY_AUTHORIZED: Assertion("covered", "auth-needed"),
    Outcome.DOCUMENTATION_NEEDED: Assertion("covered", "auth-needed", doc_needed=("clinical",), doc_purpose="withpa"),
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
        "covered", "conditional", doc_needed=("clinical",), doc_purpose="withclaim", info_needed="OTH"
    ),
    Outcome.CRITERIA_NOT_MET: Assertion("conditional", "conditional", info_needed="OTH"),
}

# CRD 2.2 only: the payer is handled but its plan could not be recognised, so coverage depends on information
# the request does not carry (the plan). Not `not-covered` (resp-45 is for a coverage that cannot be resolved
# at all): a single Coverage was resolved, and "not covered" would be a claim this service cannot make.
PLAN_UNKNOWN = Assertion("conditional", "conditional", info_needed="OTH")


def assertion_for(decision: Decision) -> Assertion | None:
    """The CRD 2.0 coverage-information values for a decision (None: no coverage-information, e.g. no policy)."""
    if decision.policy is not None and decision.policy.prior_authorization == "not-stated":
        stated = PA_NOT_STATED.get(decision.outcome)
        if stated is not None:
            return stated
    return ASSERTIONS.get(decision.outcome)


# ---------------------------------------------------------------------------------- unavailable data (2.2)


def unavailable_data(result: CriterionResult) -> tuple[str, ...]:
    """The resource types an unknown criterion needed but could not read (`CriterionResult.unavailable`, set by
    the engine); () when it is unknown because the record does not document it, or the policy leaves it to
    case review, or it is not unknown."""
    if result.status is not Status.UNKNOWN or result.case_by_case:
        return ()
    return result.unavailable


def technical_gaps(decision: Decision) -> list[CriterionResult]:
    """The criteria that leave a documentation-needed decision undetermined because data could not be read.

    Only a documentation-needed decision is undetermined: when a requirement clearly fails or an exclusion holds,
    the outcome stands whatever the unread data would have shown.
    """
    if decision.outcome is not Outcome.DOCUMENTATION_NEEDED:
        return []
    return [c for c in decision.criteria if unavailable_data(c)]


def assertion_22(decision: Decision) -> Assertion | None:
    """The CRD 2.2 values: the 2.0 mapping, with `indeterminate` where unread data leaves it undetermined.

    doc-needed is indeterminate (and also `clinical` when other unknowns are simply undocumented); `covered` is
    indeterminate too when an exclusion could not be read, because an exclusion that holds means not covered.
    pa-needed stays: whether the policy requires prior authorization does not depend on the record.
    """
    base = assertion_for(decision)
    if base is None:
        if decision.outcome is Outcome.NO_POLICY and decision.program == PLAN_NOT_RECOGNISED:
            return PLAN_UNKNOWN
        return None
    gaps = technical_gaps(decision)
    if not gaps:
        return base
    undocumented = [c for c in decision.criteria if c.status is Status.UNKNOWN and c not in gaps]
    covered = INDETERMINATE if any(c.kind is CriterionKind.EXCLUSION for c in gaps) else base.covered
    return replace(
        base,
        covered=covered,
        doc_needed=(*(base.doc_needed if undocumented else ()), INDETERMINATE),
        doc_purpose=base.doc_purpose if undocumented else None,
    )


# ----------------------------------------------------------------------------------------------- reasons


def assertion_id(hook_instance: str, coverage_ref: str) -> str:
    """Same coverage in one response -> same id; different coverage -> different id (CRD 2.0.1 SHALL)."""
    return stable_uuid("coverage-assertion", hook_instance, coverage_ref)


def _titles(decision: Decision, kind: CriterionKind, status: Status) -> list[str]:
    return [one_line(c.title) for c in decision.by_status(kind, status)]


def reason_text(decision: Decision, *, leave_out: Sequence[CriterionResult] = ()) -> str:
    """One sentence naming why: what is missing, the failing requirement, the exclusion, the program.

    `leave_out`: unknown criteria the documentation sentence does not list (2.2: those a technical reason names).
    """
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
        unknown = [c for c in decision.criteria if c.status is Status.UNKNOWN and c not in leave_out]
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
    elif outcome is Outcome.NO_POLICY:
        text = (headline + " " if headline else "") + "No coverage determination could be made for this plan."
    return clip(text or f"Outcome: {outcome.value}", REASON_MAX)


def technical_reason_text(gaps: Sequence[CriterionResult]) -> str:
    """resp-43's reason.text: what could not be read and which criteria it leaves undetermined (no PHI)."""
    types: list[str] = []
    for gap in gaps:
        types += [t for t in unavailable_data(gap) if t not in types]
    titles = "; ".join(one_line(g.title) for g in gaps)
    return clip(
        f"{', '.join(types)} could not be read completely from the EHR's FHIR server, so these criteria could not "
        f"be determined: {titles}. Calling again when the data can be read may give a determination.",
        REASON_MAX,
    )


# ------------------------------------------------------------------------------------------ the extension


def _code_parts(assertion: Assertion) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"url": "covered", "valueCode": assertion.covered}]
    if assertion.pa_needed:
        parts.append({"url": "pa-needed", "valueCode": assertion.pa_needed})
    parts += [{"url": "doc-needed", "valueCode": code} for code in assertion.doc_needed]
    if assertion.doc_purpose:
        parts.append({"url": "doc-purpose", "valueCode": assertion.doc_purpose})
    if assertion.info_needed:
        parts.append({"url": "info-needed", "valueCode": assertion.info_needed})
    return parts


def expiry_date(decision: Decision, today: date) -> date | None:
    """The last day of the authorization period the phase asks for, counting the evaluation date as day 1
    (a 28-day initial authorization evaluated on 2026-01-15 runs to 2026-02-11); never later than that."""
    days = decision.authorization_days
    if decision.outcome not in AUTHORIZATION_OUTCOMES or not isinstance(days, int) or days < 1:
        return None
    return today + timedelta(days=days - 1)


def _policy_links(decision: Decision) -> list[dict[str, Any]]:
    """CRD 2.2 `detail` repetitions: one policy-link per reference (policy first for policies, program first for
    plan variations), the link's label as the qualification."""
    return [
        {
            "url": "detail",
            "extension": [
                {"url": "category", "valueCode": "cat-other"},
                {"url": "code", "valueCodeableConcept": copy.deepcopy(POLICY_LINK)},
                {"url": "value", "valueUrl": url},
                {"url": "qualification", "valueString": clip(label, 200)},
            ],
        }
        for label, url in reference_links(decision)
    ]


def coverage_information(
    decision: Decision, *, hook_instance: str, today: date, crd_version: str = DEFAULT_CRD_VERSION
) -> dict[str, Any] | None:
    """The ext-coverage-information extension for a decision, or None (no determination / no Coverage identified)."""
    if crd_version == CRD_2_2:
        return _coverage_information_22(decision, hook_instance=hook_instance, today=today)
    assertion = assertion_for(decision)
    if assertion is None or not decision.coverage_ref:
        return None
    parts: list[dict[str, Any]] = [
        {"url": "coverage", "valueReference": {"reference": decision.coverage_ref}},
        *_code_parts(assertion),
        {"url": "reason", "valueCodeableConcept": {"text": reason_text(decision)}},
        {"url": "date", "valueDate": today.isoformat()},
        {"url": "coverage-assertion-id", "valueString": assertion_id(hook_instance, decision.coverage_ref)},
    ]
    return {"url": COVERAGE_INFORMATION_URL, "extension": parts}


def _coverage_information_22(decision: Decision, *, hook_instance: str, today: date) -> dict[str, Any] | None:
    assertion = assertion_22(decision)
    if assertion is None or not decision.coverage_ref:
        return None
    gaps = technical_gaps(decision)
    reasons: list[dict[str, Any]] = []
    if not gaps or any(c.status is Status.UNKNOWN and c not in gaps for c in decision.criteria):
        reasons.append({"text": reason_text(decision, leave_out=gaps)})
    if gaps:
        reasons.append({"coding": [dict(TECHNICAL_REASON)], "text": technical_reason_text(gaps)})
    parts: list[dict[str, Any]] = [
        {"url": "coverage", "valueReference": {"reference": decision.coverage_ref}},
        *_code_parts(assertion),
        *({"url": "reason", "valueCodeableConcept": reason} for reason in reasons),
        *_policy_links(decision),
        {"url": "date", "valueDate": today.isoformat()},
        {"url": "coverage-assertion-id", "valueString": assertion_id(hook_instance, decision.coverage_ref)},
    ]
    expiry = expiry_date(decision, today)
    if expiry is not None:
        parts.append({"url": "expiry-date", "valueDate": expiry.isoformat()})
    return {"url": COVERAGE_INFORMATION_URL, "extension": parts}


# --------------------------------------------------------------------------------------- system actions


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
    resource = _json_copy(dict(order))
    kept = [e for e in resource.get("extension") or [] if not (isinstance(e, Mapping) and _is_ci(e))]
    resource["extension"] = [*kept, _json_copy(dict(extension))]
    return resource


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of parsed JSON through orjson (a tenth of `copy.deepcopy`'s time, on every evaluated order);
    whatever orjson cannot write back (a non-JSON value, a huge integer) is deep-copied as before."""
    try:
        copied = orjson.loads(orjson.dumps(value))
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return copy.deepcopy(value)
    return copied if copied == value else copy.deepcopy(value)


def _is_ci(extension: Mapping[str, Any]) -> bool:
    return extension.get("url") == COVERAGE_INFORMATION_URL


def _description(ref: str, decision: Decision, assertion: Assertion) -> str:
    words = {
        "covered": "covered",
        "not-covered": "not covered",
        "conditional": "coverage conditional",
        INDETERMINATE: "coverage not determined",
    }[assertion.covered]
    pa = {
        "auth-needed": "prior authorization needed",
        "conditional": "prior authorization conditional",
    }.get(assertion.pa_needed or "")
    doc = ", clinical documentation needed" if "clinical" in assertion.doc_needed else ""
    if INDETERMINATE in assertion.doc_needed:
        doc += ", documentation requirements not determined (data could not be read)"
    name = f" ({policy_short(decision.policy)})" if decision.policy else ""
    return f"Record coverage information on {ref}{name}: {words}" + (f", {pa}" if pa else "") + doc


def system_actions(
    decisions: Sequence[Decision],
    draft_orders: Sequence[Mapping[str, Any]],
    *,
    hook_instance: str,
    today: date,
    crd_version: str = DEFAULT_CRD_VERSION,
) -> list[dict[str, Any]]:
    """One `update` per draft order in a decision with a Coverage; the first decision naming an order wins.

    Orders a decision names but the request does not carry cannot be echoed and are skipped.
    """
    index = order_index(draft_orders)
    actions: list[dict[str, Any]] = []
    done: set[str] = set()
    for decision in decisions:
        extension = coverage_information(decision, hook_instance=hook_instance, today=today, crd_version=crd_version)
        if extension is None:
            continue
        assertion = assertion_22(decision) if crd_version == CRD_2_2 else assertion_for(decision)
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
