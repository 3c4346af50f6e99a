"""Offline evaluation of one patient, and the explanation of every criterion.

`evaluate_patient` gives exactly the decisions the service would give (the same `Mappings.decide`). `explain`
then re-evaluates each decided criterion with the engine's trace switched on: the rule branch that decided
it, the rule tree with each part's verdict, and each fact with its value, the resources (and the path inside
them) it came from and the value-set entry that matched. Rules and facts are pure functions of the record, so
the explanation describes the very evaluation that produced the decision (a status that came out differently
would be reported as `consistent: false`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from jsonpath_ng.ext import parse as jsonpath_parse

from fhir_mappings.engine import choose_phase, evaluate_criterion, evaluate_policy
from fhir_mappings.facts import DeriveFact, FactContext, SelectFact
from fhir_mappings.mappings import Mappings
from fhir_mappings.model import Decision, Evidence, Fact
from fhir_mappings.orders import OrderGroup
from fhir_mappings.policy import Policy
from fhir_mappings.record import PatientRecord
from fhir_mappings.rules import Item, RuleTrace, explain_rule
from fhir_mappings.tools.records import PatientInput, build_record, choose_assumed, evaluation_time
from fhir_mappings.valuesets import CodeMatch, ValueSetRegistry

MAX_ITEMS = 12
RULE_KEYS = ("met_when", "not_met_when", "holds_when", "lifted_by", "case_by_case_when")


@dataclass
class Evaluation:
    """What `evaluate` computed for one patient."""

    patient: PatientInput
    record: PatientRecord
    groups: list[OrderGroup]
    decisions: list[Decision]
    assumed: str | None = None  # the assumed order's label, when no order was given
    notes: list[str] = field(default_factory=list)


def evaluate_patient(
    mappings: Mappings,
    patient: PatientInput,
    *,
    as_of: date | None = None,
    orders: list[dict[str, Any]] | None = None,
    policy_id: str | None = None,
    assume: str = "auto",
) -> Evaluation:
    """Decisions for the patient's orders (given, or from the story), else for an assumed order of the right kind."""
    day = as_of or patient.as_of or date.today()
    now = evaluation_time(day)
    drafts = orders if orders is not None else patient.draft_orders
    assumed = None
    if not drafts:
        probe = build_record(patient, mappings, now, [])
        target = policy_id or mappings.router.resolve(probe).policy_id
        choice = choose_assumed(mappings, patient, now, target, assume)
        if choice is not None:
            order, resource, _ = choice
            drafts, assumed = [resource], order.label
    record = build_record(patient, mappings, now, drafts)
    groups = mappings.triage(record.draft_orders)
    notes = []
    if assumed:
        notes.append(f"No order given: assumed a draft {assumed}. Pass --order ORDER.json for the real order.")
    if not groups:
        notes.append("No ketamine-related order: the service answers with no cards.")
        return Evaluation(patient, record, groups, [], assumed, notes)
    if policy_id is None:
        decisions = mappings.decide(record, groups)
    else:
        policy = mappings.policies[policy_id]
        route = mappings.router.resolve(record)
        decisions = []
        for group in groups:
            if group.kind not in policy.applies_to:
                continue
            decision = evaluate_policy(policy, record, group, coverage_ref=route.coverage_ref, version=mappings.version)
            if decision is not None:
                decisions.append(decision)
        notes.append(f"Policy {policy_id} evaluated directly (--policy): routing by coverage was not applied.")
    return Evaluation(patient, record, groups, decisions, assumed, notes)


# --- explanation -------------------------------------------------------------------------------------------
def trace_json(trace: RuleTrace) -> dict[str, Any]:
    out: dict[str, Any] = {"rule": trace.text, "value": _truth(trace.value)}
    if trace.evidence:
        out["evidence"] = [e.reference for e in trace.evidence]
    if trace.parts:
        out["parts"] = [trace_json(p) for p in trace.parts]
    return out


def _truth(value: bool | None) -> str:
    return "unknown" if value is None else ("true" if value else "false")


def _plain(value: Any) -> Any:
    if isinstance(value, date | datetime):
        return value.isoformat()
    if isinstance(value, frozenset | set):
        return sorted(_plain(v) for v in value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _concepts(node: Any) -> list[Mapping[str, Any]]:
    """Every CodeableConcept-like element in a resource (for derive facts, whose paths are not declared)."""
    found: list[Mapping[str, Any]] = []
    if isinstance(node, Mapping):
        if isinstance(node.get("coding"), list) or (isinstance(node.get("text"), str) and len(node) <= 2):
            found.append(node)
        for value in node.values():
            found.extend(_concepts(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_concepts(value))
    return found


def valueset_entry(registry: ValueSetRegistry, match: CodeMatch) -> str:
    """The entry of the value set that `match` hit: the listed code, the prefix, the ingredient or the pattern."""
    vs = registry.get(match.valueset)
    if match.via == "exact":
        listed = next((d for s, c, d in vs.concepts() if s == match.system and c.upper() == match.code.upper()), None)
        return f"listed code {match.code}" + (f" ({listed})" if listed else "")
    if match.via == "prefix":
        key = match.code.upper().replace(".", "")
        for n in range(1, len(key) + 1):
            hit = vs.match_coding({"system": match.system, "code": key[:n]})
            if hit is not None and hit.via == "prefix":
                return f"prefix {key[:n]} (matches {match.code})"
        return f"a prefix of {match.code}"
    if match.via.startswith("ingredient:"):
        rxcui = match.via.split(":", 1)[1]
        name = next((d for s, c, d in vs.concepts() if c == rxcui), None)
        return f"ingredient RxCUI {rxcui}{' (' + name + ')' if name else ''} of product {match.code}"
    if match.via == "text":
        text = (match.display or "").lower()
        pattern = next((p for p in vs.text_patterns if p.lower() in text), None)
        return f"text pattern {pattern!r}" if pattern else f"text {match.display!r}"
    return match.via


def _paths(resource: Mapping[str, Any], definition: SelectFact) -> dict[str, str]:
    """Where in the resource a select fact read its code, date and value (first path that yields)."""
    out: dict[str, str] = {}
    shape = definition.shape
    rtype = str(resource.get("resourceType"))
    for key, paths in (("code", shape.code), ("date", shape.date), ("value", shape.value)):
        for compiled in paths:
            hits = [m for m in jsonpath_parse(compiled.text).find(resource) if m.value is not None]
            if hits:
                out[key] = f"{rtype}.{hits[0].full_path}".replace(".[", "[")
                break
    if shape.medication and "code" not in out:
        if "medicationCodeableConcept" in resource:
            out["code"] = f"{rtype}.medicationCodeableConcept"
        elif "medicationReference" in resource:
            out["code"] = f"{rtype}.medicationReference -> Medication.code"
    for name, paths in definition.fields.items():
        for compiled in paths:
            hits = [m for m in jsonpath_parse(compiled.text).find(resource) if m.value is not None]
            if hits:
                out[name] = f"{rtype}.{hits[0].full_path}".replace(".[", "[")
                break
    return out


def _evidence_json(evidence: Evidence) -> dict[str, Any]:
    out = evidence.to_json()
    path = getattr(evidence, "path", None)  # where inside the resource, when the engine records it
    if path:
        out["path"] = path
    return out


def item_json(item: Item, ctx: FactContext, definition: Any) -> dict[str, Any]:
    out: dict[str, Any] = _evidence_json(item.evidence)
    fields = {k: _plain(v) for k, v in item.fields.items() if v is not None and k != "value"}
    if fields:
        out["fields"] = fields
    resource = ctx.record.get(item.evidence.reference)
    if resource is None:
        return out
    if isinstance(definition, SelectFact):
        paths = _paths(resource, definition)
        if paths:
            out.setdefault("paths", paths)
        concepts = ctx.concepts(resource, definition.shape)
    else:
        concepts = _concepts(resource)
    entries = []
    for vs_id in sorted(item.codes):
        if vs_id not in ctx.registry:
            continue
        match = next((m for c in concepts if (m := ctx.registry.get(vs_id).match_concept(c)) is not None), None)
        if match is not None:
            entries.append({"valueset": vs_id, "code": match.label(), "entry": valueset_entry(ctx.registry, match)})
    if entries:
        out["valueset_entries"] = entries
    return out


def fact_json(fact: Fact, ctx: FactContext) -> dict[str, Any]:
    definition = ctx.library.facts.get(fact.name)
    out: dict[str, Any] = {"name": fact.name, "state": fact.state.value}
    if isinstance(definition, SelectFact):
        out["definition"] = {
            "resource": definition.resource_type,
            "valuesets": list(definition.valuesets),
            **({"filter": definition.status_filter.name} if definition.status_filter else {}),
        }
    elif isinstance(definition, DeriveFact):
        out["definition"] = {"derive": definition.function_name, "params": _plain(definition.params)}
    if fact.detail:
        out["detail"] = fact.detail
    if not fact.complete:
        out["complete"] = False
    if isinstance(fact.value, tuple) and all(isinstance(i, Item) for i in fact.value):
        out["items"] = [item_json(i, ctx, definition) for i in fact.value[:MAX_ITEMS]]
        if len(fact.value) > MAX_ITEMS:
            out["more_items"] = len(fact.value) - MAX_ITEMS
    else:
        out["value"] = _plain(fact.value)
        if fact.evidence:
            out["evidence"] = [_evidence_json(e) for e in fact.evidence]
    return out


def explain(mappings: Mappings, evaluation: Evaluation, decision: Decision) -> dict[str, Any]:
    """Route, scope, phase and, per criterion, the deciding branch, the rule tree and the facts with evidence."""
    record = evaluation.record
    route = mappings.router.resolve(record)
    out: dict[str, Any] = {
        "route": {
            "kind": route.kind.value,
            "payer": route.payer.name if route.payer else None,
            "plan": route.plan.label if route.plan else None,
            "coverage": route.coverage_ref,
            **({"reason": route.reason} if route.reason else {}),
            "evidence": [_evidence_json(e) for e in route.evidence],
        },
        "headline": decision.headline,
        "notes": list(decision.notes),
    }
    policy = mappings.policies.get(decision.policy.id) if decision.policy else None
    group = next((g for g in evaluation.groups if g.refs == decision.order_refs), None)
    if policy is None or group is None or not decision.criteria:
        out["criteria"] = []
        return out
    ctx = FactContext(policy.library, record, group)
    for scope in policy.scope:
        trace = explain_rule(scope.when, ctx)
        if trace.value is True:
            out["scope"] = {"id": scope.id, "outcome": scope.outcome.value, "when": trace_json(trace)}
            break
    if "scope" not in out:
        phase, note = choose_phase(policy, ctx)
        out["phase"] = {
            "id": phase.id,
            "title": phase.title,
            **({"note": note} if note else {}),
            "tested": [
                {"id": p.id, "when": trace_json(explain_rule(p.when, ctx))} for p in policy.phases if p.when is not None
            ],
        }
    out["criteria"] = [_criterion(policy, ctx, result) for result in decision.criteria]
    return out


# The engine evaluates conclusions that move toward authorization strictly (text-only evidence counts as unknown
# there); the explanation re-evaluates them the same way.
_STRICT_KEYS = ("met_when", "lifted_by")


def _traced(rule: Any, ctx: FactContext, *, strict: bool) -> RuleTrace:
    if not strict or not hasattr(ctx, "strict"):
        return explain_rule(rule, ctx)
    ctx.strict = True
    try:
        return explain_rule(rule, ctx)
    finally:
        ctx.strict = False


def _criterion(policy: Policy, ctx: FactContext, result: Any) -> dict[str, Any]:
    criterion = next((c for c in policy.criteria if c.id == result.id), None)
    base: dict[str, Any] = {"id": result.id, "title": result.title, "status": result.status.value}
    if result.cleared_by:
        base["lifted"] = True
    if result.case_by_case:
        base["case_by_case"] = True
    if result.explanation:
        base["explanation"] = result.explanation
    if result.missing:
        base["missing"] = result.missing
    if getattr(result, "unavailable", ()):
        base["unavailable"] = list(result.unavailable)  # resource types it could not read
    if criterion is None:  # a scope rule reported as a criterion
        scope = next((s for s in policy.scope if s.id == result.id), None)
        if scope is not None:
            base["branch"] = f"scope rule {scope.id} holds"
            base["rules"] = {"when": trace_json(explain_rule(scope.when, ctx))}
            base["facts"] = [fact_json(ctx.fact(n), ctx) for n in sorted(scope.when.facts)]
        return base
    branch: list[str] = []
    again = evaluate_criterion(criterion, ctx, trace=branch)
    base["branch"] = branch[-1] if branch else ""
    base["consistent"] = again.status is result.status
    base["rules"] = {
        key: trace_json(_traced(rule, ctx, strict=key in _STRICT_KEYS))
        for key in RULE_KEYS
        if (rule := getattr(criterion, key)) is not None
    }
    base["facts"] = [fact_json(ctx.fact(name), ctx) for name in sorted(criterion.facts)]
    return base
