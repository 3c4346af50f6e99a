"""One CDS Hooks 2.0 card per Decision: summary, indicator, markdown detail, source, links, suggestions.

The card advises; it never blocks (no `critical`). The detail puts the reason first, says which draft orders it
is about (CRD: cards about a subset of orders SHALL disambiguate in `detail`), then shows every criterion that
matters with its evidence and, for unknowns, exactly what to document.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date
from typing import Any, Protocol

from cards.config import CARD_TYPE_SYSTEMS, DEFAULT_CRD_VERSION, TOPIC_BY_OUTCOME, TOPIC_DISPLAY
from cards.text import (
    SERVICE_LABEL,
    SUMMARY_MAX,
    clip,
    evidence_list,
    fit,
    md_cell,
    md_link,
    md_text,
    one_line,
    payer_of,
    policy_long,
    policy_short,
    reference_links,
    service_name,
    stable_uuid,
)
from fhir_mappings.model import CriterionKind, CriterionResult, Decision, Outcome, Status

DECISION_EXTENSION = "ketamine-cds.decision"
ASSOCIATED_RESOURCE = "davinci-crd.associated-resource"
OVERRIDE_SYSTEM = "https://ketamine-cds.example.org/CodeSystem/override-reason"
DETAIL_MAX_BYTES = 6000

INDICATOR: dict[Outcome, str] = {
    Outcome.LIKELY_AUTHORIZED: "info",
    Outcome.DOCUMENTATION_NEEDED: "info",
    Outcome.PLAN_VARIATION: "info",
    Outcome.NOT_APPLICABLE: "info",
    Outcome.NO_POLICY: "info",
    Outcome.BLOCKED: "warning",
    Outcome.CRITERIA_NOT_MET: "warning",
    Outcome.NOT_COVERED: "warning",
}

OVERRIDE_CLEARANCE = {
    "system": OVERRIDE_SYSTEM,
    "code": "clearance-obtained",
    "display": "Specialist clearance obtained, not yet in record",
}
OVERRIDE_RECORD = {
    "system": OVERRIDE_SYSTEM,
    "code": "record-incorrect",
    "display": "Information in the record is incorrect",
}
OVERRIDE_EXCEPTION = {
    "system": OVERRIDE_SYSTEM,
    "code": "clinical-exception",
    "display": "Clinical exception / individual consideration requested",
}

NO_POLICY_REASONS = {
    "no-active-coverage": ("no active coverage on record; no payer policy applied", "No active coverage on record."),
    "coverage-ambiguous": (
        "several active coverages, none marked primary; no payer policy applied",
        "Several active coverages and none is marked primary.",
    ),
    "payer-not-handled": (
        "no ketamine policy is configured for this payer",
        "The payer has no ketamine policy configured in this service.",
    ),
    "plan-not-recognised": (
        "payer plan type not recognised; no payer policy applied",
        "The payer's plan type could not be recognised.",
    ),
}


class SuggestionLike(Protocol):
    """`fhir_mappings.policy.Suggestion`, once `CriterionResult` carries it (proposed field `suggestion`)."""

    label: str
    resource_type: str
    code: Mapping[str, str]


# --------------------------------------------------------------------------------------------------- summary


def summary(decision: Decision) -> str:
    """One sentence under 140 characters: the service and the outcome, naming the policy when there is one."""
    svc = service_name(decision)
    policy = decision.policy
    short = policy_short(policy) if policy else None
    outcome = decision.outcome
    if outcome is Outcome.LIKELY_AUTHORIZED:
        pa = "; prior authorization required" if not policy or policy.prior_authorization == "required" else ""
        text = f"{svc}: {short or 'payer'} criteria appear met{pa}"
    elif outcome is Outcome.DOCUMENTATION_NEEDED:
        n = len([c for c in decision.criteria if c.status is Status.UNKNOWN])
        what = f"document {n} item{'s' if n != 1 else ''}" if n else "documentation needed"
        text = f"{svc}: {what} for {short or 'payer'} prior authorization"
    elif outcome is Outcome.CRITERIA_NOT_MET:
        titles = "; ".join(one_line(c.title) for c in decision.by_status(CriterionKind.REQUIREMENT, Status.NOT_MET))
        text = fit(f"{svc}: {short or 'payer'} requirement not met (", titles, ")") if titles else ""
        text = text or f"{svc}: {short or 'payer'} requirement not met"
    elif outcome is Outcome.BLOCKED:
        titles = "; ".join(one_line(c.title) for c in decision.by_status(CriterionKind.EXCLUSION, Status.MET))
        text = fit(f"{svc}: {short or 'payer'} exclusion applies (", titles, ")") if titles else ""
        text = text or f"{svc}: {short or 'payer'} exclusion applies"
    elif outcome is Outcome.NOT_COVERED:
        if policy:
            text = f"{svc} is not covered by {one_line(policy.payer)} ({one_line(policy.number)})"
            if len(text) > SUMMARY_MAX:
                text = f"{svc} is not covered by {short}"
        else:
            text = f"{svc} is not covered by {payer_of(decision) or 'the payer'}"
    elif outcome is Outcome.PLAN_VARIATION:
        program = one_line(decision.program or "") or "another program"
        text = fit(f"{svc}: plan variation, decided under ", program, f", not {short}" if short else "")
    elif outcome is Outcome.NOT_APPLICABLE:
        if decision.program:
            text = fit(f"{svc}: " + (f"not under {short}; " if short else "") + "see ", decision.program)
        else:
            text = f"{svc}: outside the scope of {short or 'the payer policy'}"
    else:
        reason = NO_POLICY_REASONS.get(decision.program or "", ("no payer policy applied", ""))[0]
        text = f"{svc}: {reason}"
    return clip(text, SUMMARY_MAX)


# ---------------------------------------------------------------------------------------------------- detail


def _status_word(c: CriterionResult) -> tuple[str, str]:
    """(marker, status word) in the clinician's terms; for exclusions "met" means the exclusion holds."""
    if c.status is Status.UNKNOWN:
        return ("?", "Case review") if c.case_by_case else ("?", "Unknown")
    if c.kind is CriterionKind.REQUIREMENT:
        return ("✓", "Met") if c.status is Status.MET else ("✗", "Not met")
    if c.status is Status.MET:
        return "✗", "Exclusion applies"
    return ("✓", "Cleared") if c.cleared_by else ("✓", "Not present")


def _adverse(c: CriterionResult) -> bool:
    """The criterion counts against the order (a failing requirement, an exclusion that holds)."""
    return (c.kind is CriterionKind.REQUIREMENT and c.status is Status.NOT_MET) or (
        c.kind is CriterionKind.EXCLUSION and c.status is Status.MET
    )


SCOPE_OUTCOMES = (Outcome.NOT_COVERED, Outcome.NOT_APPLICABLE)


def _row(c: CriterionResult, cap: int, scope: bool = False) -> str:
    """One table row. Evidence: what the record showed (items, clearance, the engine's reading of them);
    what is needed: the exact ask for an unknown, or what would change an adverse result when known.

    `scope`: the row is the scope rule that decided a not-covered / not-applicable outcome (the engine
    reports it as a requirement "not met"); it reads "Applies", and its message is already the headline.
    """
    marker, word = ("!", "Applies") if scope else _status_word(c)
    shown = [evidence_list(c.evidence, cap)] if c.evidence else []
    if c.cleared_by:
        shown.append("cleared by " + evidence_list(c.cleared_by, cap))
    if c.explanation and not scope and (c.status is Status.UNKNOWN or _adverse(c) or not shown):
        shown.append(c.explanation)
    needed = ""
    if c.status is Status.UNKNOWN:
        needed = c.missing or "Document whether this applies."
    elif _adverse(c):
        needed = c.missing
    prefix = "Scope: " if scope else "Exclusion: " if c.kind is CriterionKind.EXCLUSION else ""
    cells = [marker, prefix + c.title, word, "; ".join(one_line(x) for x in shown) or "—", needed]
    return "| " + " | ".join(md_cell(x) for x in cells) + " |"


def _human(code: str) -> str:
    """ "integration-therapy" -> "Integration therapy"."""
    text = one_line(code.replace("-", " "))
    return text[:1].upper() + text[1:]


def _phase_line(decision: Decision) -> str:
    """ "**Initial authorization:** 28 days"; MP-054's covered service is named ("**Covered service:** …")."""
    service = getattr(decision, "service", None)
    phase = "initial authorization" if decision.phase == "initial" else (decision.phase or "")
    name = _human(phase) if phase else ("Authorization" if decision.authorization_days else "")
    lines = []
    if isinstance(service, str) and service:
        lines.append(f"**Covered service:** {md_text(_human(service))}")
    if name and decision.authorization_days:
        lines.append(f"**{md_text(name)}:** {decision.authorization_days} days")
    elif name:
        lines.append(f"**Evaluated as:** {md_text(name)}")
    return "\n\n".join(lines)


def _criteria_block(decision: Decision, level: int) -> list[str]:
    """The criteria table (requirements, then exclusions) and a compact line for absent exclusions.

    level 0: up to 3 evidence items per cell; 1: one item; 2: also met requirements and absent exclusions
    collapse into compact lines, so the unknown and adverse rows always fit.
    """
    if not decision.criteria:
        return []
    cap = 3 if level == 0 else 1
    requirements = [c for c in decision.criteria if c.kind is CriterionKind.REQUIREMENT]
    exclusions = [c for c in decision.criteria if c.kind is CriterionKind.EXCLUSION]

    def compact(c: CriterionResult) -> bool:
        if c.kind is CriterionKind.EXCLUSION and c.status is Status.NOT_MET and not c.evidence and not c.cleared_by:
            return True
        favourable = Status.MET if c.kind is CriterionKind.REQUIREMENT else Status.NOT_MET
        return level >= 2 and c.status is favourable

    rows = [c for c in (*requirements, *exclusions) if not compact(c)]
    lines: list[str] = []
    if rows:
        lines += ["| | Criterion | Status | Evidence | What is needed |", "|---|---|---|---|---|"]
        scope = decision.outcome in SCOPE_OUTCOMES
        lines += [_row(c, cap, scope) for c in rows]
        lines.append("")
    met_compact = [c for c in requirements if compact(c)]
    if met_compact:
        lines += ["**Requirements met:** " + md_text("; ".join(one_line(c.title) for c in met_compact)) + ".", ""]
    absent = [c for c in exclusions if compact(c)]
    if absent:
        titles = "; ".join(one_line(c.title) for c in absent)
        lines += ["**Exclusions not present** (none of): " + md_text(titles) + ".", ""]
    return lines


def detail(decision: Decision, level: int = 0) -> str:
    """GitHub-flavoured markdown, most important first; no raw HTML."""
    lines: list[str] = []
    if decision.headline:
        lines += [md_text(decision.headline), ""]
    refs = decision.order_refs
    order_word = "Orders" if len(refs) > 1 else "Order"
    if decision.order_label:
        lines += [f"**{order_word}:** {md_text(decision.order_label)}", ""]
    elif refs:
        lines += [f"**{order_word}:** {md_text(', '.join(refs))}", ""]
    if decision.policy:
        lines += [f"**Policy:** {md_text(policy_long(decision.policy))}: {md_text(decision.policy.title)}", ""]
    outcome = decision.outcome
    if outcome is Outcome.PLAN_VARIATION:
        lines += [f"**Governing program:** {md_text(decision.program or 'another program')}", ""]
        if decision.criteria and decision.policy:
            lines += [
                f"The {md_text(policy_short(decision.policy))} criteria below are shown for reference only: "
                f"they apply where the governing program is silent.",
                "",
            ]
    elif outcome is Outcome.NOT_APPLICABLE and decision.program:
        lines += [f"**Governed by:** {md_text(decision.program)}", ""]
    elif outcome is Outcome.NO_POLICY:
        reason = NO_POLICY_REASONS.get(decision.program or "")
        if reason and not decision.headline:
            lines += [f"**Reason:** {md_text(reason[1])}", ""]
        lines += ["No prior-authorization determination was made; check coverage with the payer.", ""]
    phase = _phase_line(decision)
    if phase:
        lines += [phase, ""]
    lines += _criteria_block(decision, level)
    if decision.notes:
        lines += ["**Notes**", ""] + [f"- {md_text(n)}" for n in decision.notes if one_line(n)] + [""]
    if decision.obligations:
        lines += ["**After the service, document:**", ""]
        lines += [f"- {md_text(o)}" for o in decision.obligations if one_line(o)] + [""]
    links = reference_links(decision)
    if links:
        lines += ["**References:** " + " · ".join(md_link(label, url) for label, url in links), ""]
    return "\n".join(lines).strip()


def fitted_detail(decision: Decision) -> str:
    """The fullest detail within DETAIL_MAX_BYTES; as a last resort cut at a line boundary and say so."""
    text = ""
    for level in (0, 1, 2):
        text = detail(decision, level)
        if len(text.encode()) <= DETAIL_MAX_BYTES:
            return text
    note = "\n\n(Detail shortened; see the policy for all criteria.)"
    budget = DETAIL_MAX_BYTES - len(note.encode())
    kept: list[str] = []
    size = 0
    for line in text.split("\n"):
        size += len(line.encode()) + 1
        if size > budget:
            break
        kept.append(line)
    if kept and kept[-1].startswith("|"):
        kept.append("")
    return "\n".join(kept).rstrip() + note


# ------------------------------------------------------------------------------------------------ suggestions


def _suggestion_of(result: CriterionResult) -> SuggestionLike | Mapping[str, Any] | None:
    return getattr(result, "suggestion", None)


def _suggestion_parts(raw: Any) -> tuple[str, str, dict[str, str]] | None:
    """(label, resource type, code) from a policy Suggestion or a {label, resource, code} mapping."""
    if isinstance(raw, Mapping):
        label, rtype, code = raw.get("label"), raw.get("resource") or raw.get("resource_type"), raw.get("code")
    else:
        label = getattr(raw, "label", None)
        rtype = getattr(raw, "resource_type", None) or getattr(raw, "resource", None)
        code = getattr(raw, "code", None)
    if not isinstance(label, str) or not label.strip() or rtype != "ServiceRequest" or not isinstance(code, Mapping):
        return None
    coding = {k: str(code[k]) for k in ("system", "code", "display") if code.get(k)}
    if "system" not in coding or "code" not in coding:
        return None
    return one_line(label), rtype, coding


def suggestions(
    decision: Decision, card_uuid: str, *, patient_id: str, user_id: str, today: date
) -> list[dict[str, Any]]:
    """A draft ServiceRequest (CRD profile-shaped) per unknown criterion whose policy defines one; no repeats."""
    out: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for result in decision.criteria:
        if result.status is not Status.UNKNOWN:
            continue
        parts = _suggestion_parts(_suggestion_of(result))
        if parts is None:
            continue
        label, rtype, coding = parts
        key = (coding["system"], coding["code"])
        if key in seen:
            continue
        seen.add(key)
        sid = stable_uuid(card_uuid, "suggestion", result.id, *key)
        resource: dict[str, Any] = {
            "resourceType": rtype,
            "id": sid,
            "status": "draft",
            "intent": "order",
            "code": {"coding": [coding], **({"text": coding["display"]} if "display" in coding else {})},
            "subject": {"reference": f"Patient/{patient_id}"},
            "authoredOn": today.isoformat(),
            "requester": {"reference": user_id},
        }
        what = coding.get("display") or f"{coding['system']} {coding['code']}"
        out.append(
            {
                "label": clip(label, 80),
                "uuid": sid,
                "isRecommended": False,
                "actions": [
                    {
                        "type": "create",
                        "description": clip(f"Create a draft order: {what} (for: {one_line(result.title)})", 200),
                        "resource": resource,
                    }
                ],
            }
        )
    return out


# ------------------------------------------------------------------------------------------------------ card


def _override_reasons(decision: Decision) -> list[dict[str, str]]:
    if decision.outcome is Outcome.BLOCKED:
        holding = decision.by_status(CriterionKind.EXCLUSION, Status.MET)
        clearable = any("clearance" in f"{c.title} {c.explanation} {c.missing}".lower() for c in holding)
        return [*([OVERRIDE_CLEARANCE] if clearable else []), OVERRIDE_RECORD, OVERRIDE_EXCEPTION]
    if decision.outcome is Outcome.CRITERIA_NOT_MET:
        return [OVERRIDE_RECORD, OVERRIDE_EXCEPTION]
    return []


def _source(decision: Decision, topic: str, crd_version: str) -> dict[str, Any]:
    if decision.policy:
        label = policy_long(decision.policy)
    else:
        label = payer_of(decision) or (
            one_line(decision.program) if decision.program and decision.outcome is not Outcome.NO_POLICY else ""
        )
        label = label or SERVICE_LABEL
    source: dict[str, Any] = {"label": clip(label, 200)}
    if decision.policy and re.match(r"^https?://[^/\s]+", decision.policy.url or ""):
        source["url"] = decision.policy.url
    source["topic"] = {"system": CARD_TYPE_SYSTEMS[crd_version], "code": topic, "display": TOPIC_DISPLAY[topic]}
    return source


def card_uuid(decision: Decision, hook_instance: str) -> str:
    """uuid5(hook instance, policy id — or the program for decisions without one —, order refs)."""
    key = decision.policy.id if decision.policy else f"{decision.outcome.value}:{decision.program or ''}"
    return stable_uuid("card", hook_instance, key, *decision.order_refs)


def build_card(
    decision: Decision,
    *,
    uuid: str,
    patient_id: str,
    user_id: str,
    today: date,
    crd_version: str = DEFAULT_CRD_VERSION,
) -> dict[str, Any]:
    """The card for one decision (the caller supplies a uuid unique within the response).

    CRD 2.0 and 2.2 cards differ only in the card-type system of `source.topic`.
    """
    topic = TOPIC_BY_OUTCOME[decision.outcome]
    card: dict[str, Any] = {
        "uuid": uuid,
        "summary": summary(decision),
        "indicator": INDICATOR[decision.outcome],
        "detail": fitted_detail(decision),
        "source": _source(decision, topic, crd_version),
    }
    extra = suggestions(decision, uuid, patient_id=patient_id, user_id=user_id, today=today)
    if extra:
        card["suggestions"] = extra
        card["selectionBehavior"] = "any"
    reasons = _override_reasons(decision)
    if reasons:
        card["overrideReasons"] = [dict(r) for r in reasons]
    links = reference_links(decision)
    if links:
        card["links"] = [{"label": clip(label, 200), "url": url, "type": "absolute"} for label, url in links]
    # The decision model owns the extension's shape (coverage included, empties dropped except `evidence`).
    extension: dict[str, Any] = {DECISION_EXTENSION: decision.to_extension()}
    if decision.order_refs:
        extension[ASSOCIATED_RESOURCE] = list(decision.order_refs)
    card["extension"] = extension
    return card
