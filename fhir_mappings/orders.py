"""Triage: which draft orders are ketamine-related, what kind of service each is, and how they group.

This runs on every order-sign call before any FHIR access, so it only looks at the draft orders
themselves (and the Medications they contain or reference inside draftOrders). Most calls are not
about ketamine and must be answered with empty cards at once.

Kinds of service, after the policies:
- ketamine administration: a MedicationRequest for ketamine (RxNorm product or ingredient, NDC,
  contained/referenced Medication, or a ketamine name in free text for compounded products), or a
  ServiceRequest for the infusion (CPT 96365) or the drug (HCPCS J3490) that names ketamine itself or
  accompanies a ketamine MedicationRequest in the same draftOrders;
- esketamine: Spravato by RxNorm/NDC/name, or HCPCS G2082/G2083;
- integration psychotherapy (CPT 90832/90834/90837) and psychiatric diagnostic evaluation
  (CPT 90791/90792): the services MP-054 governs around a KAP session.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fhir_mappings.record import as_list, medication_concepts, medication_resource_concepts, reference_key
from fhir_mappings.valuesets import CodeMatch, ValueSetRegistry

Resource = dict[str, Any]


class OrderKind(StrEnum):
    KETAMINE_ADMINISTRATION = "ketamine-administration"
    ESKETAMINE = "esketamine"
    INTEGRATION_PSYCHOTHERAPY = "integration-psychotherapy"
    PSYCHIATRIC_EVALUATION = "psychiatric-evaluation"


class Route(StrEnum):
    IV = "iv"
    IM = "im"
    NASAL = "nasal"
    ORAL = "oral"
    SUBLINGUAL = "sublingual"
    OTHER = "other"  # a route is stated but it is none of the above
    UNKNOWN = "unknown"  # no route stated


ROUTE_VALUESETS: dict[Route, str] = {
    Route.IV: "route_iv",
    Route.IM: "route_im",
    Route.NASAL: "route_nasal",
    Route.ORAL: "route_oral",
    Route.SUBLINGUAL: "route_sublingual",
}
_KIND_LABEL = {
    OrderKind.KETAMINE_ADMINISTRATION: "ketamine administration",
    OrderKind.ESKETAMINE: "esketamine (Spravato)",
    OrderKind.INTEGRATION_PSYCHOTHERAPY: "integration psychotherapy",
    OrderKind.PSYCHIATRIC_EVALUATION: "psychiatric diagnostic evaluation",
}
_ROUTE_LABEL = {
    Route.IV: "IV",
    Route.IM: "IM",
    Route.NASAL: "intranasal",
    Route.ORAL: "oral",
    Route.SUBLINGUAL: "sublingual",
}


@dataclass(frozen=True)
class ClassifiedOrder:
    """One draft order recognised as ketamine-related."""

    resource: Resource
    kind: OrderKind
    route: Route
    matches: tuple[CodeMatch, ...]
    index: int  # position in draftOrders.entry, for error messages

    @property
    def ref(self) -> str:
        return f"{self.resource['resourceType']}/{self.resource['id']}"

    @property
    def label(self) -> str:
        route = _ROUTE_LABEL.get(self.route)
        what = _KIND_LABEL[self.kind]
        if route and self.kind in (OrderKind.KETAMINE_ADMINISTRATION, OrderKind.ESKETAMINE):
            what = f"{route} {what}"
        code = self.matches[0].label() if self.matches else ""
        return f"{what} ({self.ref}{', ' + code if code else ''})"


@dataclass(frozen=True)
class OrderGroup:
    """Draft orders that together request one service (e.g. the ketamine drug and its infusion)."""

    kind: OrderKind
    orders: tuple[ClassifiedOrder, ...]

    @property
    def refs(self) -> tuple[str, ...]:
        return tuple(o.ref for o in self.orders)

    @property
    def route(self) -> Route:
        """The group's route: IV if any order says IV (an infusion code implies it), else the first stated."""
        routes = [o.route for o in self.orders]
        if Route.IV in routes:
            return Route.IV
        stated = [r for r in routes if r is not Route.UNKNOWN]
        return stated[0] if stated else Route.UNKNOWN

    @property
    def primary(self) -> ClassifiedOrder:
        """The drug order when there is one (it carries dose and route), else the first order."""
        for order in self.orders:
            if order.resource["resourceType"] == "MedicationRequest":
                return order
        return self.orders[0]

    @property
    def label(self) -> str:
        if len(self.orders) == 1:
            return self.orders[0].label
        route = _ROUTE_LABEL.get(self.route)
        what = f"{route} {_KIND_LABEL[self.kind]}" if route else _KIND_LABEL[self.kind]
        return f"{what}: " + ", ".join(o.ref for o in self.orders)


class OrderClassifier:
    """Recognises ketamine-related draft orders using the value sets (codes live in data, not here)."""

    def __init__(self, registry: ValueSetRegistry) -> None:
        self._vs = registry

    # -- concepts -----------------------------------------------------------------------------------
    def _medication_concepts(self, order: Resource, siblings: dict[str, Resource]) -> list[dict[str, Any]]:
        """medicationCodeableConcept, or the Medication it references inside the request."""
        return medication_concepts(order, lambda ref, holder: _resolve_local(ref, holder, siblings))

    def _match_any(self, concepts: list[dict[str, Any]], vs_id: str) -> CodeMatch | None:
        valueset = self._vs.get(vs_id)
        for concept in concepts:
            match = valueset.match_concept(concept)
            if match is not None:
                return match
        return None

    def route_of(self, order: Resource) -> Route:
        for dosage in as_list(order.get("dosageInstruction")):
            route = dosage.get("route") if isinstance(dosage, dict) else None
            if not isinstance(route, dict):
                continue
            for candidate, vs_id in ROUTE_VALUESETS.items():
                if self._vs.get(vs_id).match_concept(route) is not None:
                    return candidate
            return Route.OTHER
        return Route.UNKNOWN

    # -- classification -----------------------------------------------------------------------------
    def _classify_medication(
        self, order: Resource, siblings: dict[str, Resource]
    ) -> tuple[OrderKind, CodeMatch] | None:
        concepts = self._medication_concepts(order, siblings)
        for kind, vs_id in (
            (OrderKind.ESKETAMINE, "order_esketamine"),
            (OrderKind.KETAMINE_ADMINISTRATION, "order_ketamine"),
        ):
            match = self._match_any(concepts, vs_id)
            if match is not None:
                return kind, match
        return None

    def _service_mentions_ketamine(self, order: Resource, siblings: dict[str, Resource]) -> CodeMatch | None:
        """A 96365/J3490 ServiceRequest is about ketamine only if it says so (NDC, text, detail, link)."""
        concepts: list[dict[str, Any]] = []
        code = order.get("code")
        if isinstance(code, dict):
            concepts.append(code)
        concepts.extend(c for c in as_list(order.get("orderDetail")) if isinstance(c, dict))
        match = self._match_any(concepts, "order_ketamine")
        if match is not None:
            return match
        for ref in [*as_list(order.get("supportingInfo")), *as_list(order.get("basedOn"))]:
            target = _resolve_local(ref, order, siblings) if isinstance(ref, dict) else None
            if target is None:
                continue
            if target.get("resourceType") == "Medication":
                match = self._match_any(medication_resource_concepts(target), "order_ketamine")
            elif target.get("resourceType") == "MedicationRequest":
                found = self._classify_medication(target, siblings)
                match = found[1] if found and found[0] is OrderKind.KETAMINE_ADMINISTRATION else None
            if match is not None:
                return match
        return None

    def classify(self, draft_orders: list[Resource], known: dict[str, Resource] | None = None) -> list[OrderGroup]:
        """Group the ketamine-related draft orders by service; empty when none is ketamine-related.

        `known` maps `Type/id` to resources the request already carries (e.g. a Medication in the
        prefetch), so a medicationReference can be followed without any FHIR access.
        """
        siblings = {**(known or {}), **{f"{o.get('resourceType')}/{o.get('id')}": o for o in draft_orders}}
        classified: list[ClassifiedOrder] = []
        pending_infusions: list[tuple[int, Resource, CodeMatch]] = []
        for index, order in enumerate(draft_orders):
            rtype = order.get("resourceType")
            if rtype == "MedicationRequest":
                found = self._classify_medication(order, siblings)
                if found:
                    classified.append(ClassifiedOrder(order, found[0], self.route_of(order), (found[1],), index))
            elif rtype == "ServiceRequest":
                concept = order.get("code") if isinstance(order.get("code"), dict) else None
                if concept is None:
                    continue
                for kind, vs_id in (
                    (OrderKind.ESKETAMINE, "proc_esketamine_service"),
                    (OrderKind.INTEGRATION_PSYCHOTHERAPY, "proc_integration_psychotherapy"),
                    (OrderKind.PSYCHIATRIC_EVALUATION, "proc_psych_diagnostic_eval"),
                ):
                    match = self._vs.get(vs_id).match_concept(concept)
                    if match is not None:
                        route = Route.NASAL if kind is OrderKind.ESKETAMINE else Route.UNKNOWN
                        classified.append(ClassifiedOrder(order, kind, route, (match,), index))
                        break
                else:
                    match = self._vs.get("proc_ketamine_infusion").match_concept(concept) or self._vs.get(
                        "hcpcs_unclassified_drug"
                    ).match_concept(concept)
                    if match is not None:
                        pending_infusions.append((index, order, match))
        has_ketamine_drug = any(
            c.kind is OrderKind.KETAMINE_ADMINISTRATION and c.resource["resourceType"] == "MedicationRequest"
            for c in classified
        )
        for index, order, match in pending_infusions:
            mention = self._service_mentions_ketamine(order, siblings)
            if mention is not None or has_ketamine_drug:
                infusion = self._vs.get("proc_ketamine_infusion").match_concept(order["code"]) is not None
                route = Route.IV if infusion else self.route_of(order)
                matches = (match, mention) if mention is not None else (match,)
                classified.append(ClassifiedOrder(order, OrderKind.KETAMINE_ADMINISTRATION, route, matches, index))
        classified.sort(key=lambda c: c.index)
        return _group(classified)


def _group(classified: list[ClassifiedOrder]) -> list[OrderGroup]:
    """Drug + infusion orders form one service; every psychotherapy or evaluation order is its own."""
    groups: list[OrderGroup] = []
    for kind in (OrderKind.KETAMINE_ADMINISTRATION, OrderKind.ESKETAMINE):
        members = tuple(c for c in classified if c.kind is kind)
        if members:
            groups.append(OrderGroup(kind, members))
    for c in classified:
        if c.kind in (OrderKind.INTEGRATION_PSYCHOTHERAPY, OrderKind.PSYCHIATRIC_EVALUATION):
            groups.append(OrderGroup(c.kind, (c,)))
    groups.sort(key=lambda g: g.orders[0].index)
    return groups


def _resolve_local(reference: dict[str, Any], holder: Resource, siblings: dict[str, Resource]) -> Resource | None:
    """Resolve a reference inside the request only: contained (#id) or another draft order/Medication."""
    ref = reference.get("reference")
    if not isinstance(ref, str):
        return None
    if ref.startswith("#"):
        for contained in as_list(holder.get("contained")):
            if isinstance(contained, dict) and contained.get("id") == ref[1:]:
                return contained
        return None
    key = reference_key(ref)
    return siblings.get(key) if key else None
