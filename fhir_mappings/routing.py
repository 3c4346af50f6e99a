"""Routing: from the patient's active Coverage to the payer, the plan, and the policy (or program) that governs.

All identifiers, names and plan rules live in `routing.yaml` (plus site additions); nothing here knows a
payer. When the record does not say clearly which coverage or payer applies, the answer is "no policy"
with the reason — never a guess (the CRD reference implementation's default-to-CMS is the anti-pattern).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from fhir_mappings.facts import parse_fhir_date
from fhir_mappings.model import Evidence
from fhir_mappings.record import PatientRecord
from fhir_mappings.valuesets import ValueSetRegistry

ROUTING_FILE = Path(__file__).with_name("routing.yaml")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
Resource = dict[str, Any]


class RoutingError(ValueError):
    """routing.yaml (or a site addition) is invalid; the message names the payer/plan and field."""


def normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", name.lower()).strip()


# --- plan conditions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanFacts:
    """What plan conditions look at, extracted once from the chosen Coverage."""

    coverage: Resource
    class_texts: tuple[str, ...]
    payer_name: str


class PlanCond:
    def test(self, facts: PlanFacts, registry: ValueSetRegistry) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class _TypeIn(PlanCond):
    valueset: str

    def test(self, facts: PlanFacts, registry: ValueSetRegistry) -> bool:
        concept = facts.coverage.get("type")
        return isinstance(concept, Mapping) and registry.get(self.valueset).match_concept(concept) is not None


@dataclass(frozen=True)
class _TextIn(PlanCond):
    phrases: tuple[str, ...]
    payer: bool  # True: test the matched payer name, else the Coverage.class values/names

    def test(self, facts: PlanFacts, registry: ValueSetRegistry) -> bool:
        texts = (normalise_name(facts.payer_name),) if self.payer else facts.class_texts
        return any(re.search(rf"\b{re.escape(p)}\b", t) for p in self.phrases for t in texts)


@dataclass(frozen=True)
class _Combine(PlanCond):
    parts: tuple[PlanCond, ...]
    all_of: bool

    def test(self, facts: PlanFacts, registry: ValueSetRegistry) -> bool:
        results = (p.test(facts, registry) for p in self.parts)
        return all(results) if self.all_of else any(results)


def _compile_cond(node: Any, registry: ValueSetRegistry, where: str) -> PlanCond:
    if not isinstance(node, Mapping) or len(node) != 1:
        raise RoutingError(f"{where}: a condition is a mapping with exactly one key")
    key, value = next(iter(node.items()))
    if key in ("any", "all"):
        if not isinstance(value, list) or not value:
            raise RoutingError(f"{where}.{key}: non-empty list expected")
        return _Combine(
            tuple(_compile_cond(v, registry, f"{where}.{key}[{i}]") for i, v in enumerate(value)), key == "all"
        )
    if key == "type_in":
        if value not in registry:
            raise RoutingError(f"{where}.type_in: unknown value set {value!r}")
        return _TypeIn(value)
    if key in ("class_text", "payer_name"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RoutingError(f"{where}.{key}: list of phrases expected")
        return _TextIn(tuple(normalise_name(v) for v in value), payer=key == "payer_name")
    raise RoutingError(f"{where}: unknown condition {key!r}")


# --- configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pointer:
    """Where a service is governed instead (e.g. the Spravato pharmacy policy)."""

    program: str
    message: str


@dataclass(frozen=True)
class Variation:
    program: str
    quote: str
    message: str
    fallback: str | None
    links: tuple[tuple[str, str], ...]
    of_policy: str | None = None  # the policy whose variation section this is, when it has no fallback


@dataclass(frozen=True)
class Plan:
    id: str
    label: str
    when: PlanCond
    policy: str | None
    variation: Variation | None
    esketamine: Pointer | None


@dataclass(frozen=True)
class Payer:
    id: str
    name: str
    identifiers: frozenset[tuple[str, str]]
    names: frozenset[str]
    plans: tuple[Plan, ...]
    esketamine: Pointer | None
    policy_index: str | None


class RouteKind(StrEnum):
    POLICY = "policy"
    VARIATION = "variation"
    NO_POLICY = "no-policy"


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    reason: str  # no-policy: no-active-coverage | coverage-ambiguous | payer-not-handled | plan-not-recognised
    message: str
    coverage_ref: str | None = None
    payer: Payer | None = None
    plan: Plan | None = None
    evidence: tuple[Evidence, ...] = ()

    @property
    def policy_id(self) -> str | None:
        """The policy named on the decision: the plan's, or the one a variation belongs to / falls back on."""
        if self.plan is None:
            return None
        if self.plan.variation is not None:
            return self.plan.variation.fallback or self.plan.variation.of_policy
        return self.plan.policy

    @property
    def esketamine(self) -> Pointer | None:
        if self.plan is not None and self.plan.esketamine is not None:
            return self.plan.esketamine
        return self.payer.esketamine if self.payer else None


def _pointer(node: Any, where: str) -> Pointer | None:
    if node is None:
        return None
    if not isinstance(node, Mapping) or set(node) != {"program", "message"}:
        raise RoutingError(f"{where}: needs exactly program and message")
    return Pointer(" ".join(str(node["program"]).split()), " ".join(str(node["message"]).split()))


class Router:
    """Coverage → payer → plan → route, configured by routing.yaml (+ site additions)."""

    def __init__(
        self, payers: tuple[Payer, ...], registry: ValueSetRegistry, no_policy_card: bool, source_text: str
    ) -> None:
        self.payers = payers
        self.registry = registry
        self.no_policy_card = no_policy_card
        self.source_text = source_text

    @classmethod
    def load(
        cls,
        registry: ValueSetRegistry,
        known_policies: set[str],
        path: str | Path = ROUTING_FILE,
        additions: Mapping[str, Any] | None = None,
        no_policy_card: bool | None = None,
    ) -> Router:
        text = Path(path).read_text(encoding="utf-8")
        doc = yaml.load(text, Loader=_Loader) or {}
        where = Path(path).name
        if set(doc) - {"settings", "payers"}:
            raise RoutingError(f"{where}: unexpected top-level key(s) {sorted(set(doc) - {'settings', 'payers'})}")
        additions = additions or {}
        payers = []
        for i, spec in enumerate(doc.get("payers") or []):
            pw = f"{where} payers[{i}]"
            allowed = {"id", "name", "identifiers", "names", "plans", "esketamine", "policy_index"}
            if not isinstance(spec, Mapping) or set(spec) - allowed or not {"id", "name", "plans"} <= set(spec):
                raise RoutingError(f"{pw}: needs id, name, plans; allowed keys {sorted(allowed)}")
            extra = additions.get(spec["id"], {})
            identifiers = [*spec.get("identifiers", []), *extra.get("identifiers", [])]
            for ident in identifiers:
                if not isinstance(ident, Mapping) or not ident.get("system") or not ident.get("value"):
                    raise RoutingError(f"{pw}.identifiers: each needs system and value")
            plans = []
            for j, plan in enumerate(spec["plans"]):
                plw = f"{pw} plan {plan.get('id', j)}"
                pallowed = {"id", "label", "when", "policy", "variation", "esketamine"}
                if set(plan) - pallowed or not {"id", "when"} <= set(plan):
                    raise RoutingError(f"{plw}: needs id and when; allowed keys {sorted(pallowed)}")
                if ("policy" in plan) == ("variation" in plan):
                    raise RoutingError(f"{plw}: exactly one of policy / variation")
                variation = None
                if "variation" in plan:
                    v = plan["variation"]
                    vallowed = {"program", "quote", "message", "fallback", "links", "of_policy"}
                    if set(v) - vallowed or not {"program", "quote", "message"} <= set(v):
                        raise RoutingError(f"{plw}.variation: needs program, quote, message")
                    if v.get("fallback") and v["fallback"] not in known_policies:
                        raise RoutingError(f"{plw}.variation.fallback: unknown policy {v['fallback']!r}")
                    variation = Variation(
                        program=" ".join(str(v["program"]).split()),
                        quote=" ".join(str(v["quote"]).split()),
                        message=" ".join(str(v["message"]).split()),
                        fallback=v.get("fallback"),
                        links=tuple((str(link["label"]), str(link["url"])) for link in v.get("links") or []),
                        of_policy=v.get("of_policy"),
                    )
                    named = variation.fallback or variation.of_policy
                    if not named:
                        raise RoutingError(f"{plw}.variation: name the policy it belongs to (fallback or of_policy)")
                    if named not in known_policies:
                        raise RoutingError(f"{plw}.variation: unknown policy {named!r}")
                elif plan["policy"] not in known_policies:
                    raise RoutingError(f"{plw}.policy: unknown policy {plan['policy']!r}")
                plans.append(
                    Plan(
                        id=str(plan["id"]),
                        label=str(plan.get("label", plan["id"])),
                        when=_compile_cond(plan["when"], registry, f"{plw}.when"),
                        policy=plan.get("policy"),
                        variation=variation,
                        esketamine=_pointer(plan.get("esketamine"), f"{plw}.esketamine"),
                    )
                )
            payers.append(
                Payer(
                    id=str(spec["id"]),
                    name=str(spec["name"]),
                    identifiers=frozenset((str(x["system"]), str(x["value"])) for x in identifiers),
                    names=frozenset(
                        normalise_name(n) for n in [spec["name"], *spec.get("names", []), *extra.get("names", [])]
                    ),
                    plans=tuple(plans),
                    esketamine=_pointer(spec.get("esketamine"), f"{pw}.esketamine"),
                    policy_index=spec.get("policy_index"),
                )
            )
        unknown = set(additions) - {p.id for p in payers}
        if unknown:
            raise RoutingError(f"site configuration payers: unknown payer id(s) {', '.join(sorted(unknown))}")
        setting = (doc.get("settings") or {}).get("no_policy_card", True)
        return cls(tuple(payers), registry, setting if no_policy_card is None else no_policy_card, text)

    # -- resolution -------------------------------------------------------------------------------------
    def active_coverages(self, record: PatientRecord) -> list[Resource]:
        today = record.now.date()
        active = []
        for coverage in record.of_type("Coverage"):
            if coverage.get("status") != "active":
                continue
            period = coverage.get("period") or {}
            start, end = parse_fhir_date(period.get("start")), parse_fhir_date(period.get("end"))
            if (start and start > today) or (end and end < today):
                continue
            active.append(coverage)
        return active

    def _choose(self, coverages: list[Resource]) -> Resource | None:
        if len(coverages) == 1:
            return coverages[0]
        ordered = [c for c in coverages if isinstance(c.get("order"), int)]
        if len(ordered) != len(coverages):
            return None
        lowest = min(c["order"] for c in ordered)
        primary = [c for c in ordered if c["order"] == lowest]
        return primary[0] if len(primary) == 1 else None

    def _payer_of(self, record: PatientRecord, coverage: Resource) -> tuple[Payer | None, str, list[Evidence]]:
        candidates: list[tuple[list[tuple[str, str]], list[str], str]] = []
        for payor in coverage.get("payor") or []:
            if not isinstance(payor, Mapping):
                continue
            org = record.resolve(payor, within=coverage)
            idents: list[tuple[str, str]] = []
            names: list[str] = []
            ref = str(payor.get("reference", "")) or "Coverage.payor"
            if org is not None:
                if org.get("resourceType") != "Organization":
                    continue  # self-pay (Patient / RelatedPerson): no payer policy
                idents += [
                    (i.get("system", ""), i.get("value", ""))
                    for i in org.get("identifier") or []
                    if isinstance(i, Mapping)
                ]
                names += [org.get("name", ""), *(org.get("alias") or [])]
                ref = f"Organization/{org.get('id')}" if org.get("id") else ref
            ident = payor.get("identifier")
            if isinstance(ident, Mapping):
                idents.append((ident.get("system", ""), ident.get("value", "")))
            if payor.get("display"):
                names.append(payor["display"])
            candidates.append((idents, [n for n in names if isinstance(n, str) and n], ref))
        for idents, names, ref in candidates:
            for payer in self.payers:
                if any(i in payer.identifiers for i in idents):
                    return (
                        payer,
                        names[0] if names else payer.name,
                        [Evidence(ref, display=payer.name, note="payer identifier")],
                    )
            for payer in self.payers:
                for name in names:
                    if normalise_name(name) in payer.names:
                        return payer, name, [Evidence(ref, display=name, note="payer name")]
        return None, "", []

    def resolve(self, record: PatientRecord) -> Route:
        coverages = self.active_coverages(record)
        if not coverages:
            return Route(RouteKind.NO_POLICY, "no-active-coverage", "No active coverage is on record for this patient.")
        coverage = self._choose(coverages)
        if coverage is None:
            return Route(
                RouteKind.NO_POLICY,
                "coverage-ambiguous",
                f"{len(coverages)} active coverages are on record and none is marked primary (Coverage.order).",
                evidence=tuple(Evidence(f"Coverage/{c.get('id')}") for c in coverages),
            )
        coverage_ref = f"Coverage/{coverage.get('id')}"
        payer, payer_name, payer_evidence = self._payer_of(record, coverage)
        cov_evidence = Evidence(coverage_ref, display=_coverage_label(coverage), note="active coverage")
        if payer is None:
            return Route(
                RouteKind.NO_POLICY,
                "payer-not-handled",
                "The patient's payer has no ketamine policy configured in this service.",
                coverage_ref=coverage_ref,
                evidence=(cov_evidence,),
            )
        facts = PlanFacts(
            coverage=coverage,
            class_texts=tuple(
                normalise_name(str(c.get(k)))
                for c in coverage.get("class") or []
                if isinstance(c, Mapping)
                for k in ("value", "name")
                if c.get(k)
            ),
            payer_name=payer_name,
        )
        for plan in payer.plans:
            if plan.when.test(facts, self.registry):
                kind = RouteKind.VARIATION if plan.variation else RouteKind.POLICY
                message = plan.variation.message if plan.variation else ""
                return Route(kind, "", message, coverage_ref, payer, plan, (cov_evidence, *payer_evidence))
        return Route(
            RouteKind.NO_POLICY,
            "plan-not-recognised",
            f"The {payer.name} plan type could not be recognised from Coverage.type / Coverage.class.",
            coverage_ref=coverage_ref,
            payer=payer,
            evidence=(cov_evidence, *payer_evidence),
        )


def _coverage_label(coverage: Resource) -> str:
    concept = coverage.get("type") or {}
    label = concept.get("text") if isinstance(concept, Mapping) else None
    for coding in (concept.get("coding") if isinstance(concept, Mapping) else None) or []:
        if isinstance(coding, Mapping):
            label = label or coding.get("display") or coding.get("code")
    return str(label or "coverage")
