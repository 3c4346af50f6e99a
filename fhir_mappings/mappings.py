"""Everything the service knows about the policies, loaded and checked once at start-up.

`Mappings.load()` reads the value sets, the site configuration, the prefetch queries, the shared facts,
every policy file and the routing table, cross-checks them (unknown value set, unknown fact, bad
jsonpath, unknown policy...) and computes the mapping-set version recorded with every decision.
`triage()` and `decide()` are the two calls the request path makes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from fhir_mappings import derive as _derive  # noqa: F401  (registers the derive functions)
from fhir_mappings.engine import evaluate_policy
from fhir_mappings.facts import FactError, FactLibrary
from fhir_mappings.model import Decision, Evidence, Outcome
from fhir_mappings.orders import OrderClassifier, OrderGroup, OrderKind
from fhir_mappings.policy import Policy, PolicyError, load_policies
from fhir_mappings.queries import QueryConfigError, QuerySet, load_queries
from fhir_mappings.reading.text import shared_reader
from fhir_mappings.record import Availability, PatientRecord
from fhir_mappings.routing import Route, RouteKind, Router, RoutingError
from fhir_mappings.valuesets import ValueSetError, ValueSetRegistry

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAPPINGS_DIR = Path(__file__).resolve().parent  # valuesets/, policies/, facts.yaml, queries.yaml, routing.yaml
_log = logging.getLogger(__name__)
_SITE_KEYS = {"valuesets", "credentialed_clinics", "payers", "no_policy_card"}


class MappingError(ValueError):
    """The mappings or the site configuration are invalid; the message says where and why."""


@dataclass(frozen=True)
class SiteConfig:
    """Site configuration an informaticist supplies without editing shipped files."""

    valuesets: Mapping[str, list[dict[str, str]]] = field(default_factory=dict)  # value-set id -> extra codes
    credentialed_clinics: tuple[dict[str, str], ...] = ()  # {"system", "value"} of Organization/Location
    payers: Mapping[str, Any] = field(default_factory=dict)  # payer id -> {"identifiers": [...], "names": [...]}
    no_policy_card: bool | None = None
    text: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> SiteConfig:
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            doc = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise MappingError(f"site configuration {path.name}: not valid {path.suffix.lstrip('.')}: {exc}") from None
        return cls.from_mapping(doc or {}, text)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], text: str = "") -> SiteConfig:
        if not isinstance(doc, Mapping):
            raise MappingError("site configuration: must be a mapping")
        extra = set(doc) - _SITE_KEYS
        if extra:
            raise MappingError(
                f"site configuration: unexpected key(s) {', '.join(sorted(extra))}; allowed: {sorted(_SITE_KEYS)}"
            )
        clinics = doc.get("credentialed_clinics") or []
        for i, clinic in enumerate(clinics):
            if not isinstance(clinic, Mapping) or not clinic.get("system") or not clinic.get("value"):
                raise MappingError(f"site configuration credentialed_clinics[{i}]: needs system and value")
        valuesets = doc.get("valuesets") or {}
        for vs_id, codes in valuesets.items():
            if not isinstance(codes, list) or not all(
                isinstance(c, Mapping) and c.get("system") and c.get("code") for c in codes
            ):
                raise MappingError(
                    f"site configuration valuesets.{vs_id}: a list of {{system, code, display}} expected"
                )
        return cls(
            valuesets=dict(valuesets),
            credentialed_clinics=tuple(dict(c) for c in clinics),
            payers=dict(doc.get("payers") or {}),
            no_policy_card=doc.get("no_policy_card"),
            text=text or json.dumps(doc, sort_keys=True),
        )


@dataclass
class Mappings:
    registry: ValueSetRegistry
    queries: QuerySet
    facts: FactLibrary
    policies: dict[str, Policy]
    router: Router
    classifier: OrderClassifier
    version: str
    site: SiteConfig

    @classmethod
    def load(
        cls, site: SiteConfig | None = None, directory: str | Path | None = None, *, text_reader: bool = True
    ) -> Mappings:
        """The shipped mappings, or those of `directory` (a copy with the same layout, e.g. a candidate change).

        `text_reader=False` leaves the ConText pipeline (about a second of imports) to its first use or to the
        serving worker's warm-up: only for a set already proven to load with it (a remembered clean verdict,
        `fhir_mappings.validation.verdicts`). Evaluation is the same either way: there is one shared reader.
        """
        site = site or SiteConfig()
        base = Path(directory) if directory is not None else MAPPINGS_DIR
        if text_reader:
            shared_reader()  # the ConText pipeline, loaded once per process here rather than on the first note read
        try:
            registry = ValueSetRegistry.load(base / "valuesets")
            for vs_id, codes in site.valuesets.items():
                if vs_id not in registry:
                    raise MappingError(f"site configuration valuesets: unknown value set {vs_id!r}")
                registry.extend(vs_id, list(codes))
            if site.credentialed_clinics:
                registry.extend(
                    "site_credentialed_clinics",
                    [
                        {"system": c["system"], "code": c["value"], "display": c.get("name", "")}
                        for c in site.credentialed_clinics
                    ],
                )
            queries = load_queries(registry, base / "queries.yaml")
            facts = FactLibrary.load(registry, base / "facts.yaml")
            policies = load_policies(facts, base / "policies")
            routing = base / "routing.yaml"
            router = Router.load(
                registry,
                set(policies),
                routing,
                additions=site.payers,
                no_policy_card=site.no_policy_card,
            )
        except (ValueSetError, QueryConfigError, FactError, PolicyError, RoutingError) as exc:
            raise MappingError(str(exc)) from None
        missing = (
            {t for p in policies.values() for t in p.library.reads(p.library.facts)}
            - queries.supplied_types()
            - _REFERENCED_TYPES
        )
        if missing:
            raise MappingError(f"facts read resource types no prefetch query supplies: {', '.join(sorted(missing))}")
        digest = hashlib.sha256()
        for part in (
            registry.fingerprint,
            facts.source_text,
            router.source_text,
            site.text,
            json.dumps(queries.discovery_prefetch(), sort_keys=True),
        ):
            digest.update(part.encode())
        for policy in policies.values():
            digest.update(policy.library.source_text.encode())
        return cls(
            registry=registry,
            queries=queries,
            facts=facts,
            policies=policies,
            router=router,
            classifier=OrderClassifier(registry),
            version="ms-" + digest.hexdigest()[:12],
            site=site,
        )

    # -- request path ----------------------------------------------------------------------------------
    def triage(
        self, draft_orders: list[dict[str, Any]], known: dict[str, dict[str, Any]] | None = None
    ) -> list[OrderGroup]:
        return self.classifier.classify(draft_orders, known)

    def decide(self, record: PatientRecord, groups: list[OrderGroup]) -> list[Decision]:
        """One decision per order group and applicable policy (or one 'no policy' decision for all).

        A failure while evaluating one group (or while routing) never takes the response down: that group
        gets a documentation-needed "could not be evaluated" decision with a PHI-free reason, and is logged.
        A record that was not fully read says so in every decision's notes.
        """
        try:
            route = self.router.resolve(record)
        except Exception as exc:  # one bad record must not become a 500
            _log_failure("routing", exc)
            failed = [self._not_evaluated(g, None, "the applicable payer policy") for g in groups]
            return _with_record_note(failed, record)
        if route.kind is RouteKind.NO_POLICY:
            if not self.router.no_policy_card:
                return []
            refs = tuple(r for g in groups for r in g.refs)
            no_policy = [
                Decision(
                    outcome=Outcome.NO_POLICY,
                    order_refs=refs,
                    order_label=", ".join(g.label for g in groups),
                    coverage_ref=route.coverage_ref,
                    headline=route.message,
                    program=route.reason,
                    payer=route.payer.name if route.payer else None,
                    mapping_version=self.version,
                    facts=(),
                    notes=tuple(_evidence_notes(route.evidence)),
                )
            ]
            return _with_record_note(no_policy, record)
        decisions: list[Decision] = []
        for group in groups:
            try:
                decision = self._decide_group(record, group, route)
            except Exception as exc:  # one policy's failure must not take the response down
                _log_failure(route.policy_id or "policy", exc)
                policy = self.policies.get(route.policy_id) if route.policy_id else None
                decision = self._not_evaluated(group, policy, policy.ref.number if policy else "the payer policy")
            if decision is not None:
                decisions.append(decision)
        payer = route.payer.name if route.payer else None
        decisions = [replace(d, payer=payer) for d in decisions] if payer else decisions
        return _with_record_note(decisions, record)

    def _not_evaluated(self, group: OrderGroup, policy: Policy | None, what: str) -> Decision:
        """Documentation needed: the service could not evaluate this order (never a guess either way)."""
        return Decision(
            outcome=Outcome.DOCUMENTATION_NEEDED,
            order_refs=group.refs,
            order_label=group.label,
            policy=policy.ref if policy else None,
            headline=f"The record could not be evaluated against {what}; review the criteria manually.",
            notes=("An internal error stopped the evaluation of this order; it has been logged.",),
            mapping_version=self.version,
        )

    def _decide_group(self, record: PatientRecord, group: OrderGroup, route: Route) -> Decision | None:
        if group.kind is OrderKind.ESKETAMINE:
            pointer = route.esketamine
            if pointer is None:
                return None
            return Decision(
                outcome=Outcome.NOT_APPLICABLE,
                order_refs=group.refs,
                order_label=group.label,
                coverage_ref=route.coverage_ref,
                headline=pointer.message,
                program=pointer.program,
                mapping_version=self.version,
            )
        policy = self.policies.get(route.policy_id) if route.policy_id else None
        if route.kind is RouteKind.VARIATION:
            assert route.plan is not None and route.plan.variation is not None
            variation = route.plan.variation
            if policy is None or group.kind not in policy.applies_to:
                return None
            fallback = (
                evaluate_policy(policy, record, group, coverage_ref=route.coverage_ref, version=self.version)
                if variation.fallback
                else None
            )
            if variation.fallback and fallback is None:
                return None  # the fallback policy says this order is not what it is about
            return Decision(
                outcome=Outcome.PLAN_VARIATION,
                order_refs=group.refs,
                order_label=group.label,
                policy=policy.ref,
                phase=fallback.phase if fallback else None,
                service=fallback.service if fallback else None,
                criteria=fallback.criteria if fallback else (),
                coverage_ref=route.coverage_ref,
                headline=variation.message,
                notes=(variation.quote, *(fallback.notes if fallback else ())),
                program=variation.program,
                links=variation.links + policy.links,
                authorization_days=fallback.authorization_days if fallback else None,
                mapping_version=self.version,
                facts=fallback.facts if fallback else (),
            )
        assert policy is not None
        if group.kind not in policy.applies_to:
            return None
        return evaluate_policy(policy, record, group, coverage_ref=route.coverage_ref, version=self.version)


# Types that arrive by reference resolution rather than by a prefetch query of their own.
_REFERENCED_TYPES = frozenset({"Practitioner", "PractitionerRole", "Organization", "Location", "Medication"})


def _log_failure(where: str, exc: Exception) -> None:
    """Frames and exception type only: messages may quote record data."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    _log.error("decision for %s could not be evaluated: %s\n%s", where, type(exc).__name__, frames)


def _record_note(record: PatientRecord) -> str | None:
    """One PHI-free note when the record was not fully read: which queries, how far, and why."""
    parts = [
        f"{q.key} {q.availability.value}" + (f" ({q.reason})" if q.reason else "")
        for q in record.queries.values()
        if q.availability is not Availability.READ
    ]
    if not parts:
        return None
    note = "Record not fully read: " + "; ".join(parts) + ". Criteria resting on this data are unknown, not absent."
    unreadable = list(record.unreadable.items())
    if unreadable:
        cited = "; ".join(f"{key} ({reason.split('; ')[0]})" for key, reason in unreadable[:3])
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        note += f" Unreadable (not R4 JSON): {cited}{more}."
    return note


def _with_record_note(decisions: list[Decision], record: PatientRecord) -> list[Decision]:
    note = _record_note(record)
    return [replace(d, notes=(*d.notes, note)) for d in decisions] if note else decisions


def _evidence_notes(evidence: tuple[Evidence, ...]) -> list[str]:
    return [f"{e.reference}{' (' + e.display + ')' if e.display else ''}" for e in evidence]


@functools.cache
def load_engine() -> Mappings:
    """The shipped mappings without site configuration, loaded once per process (tests and tools)."""
    return Mappings.load()
