"""Documented patient decisions: a treatment recorded as not done (or revoked) because the patient refused it.

A refusal is as often a Procedure with status not-done and statusReason "Refusal of treatment by patient", or a
revoked / not-taken order, as it is an Observation: all are read. What was refused must be treatment for the
condition in question: its reasonCode / reasonReference names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fhir_mappings.derive.common import event_span, first_match, reason_concepts, valueset_ids
from fhir_mappings.facts import DeriveFact, FactContext, derivation
from fhir_mappings.model import Fact
from fhir_mappings.record import as_list
from fhir_mappings.rules import Item

_REFUSED = {"Procedure": {"not-done"}, "MedicationRequest": {"revoked", "cancelled"}}


@derivation(
    "refused_treatments", params={"reasons": "valueset", "for": "valuesets"}, reads=("Procedure", "MedicationRequest")
)
def refused_treatments(ctx: FactContext, params: Mapping[str, Any], fact: DeriveFact) -> Fact:
    """Treatments for a condition in `for` recorded as not done / revoked with a refusal reason in `reasons`
    (statusReason coded, or its text read with ConText: "declined by patient")."""
    conditions = valueset_ids(params["for"])
    items: list[Item] = []
    for rtype, statuses in _REFUSED.items():
        for resource in ctx.record.of_type(rtype):
            if resource.get("status") not in statuses:
                continue
            concepts, _ = reason_concepts(ctx, resource)
            treated = first_match(ctx, conditions, concepts) if concepts else None
            if treated is None:
                continue
            why = [c for c in as_list(resource.get("statusReason")) if isinstance(c, dict)]
            refusal = ctx.match(params["reasons"], why) if why else None
            if refusal is None:
                continue
            items.append(
                ctx.item_for(
                    resource,
                    refusal,
                    span=event_span(resource) or None,
                    fields={"positive": True, "for": treated.label()},
                    note=f"{resource.get('status')}: {refusal.display or refusal.code} (for {treated.label()})",
                    path="statusReason",
                )
            )
    return ctx.make_fact(fact.name, items, fact.reads)
