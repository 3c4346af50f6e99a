"""From facts to criteria to a decision, for one group of draft orders under one policy.

Requirement:  met if `met_when` is True; not met if `met_when` is False *and* `not_met_when` is True
              (the record positively shows failure: age 17, a bipolar history, three trials);
              otherwise unknown — with `case_by_case` when the policy leaves it to individual review.
Exclusion:    holds (status "met") if `holds_when` is True and no documented clearance lifts it;
              "not-met" if it is False (data read, nothing found) or lifted; unknown otherwise.
Outcome:      blocked (an exclusion holds) > criteria-not-met (a requirement fails) >
              documentation-needed (anything unknown) > likely-authorized. Unknown is never met.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from fhir_mappings.facts import FactContext
from fhir_mappings.model import (
    CriterionKind,
    CriterionResult,
    Decision,
    Evidence,
    FactState,
    Outcome,
    Status,
)
from fhir_mappings.orders import OrderGroup
from fhir_mappings.policy import Criterion, Phase, Policy
from fhir_mappings.record import Availability, PatientRecord
from fhir_mappings.rules import Rule, Verdict


def _unread(criterion: Criterion, ctx: FactContext) -> tuple[str, ...]:
    """The resource types the criterion reads that were not fully read."""
    return tuple(t for t in sorted(criterion.reads) if ctx.record.availability(t) is not Availability.READ)


def _checked(criterion: Criterion, ctx: FactContext) -> str:
    """What was looked at, e.g. "checked 14 Condition, 31 Observation (all read)"."""
    types = sorted(criterion.reads)
    if not types:
        return ""
    parts = []
    incomplete = []
    for rtype in types:
        parts.append(f"{len(ctx.record.of_type(rtype))} {rtype}")
        if ctx.record.availability(rtype) is not Availability.READ:
            incomplete.append(rtype)
    text = "checked " + ", ".join(parts)
    if incomplete:
        text += f"; not fully available: {', '.join(incomplete)}"
    return text


def evaluate_criterion(criterion: Criterion, ctx: FactContext, trace: list[str] | None = None) -> CriterionResult:
    """The criterion's status with its evidence. Explain tools pass `trace`, which receives the rule branch that
    decided ("met_when is true", "holds_when is true, lifted_by is true", ...); nothing else changes."""

    def result(
        status: Status,
        verdict: Verdict | None,
        explanation: str = "",
        missing: str = "",
        cleared: tuple[Evidence, ...] = (),
        case_by_case: bool = False,
        unavailable: tuple[str, ...] = (),
        branch: str = "",
    ) -> CriterionResult:
        if trace is not None:
            trace.append(branch)
        suggestion = criterion.suggestion
        clearable = criterion.lifted_by is not None
        if status is Status.MET and clearable and not missing:
            missing = criterion.ask or f"Document {criterion.clearance} clearance for IV ketamine."
        return CriterionResult(
            id=criterion.id,
            kind=criterion.kind,
            title=criterion.title,
            quote=criterion.quote,
            status=status,
            evidence=_unique(verdict.evidence) if verdict else (),
            explanation=explanation,
            missing=missing,
            cleared_by=cleared,
            case_by_case=case_by_case,
            clearable=clearable,
            unavailable=unavailable,
            suggestion=(
                {"label": suggestion.label, "resource": suggestion.resource_type, "code": dict(suggestion.code)}
                if suggestion is not None and status is Status.UNKNOWN
                else None
            ),
        )

    def review() -> Verdict | None:
        if criterion.case_by_case_when is None:
            return None
        verdict = criterion.case_by_case_when.evaluate(ctx)
        return verdict if verdict.value is True else None

    if criterion.kind is CriterionKind.REQUIREMENT:
        assert criterion.met_when is not None
        met = _strictly(criterion.met_when, ctx)
        if met.value is True:
            return result(Status.MET, met, branch="met_when is true")
        if met.value is False and criterion.not_met_when is not None:
            failing = criterion.not_met_when.evaluate(ctx)
            if failing.value is True:
                text = criterion.not_met_text or "the record shows it is not met"
                return result(Status.NOT_MET, failing, text, branch="met_when is false, not_met_when is true")
        reviewed = review()
        if reviewed is not None:
            return result(
                Status.UNKNOWN,
                reviewed,
                criterion.case_by_case_text,
                criterion.ask,
                case_by_case=True,
                branch="case_by_case_when is true",
            )
        why = "met_when is unknown" if met.value is None else "met_when is false, not_met_when is not true"
        return result(
            Status.UNKNOWN,
            met,
            _checked(criterion, ctx),
            _ask(criterion, ctx),
            unavailable=_unread(criterion, ctx),
            branch=why,
        )

    assert criterion.holds_when is not None
    holds = criterion.holds_when.evaluate(ctx)
    if holds.value is True:
        if criterion.lifted_by is not None:
            lifted = _strictly(criterion.lifted_by, ctx)
            if lifted.value is True:
                return result(
                    Status.NOT_MET,
                    holds,
                    f"present, lifted by documented {criterion.clearance} clearance",
                    cleared=lifted.evidence,
                    branch="holds_when is true, lifted_by is true",
                )
            if lifted.value is None:
                return result(
                    Status.UNKNOWN,
                    holds,
                    f"present; whether {criterion.clearance} clearance is documented could not be read",
                    criterion.ask or f"Document {criterion.clearance} clearance for IV ketamine.",
                    branch="holds_when is true, lifted_by is unknown",
                )
            text = f"present, no {criterion.clearance} clearance on record"
            return result(Status.MET, holds, text, branch="holds_when is true, lifted_by is false")
        return result(Status.MET, holds, "present", branch="holds_when is true")
    if holds.value is None and criterion.lifted_by is not None:
        lifted = _strictly(criterion.lifted_by, ctx)
        if lifted.value is True:
            return result(
                Status.NOT_MET,
                holds,
                f"lifted by documented {criterion.clearance} clearance",
                cleared=lifted.evidence,
                branch="holds_when is unknown, lifted_by is true",
            )
    reviewed = review()
    if reviewed is not None:
        return result(
            Status.UNKNOWN,
            reviewed,
            criterion.case_by_case_text,
            criterion.ask,
            case_by_case=True,
            branch="case_by_case_when is true",
        )
    if holds.value is None:
        return result(
            Status.UNKNOWN,
            holds,
            _checked(criterion, ctx),
            criterion.ask or "Document whether this applies.",
            unavailable=_unread(criterion, ctx),
            branch="holds_when is unknown",
        )
    if criterion.case_by_case_when is not None:
        maybe = criterion.case_by_case_when.evaluate(ctx)
        if maybe.value is None:
            # uncertain evidence (a provisional head injury, a text-only mention) of what the policy leaves to
            # case review: not "no exclusion"
            return result(
                Status.UNKNOWN,
                maybe,
                f"{criterion.case_by_case_text or 'may need case review'} (the evidence is not certain)",
                criterion.ask or "Document whether this applies.",
                branch="holds_when is false, case_by_case_when is unknown",
            )
    return result(Status.NOT_MET, holds, _checked(criterion, ctx) or "no evidence", branch="holds_when is false")


def _ask(criterion: Criterion, ctx: FactContext) -> str:
    """What to document for an unknown requirement: only the parts not yet met, when it has parts."""
    missing = [ask for rule, ask in criterion.ask_parts if _strictly(rule, ctx).value is not True]
    return " ".join(missing) if missing else criterion.ask


def _strictly(rule: Rule, ctx: FactContext) -> Verdict:
    """Evaluate a conclusion that moves toward authorization (a requirement met, an exclusion lifted): evidence
    recognised only from text counts as unknown there (issue 8: where text is the only evidence, prefer unknown
    with the text quoted over met)."""
    ctx.strict = True
    try:
        return rule.evaluate(ctx)
    finally:
        ctx.strict = False


def _unique(evidence: Iterable[Evidence]) -> tuple[Evidence, ...]:
    """Evidence in first-seen order without repeats (rules combining facts often cite the same item twice)."""
    seen: dict[tuple[str, str | None, str | None], Evidence] = {}
    for item in evidence:
        seen.setdefault((item.reference, item.date, item.note), item)
    return tuple(seen.values())


def choose_phase(policy: Policy, ctx: FactContext) -> tuple[Phase, str]:
    """The first phase whose `when` holds; an undecidable phase falls back to the default, with a note."""
    default = next(p for p in policy.phases if p.when is None)
    note = ""
    for phase in policy.phases:
        if phase.when is None:
            continue
        verdict = phase.when.evaluate(ctx)
        if verdict.value is True:
            return phase, ""
        if verdict.value is None:
            note = (
                f"Whether this is a {phase.title.lower()} could not be determined from the record; "
                f"evaluated as {default.title.lower()}."
            )
    return default, note


def outcome_of(results: Iterable[CriterionResult]) -> Outcome:
    results = list(results)
    if any(r.kind is CriterionKind.EXCLUSION and r.status is Status.MET for r in results):
        return Outcome.BLOCKED
    if any(r.kind is CriterionKind.REQUIREMENT and r.status is Status.NOT_MET for r in results):
        return Outcome.CRITERIA_NOT_MET
    if any(r.status is Status.UNKNOWN for r in results):
        return Outcome.DOCUMENTATION_NEEDED
    return Outcome.LIKELY_AUTHORIZED


def _headline(outcome: Outcome, results: list[CriterionResult]) -> str:
    def titles(kind: CriterionKind, status: Status) -> list[str]:
        return [r.title for r in results if r.kind is kind and r.status is status]

    if outcome is Outcome.BLOCKED:
        return "Exclusion applies: " + "; ".join(titles(CriterionKind.EXCLUSION, Status.MET))
    if outcome is Outcome.CRITERIA_NOT_MET:
        return "Requirement not met: " + "; ".join(titles(CriterionKind.REQUIREMENT, Status.NOT_MET))
    if outcome is Outcome.DOCUMENTATION_NEEDED:
        unknown = [r.title for r in results if r.status is Status.UNKNOWN]
        return "Not documented: " + "; ".join(unknown)
    counts = Counter(r.kind for r in results)
    requirements = f"All {counts[CriterionKind.REQUIREMENT]} requirements are documented"
    exclusions = counts[CriterionKind.EXCLUSION]
    return f"{requirements} and none of the {exclusions} exclusions applies." if exclusions else f"{requirements}."


def evaluate_policy(
    policy: Policy, record: PatientRecord, group: OrderGroup, *, coverage_ref: str | None, version: str
) -> Decision | None:
    """The decision for one order group under one policy (scope, phase, criteria, notes); None when a
    silent scope rule says the order is not what the policy is about."""
    ctx = FactContext(policy.library, record, group)
    base = dict(
        order_refs=group.refs,
        order_label=group.label,
        policy=policy.ref,
        coverage_ref=coverage_ref,
        links=policy.links,
        mapping_version=version,
    )
    for scope in policy.scope:
        verdict = scope.when.evaluate(ctx)
        if verdict.value is not True:
            continue
        if scope.silent:
            return None
        why = CriterionResult(
            id=scope.id,
            kind=CriterionKind.REQUIREMENT,
            title=scope.title,
            quote=scope.quote,
            status=Status.NOT_MET,
            evidence=_unique(verdict.evidence),
            explanation=scope.message,
        )
        return Decision(outcome=scope.outcome, headline=scope.message, criteria=(why,), facts=ctx.computed(), **base)
    phase, phase_note = choose_phase(policy, ctx)
    results = [evaluate_criterion(c, ctx) for c in policy.criteria if phase.id in c.phases]
    outcome = outcome_of(results)
    notes: list[str] = [phase_note] if phase_note else []
    for fact_name in policy.notes:
        fact = ctx.fact(fact_name)
        if fact.state is FactState.PRESENT and isinstance(fact.value, tuple):
            notes.extend(str(n) for n in fact.value)
    obligations = policy.obligations if outcome in (Outcome.LIKELY_AUTHORIZED, Outcome.DOCUMENTATION_NEEDED) else ()
    phase_id = phase.id if len(policy.phases) > 1 else None
    return Decision(
        outcome=outcome,
        phase=phase_id if policy.phase_name == "phase" else None,
        service=phase_id if policy.phase_name == "service" else None,
        criteria=tuple(results),
        headline=_headline(outcome, results),
        notes=tuple(notes),
        obligations=obligations,
        authorization_days=phase.authorization_days,
        facts=ctx.computed(),
        **base,
    )
